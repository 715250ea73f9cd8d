"""The one base class of every error the pipeline reports to its user.

Each module raises its own subclass (``ManifestError``, ``StoreError``,
``ConfigError`` ...), whose message names the file or option and the problem.
The ``pipeline`` command catches :class:`PipelineError` in one place and
prints ``Error: <message>`` with exit status 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's data, files or options, explained by its message."""


class PipelineWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as ``Warning: <message>``."""
