"""The one base class of every error the pipeline reports to its user.

Each module raises its own subclass (``ManifestError``, ``StoreError``,
``ConfigError`` ...), whose message names the file or option and the problem.
The ``pipeline`` command catches :class:`PipelineError` in one place and
prints ``Error: <message>`` with exit status 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum


class PipelineError(Exception):
    """A problem with the user's data, files or options, explained by its message."""


class PipelineWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as ``Warning: <message>``."""


class ExitCode(IntEnum):
    """The exit statuses of every ``pipeline`` command."""

    OK = 0  # everything asked for was done
    ERROR = 1  # a PipelineError (one ``Error:`` line), or a grid with failed configs
    USAGE = 2  # bad options, refused before any work (click's usage errors)
    PARTIAL = 3  # done, but some inputs could not be used: too many undecodable images, unscorable images
