"""RINE synthetic-image detection as a two-stage CLIP feature-cache pipeline.

``from pipeline import Detector`` gives the Python API (``pipeline.detector.detector``);
importing the package loads neither torch nor the detector until then.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rine-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"


def __getattr__(name: str):
    if name == "Detector":
        from .detector.detector import Detector

        return Detector
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
