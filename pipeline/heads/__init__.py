"""Stage two: heads trained and scored from the cache, one grid of configs at a time.

``config`` parses grid files into typed configs; ``head`` is RINE's head (and its file format), ``head_stack``
G heads of one shape as stacked tensors, ``loss`` BCE + SupCon; ``stores`` holds a grid's features in memory or
streams them, ``train`` fits fused groups, ``scoring`` scores stores, ``calibration`` chooses thresholds and a
temperature on val, ``evaluate`` writes each run, ``grid`` dispatches a grid's groups (here or on Dask,
``cluster``), ``embeddings`` samples z for the report. A new head goes in ``head``/``train``. Never imports
stage one, the report or the product. The names below load their module on first use.
"""

from ..lazy import lazy_face

_EXPORTS = {
    "HeadCalibration": "calibration",
    "calibrate_head": "calibration",
    "calibrated_scores": "calibration",
    "ClusterConfig": "cluster",
    "ClusterError": "cluster",
    "check_devices": "cluster",
    "ConfigError": "config",
    "GridConfig": "config",
    "RunConfig": "config",
    "StoreRef": "config",
    "load_grid": "config",
    "make_run_config": "config",
    "parse_grid": "config",
    "FitConfig": "grid",
    "GridSummary": "grid",
    "run_grid": "grid",
    "CheckpointError": "head",
    "RineHead": "head",
    "load_head": "head",
    "load_official_checkpoint": "head",
    "save_head": "head",
    "DataError": "stores",
    "OneLabelError": "stores",
    "fit_group": "train",
    "fit_head": "train",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
