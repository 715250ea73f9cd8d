"""Stage two: heads trained and scored from the cache, one grid of configs at a time.

``config`` parses grid files into typed configs; ``head`` is RINE's head (and its file format), ``head_stack``
G heads of one shape as stacked tensors, ``loss`` BCE + SupCon; ``stores`` holds a grid's features in memory or
streams them, ``train`` fits fused groups, ``scoring`` scores stores, ``calibration`` chooses thresholds and a
temperature on val, ``evaluate`` writes each run, ``grid`` dispatches a grid's groups (here or on Dask,
``cluster``), ``protocols`` expands one-vs-rest / leave-one-out into runs, ``add_train`` refits with an added
split (``--add-train``), ``embeddings`` samples z for the report. A new head goes in ``head``/``train``. Never imports
stage one, the report or the product. The names below load their module on first use.
"""

from ..lazy import lazy_face

_MODULES = {
    "calibration": ("HeadCalibration", "calibrate_head", "calibrated_scores"),
    "cluster": ("ClusterConfig", "ClusterError", "check_devices"),
    "config": ("ConfigError", "GridConfig", "RunConfig", "StoreRef", "load_grid", "make_run_config", "parse_grid"),
    "grid": ("FitConfig", "GridSummary", "run_grid"),
    "head": ("CheckpointError", "RineHead", "load_head", "load_official_checkpoint", "save_head"),
    "stores": ("DataError", "OneLabelError"),
    "train": ("fit_group", "fit_head"),
}
__all__, __getattr__, __dir__ = lazy_face(__name__, _MODULES)
