"""Options and checks shared by several commands (devices, split names, sizes)."""

from __future__ import annotations

from pathlib import Path

import click

from ..files import check_split_name
from ..names import COMPUTE_DTYPES, DEFAULT_ALIGN_QUALITY, DEFAULT_MAX_PIXELS


def _comma_list(value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if value else None


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a device torch cannot use (e.g. cuda on a machine without one) as a bad option."""
    from ..devices import resolve_device

    try:
        resolve_device(value)
    except (RuntimeError, ValueError) as error:
        raise click.BadParameter(str(error)) from None
    return value


def _check_split(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a split name that is not a plain file stem as a bad option."""
    try:
        check_split_name(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return value


class ByteSize(click.ParamType):
    """A size in bytes: 123456, 512M, 8G, 1.5T (powers of 1024; a trailing B or iB is allowed)."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in self._UNITS else ""
        try:
            size = float(text[: len(text) - len(unit)]) * self._UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size such as 800M, 16G or 1.5T", param, ctx)
        if not size > 0 or size == float("inf"):
            self.fail(f"{value!r} must be a positive size", param, ctx)
        return int(size)


DEVICE_OPTION = click.option(
    "--device", default="auto", callback=_check_device, help="auto (cuda if available), cpu, cuda, cuda:1, ..."
)


ALIGN_QUALITY_OPTION = click.option(
    "--align-quality",
    type=click.IntRange(1, 100),
    default=DEFAULT_ALIGN_QUALITY,
    help="JPEG quality of --perturb format-align (variant format-align-q<quality>).",
)


def _split_options(command):
    """--split, --manifest and --data-root: which split's images a command reads."""
    options = (
        click.option(
            "--split",
            required=True,
            callback=_check_split,
            help="Split name; reads manifests/<split>.csv unless --manifest is given.",
        ),
        click.option(
            "--manifest", "manifest_file", type=click.Path(dir_okay=False, path_type=Path), help="Manifest CSV to read."
        ),
        click.option(
            "--data-root",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Override the data root the manifest remembers.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def backbone_options(command):
    """--device, --dtype, --batch-size and --workers: how a command runs the backbone over decoded images."""
    options = (
        DEVICE_OPTION,
        click.option(
            "--dtype",
            default="auto",
            type=click.Choice(("auto", *COMPUTE_DTYPES)),
            help="Backbone compute dtype; auto = float16 on GPU (as the authors), float32 on CPU.",
        ),
        click.option("--batch-size", type=click.IntRange(1), default=32, help="Images per backbone batch."),
        click.option("--workers", type=click.IntRange(1), default=2, help="Decoding threads."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def max_pixels_option(what_happens: str):
    """--max-pixels: the decompression-bomb bound, with what happens to a larger image."""
    return click.option(
        "--max-pixels",
        type=click.IntRange(1),
        default=DEFAULT_MAX_PIXELS,
        help=f"Images with more pixels {what_happens}.",
    )
