"""The product: a trained head on its backbone, scoring images (``Detector``, ``pipeline predict``),
written as a self-contained detector folder (``pipeline export``).

``detector`` is the Python API (a head, its backbone, thresholds, crops), ``predict`` drives stage one's loop
to score inputs into resumable ``output`` files, ``export`` writes a detector folder (and ONNX). It uses both
stages through their faces. The names below load their module (and torch) on first use.
"""

from ..lazy import lazy_face

_EXPORTS = {
    "Detector": "detector",
    "DetectorSpec": "detector",
    "PredictError": "detector",
    "parse_threshold": "detector",
    "read_detector_files": "detector",
    "PredictConfig": "predict",
    "collect_inputs": "predict",
    "run_predict": "predict",
    "OutputError": "output",
    "PREDICTION_COLUMNS": "output",
    "ExportConfig": "export",
    "ExportError": "export",
    "run_export": "export",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
