"""The ``pipeline`` command: a hallway. Each command parses its options, builds a typed config, calls one
library function and prints where the results went; it imports its stage inside its body, so that
``pipeline --help`` loads neither torch, zarr, OpenCV nor SciPy (tested).

Every library error derives from :class:`pipeline.errors.PipelineError`; the command group catches it in one
place and prints ``Error: <message>`` with exit status 1. Bad options exit 2 (click's usage errors); exit
statuses are :class:`pipeline.errors.ExitCode`.
"""

from . import apps, product, serve, stage_one, stage_two  # noqa: F401 - each registers its commands on main
from .group import main

__all__ = ["main"]
