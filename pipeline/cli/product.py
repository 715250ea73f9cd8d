"""The product's commands: ``predict`` (score images with a head) and ``export`` (a detector folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import ExitCode
from ..names import CROPS
from .group import main
from .options import backbone_options, max_pixels_option


def _check_threshold(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ..detector import parse_threshold

    if value is not None:
        try:
            parse_threshold(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
    return value


def _check_output(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    from ..names import OUTPUT_FORMATS

    if value is not None and value.suffix.lower() not in OUTPUT_FORMATS:
        raise click.BadParameter(f"{value}: the name must end with one of {', '.join(OUTPUT_FORMATS)}")
    if value is not None and value.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise click.BadParameter(
                f"{value}: Parquet needs pyarrow (pip install pyarrow); or use .csv/.jsonl"
            ) from None
    return value


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--head",
    "head_path",
    required=True,
    help="A run folder (runs/<grid>/runs/<id>), its head.safetensors, a folder written by `pipeline export`, "
    "an official RINE .pth checkpoint, or the hub repo id (ORG/NAME) of an exported detector.",
)
@click.option("--revision", default=None, help="With a hub repo id as --head: its branch, tag or commit.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_check_output,
    help="Output file: .csv, .jsonl or .parquet (pyarrow), written batch by batch; re-running with the same "
    "--out skips the images it holds. Default: CSV on stdout.",
)
@click.option(
    "--crop",
    type=click.Choice(CROPS),
    default="center",
    help="center: the evaluation crop (no resize); tencrop: ten crops scored by the sigmoid of their mean logit "
    "(the authors' protocol for large images); auto: ten crops for images whose shorter side is at least "
    "--auto-min-side.",
)
@click.option(
    "--auto-min-side",
    type=click.IntRange(1),
    default=None,
    help="--crop auto: shorter side (pixels) from which an image gets ten crops. Default: twice the crop (448).",
)
@click.option(
    "--threshold",
    callback=_check_threshold,
    help="val (best val accuracy), eer (equal error rate on val), fpr1 / fpr5 (1 % / 5 % false positives on val "
    "reals), or a number such as 0.5. Default: val; 0.5 for the authors' .pth (they carry no val thresholds).",
)
@backbone_options
@click.option(
    "--model",
    default=None,
    help="The head's backbone from this folder (any copy with the recorded weights and config.json is accepted "
    "as is), or another backbone (needs --allow-other-backbone).",
)
@click.option(
    "--allow-other-backbone",
    is_flag=True,
    help="Score even when the backbone (model id, revision or content) is not the head's; recorded in the output.",
)
@max_pixels_option("get an error row instead of a score")
@click.option(
    "--robust",
    is_flag=True,
    help="Also score each image re-encoded as JPEG quality 75, downscaled by 1/2 and as WebP (in the same batches; "
    "about 4x the backbone work) and add score_min, score_max and verdict: real, fake, or unsure when the scores "
    "straddle the threshold.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def predict_command(
    inputs,
    head_path,
    revision,
    out,
    crop,
    auto_min_side,
    threshold,
    model,
    allow_other_backbone,
    device,
    dtype,
    batch_size,
    workers,
    max_pixels,
    robust,
    no_progress,
) -> None:
    """Score images: files, folders (recursive), a CSV with a path column, or a .txt list of paths.

    \b
    One row per image: path, score (probability of fake), label (fake when
    score >= threshold), threshold, threshold_name, crop, width, height,
    format, backbone, error; with --robust also score_min, score_max, verdict.
    Images that cannot be used get a row with the reason in `error` and no score.
    Exit status: 0 every image scored; 3 some images could not be scored (their
    rows say why), or no image was found; 1 an error (e.g. a head file that
    cannot be read, a backbone other than the head's, a backbone not here with
    the hub offline); 2 bad options (checked before the backbone is loaded).
    """
    from ..detector import NoImagesFound, PredictConfig, PredictOptionError, run_predict

    config = PredictConfig(
        head=head_path,
        revision=revision,
        inputs=tuple(inputs),
        out=out,
        progress=not no_progress,
        crop=crop,
        auto_min_side=auto_min_side,
        threshold=threshold,
        model=model,
        allow_other_backbone=allow_other_backbone,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        decode_workers=workers,
        max_pixels=max_pixels,
        robust=robust,
    )
    try:
        summary = run_predict(config, sys.stdout, log=lambda line: click.echo(line, err=True))
    except PredictOptionError as error:
        raise click.UsageError(str(error)) from None
    except NoImagesFound as error:
        click.echo(f"Error: {error}", err=True)
        raise SystemExit(ExitCode.PARTIAL) from None
    click.echo(summary.report(), err=True)
    if out is not None:
        click.echo(str(out))
    if summary.failures:
        raise SystemExit(ExitCode.PARTIAL)


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to create.")
@click.option(
    "--onnx",
    is_flag=True,
    help="Also write detector.onnx: backbone + head as one graph, uint8 RGB crops -> logit and score "
    "(needs onnx; pip install 'rine-pipeline[export]').",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a detector folder written by `pipeline export`.")
@click.option(
    "--include-backbone",
    is_flag=True,
    help="Copy the backbone (safetensors weights, config.json, preprocessor_config.json) into OUT/backbone: the "
    "folder then scores with no hub and no other copy.",
)
@click.option(
    "--model",
    default=None,
    help="Where the run's backbone is (a folder with the recorded content, or the hub id), when its recorded path "
    "does not lead to it from here; for --onnx and --include-backbone.",
)
def export_command(run_dir: Path, out: Path, onnx: bool, overwrite: bool, include_backbone: bool, model) -> None:
    """Write a trained run (RUN_DIR = runs/<grid>/runs/<id>) as a self-contained detector folder.

    \b
    OUT gets head.safetensors, config.json (backbone id and revision, tap,
    blocks, crop, thresholds, temperature) and README.md (a model card: training
    data, config, metrics, intended use and limitations, how to load); with
    --onnx also detector.onnx. Load it with `pipeline predict --head OUT` or
    `Detector.load(OUT)`; OUT is a hub model repository (`huggingface-cli upload
    ORG/NAME OUT`, then `--head ORG/NAME`). The backbone's weights are copied
    with --include-backbone only; otherwise they load from the hub (pinned
    commit) or a folder with the recorded content (--model at predict time).
    """
    from ..detector import ExportConfig, run_export

    config = ExportConfig(run_dir, out, onnx, overwrite, include_backbone=include_backbone, model=model)
    summary = run_export(config)
    click.echo(summary.report(), err=True)
    click.echo(str(summary.out))
