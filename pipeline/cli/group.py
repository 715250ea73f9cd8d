"""The ``pipeline`` command group: every library error as one ``Error:`` line (exit 1), warnings as one line."""

from __future__ import annotations

import warnings

import click

from ..errors import PipelineError, PipelineWarning


class _Commands(click.Group):
    """A command group that turns every library error into ``Error: <message>`` and exit status 1, and prints the
    library's warnings as ``Warning: <message>`` (without Python's file, line and source line)."""

    def invoke(self, ctx: click.Context):
        python_format = warnings.formatwarning
        warnings.formatwarning = _warning_formatter(python_format)
        try:
            return super().invoke(ctx)
        except PipelineError as error:
            raise click.ClickException(str(error)) from None
        finally:
            warnings.formatwarning = python_format


def _warning_formatter(python_format):
    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, PipelineWarning):
            return f"Warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    return format_warning


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="rine-pipeline")
def main() -> None:
    """RINE synthetic-image detection: CLIP block features cached once, heads trained from the cache.

    \b
    Typical order:
      pipeline manifest  -> manifests/<split>.csv
      pipeline extract   -> cache/<model>/<tap>/<split>.zarr
      pipeline fit       -> runs/<grid>/results.csv
      pipeline report    -> reports/*.csv, *.png, index.html (one self-contained page)
      pipeline audit     -> reports/audit_<split>*.csv: metadata shortcuts of a split
      pipeline predict   -> scores for new images (CSV/JSONL/Parquet, resumable)
      pipeline export    -> a trained run as a self-contained detector folder
      pipeline serve     -> a detector as an HTTP service (the [serve] extra)
    \b
    All of it on the paper's data:  pipeline paper DATA_ROOT
    On a built-in synthetic demo:   ./run_all.sh demo (pipeline demo builds its data)

    Exit status: 0 done; 1 an error (printed as "Error: ..."); 2 bad options;
    3 (extract) more rows than --max-invalid could not be decoded; (predict) some
    images could not be scored (their rows say why).
    """
