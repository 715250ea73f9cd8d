"""RINE synthetic-image detection as a two-stage feature-cache pipeline: the supported library API.

Stage one (``pipeline.features``) writes per-block tokens to the cache (``pipeline.cache``); stage two
(``pipeline.heads``) trains and scores heads from it; ``pipeline.results`` and ``pipeline.report`` judge and
show them; ``pipeline.detector`` is the product. The names below are the supported API; each loads its module
(and torch, where it needs it) on first use, so ``import pipeline`` stays light. docs/architecture.md has the map.
"""

from importlib.metadata import PackageNotFoundError, version

from .lazy import lazy_face

try:
    __version__ = version("rine-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

_MODULES = {
    "detector": ("Detector", "PredictConfig", "run_predict", "ExportConfig", "run_export"),
    "features": (
        "AuditConfig",
        "BackboneConfig",
        "ExtractConfig",
        "LayoutConfig",
        "build_manifest",
        "run_audit",
        "run_extract",
    ),
    "heads": ("ClusterConfig", "FitConfig", "GridConfig", "RunConfig", "load_grid", "run_grid"),
    "report": ("ReportConfig", "run_report"),
}
_names, __getattr__, __dir__ = lazy_face(__name__, _MODULES)
__all__ = ["__version__", *_names]
