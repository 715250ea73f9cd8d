"""RINE synthetic-image detection as a two-stage CLIP feature-cache pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rine-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
