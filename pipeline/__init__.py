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

_EXPORTS = {
    "Detector": "detector",
    "PredictConfig": "detector",
    "run_predict": "detector",
    "ExportConfig": "detector",
    "run_export": "detector",
    "AuditConfig": "features",
    "BackboneConfig": "features",
    "ExtractConfig": "features",
    "LayoutConfig": "features",
    "build_manifest": "features",
    "run_audit": "features",
    "run_extract": "features",
    "ClusterConfig": "heads",
    "FitConfig": "heads",
    "GridConfig": "heads",
    "RunConfig": "heads",
    "load_grid": "heads",
    "run_grid": "heads",
    "ReportConfig": "report",
    "run_report": "report",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
