"""The product: a trained head on its backbone, scoring images (``Detector``, ``pipeline predict``),
written as a self-contained detector folder (``pipeline export``).

``detector`` is the Python API (a head, its backbone, thresholds, crops), ``predict`` drives stage one's loop
to score inputs into resumable ``output`` files, ``export`` writes a detector folder (and ONNX). It uses both
stages through their faces. The names below load their module (and torch) on first use.
"""

from ..lazy import lazy_face

_MODULES = {
    "detector": (
        "FIXED",
        "Detector",
        "DetectorSpec",
        "PredictError",
        "PredictOptionError",
        "parse_threshold",
        "read_detector_files",
    ),
    "predict": ("NoImagesFound", "PredictConfig", "collect_inputs", "run_predict"),
    "output": ("OutputError", "PREDICTION_COLUMNS", "ROBUST_COLUMNS"),
    "robust": ("RobustScores", "reencoded", "robust_scores", "with_copies"),
    "export": ("ExportConfig", "ExportError", "run_export"),
    "backbones": ("BackboneUnavailable",),
    "hub": ("HubError",),
}
__all__, __getattr__, __dir__ = lazy_face(__name__, _MODULES)
