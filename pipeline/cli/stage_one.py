"""Stage one's commands: ``manifest``, ``extract``, ``audit`` and ``cache info | verify | export | import``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from ..errors import ExitCode, PipelineError, PipelineWarning
from ..files import disk_errors_explained
from ..names import (
    CENTER,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_INVALID,
    DEFAULT_MODEL,
    DEFAULT_PARQUET_IMAGE_COLUMN,
    DEFAULT_PARQUET_LABEL_COLUMN,
    DEFAULT_PERTURB_PRESET,
    DEFAULT_SHARD_ROWS,
    DEFAULT_STORE_DTYPE,
    DEFAULT_TAP,
    FORMAT_ALIGN,
    LAYOUT_NAMES,
    PERTURB_PRESETS,
    PERTURBATIONS,
    STORE_DTYPES,
    TAPS,
    TEN_CROP,
)
from .group import main
from .options import (
    ALIGN_QUALITY_OPTION,
    _check_split,
    _comma_list,
    _split_options,
    backbone_options,
    max_pixels_option,
)


@main.command("manifest")
@click.option(
    "--layout",
    type=click.Choice(LAYOUT_NAMES),
    required=True,
    help="On-disk layout of the data set (docs/data.md: Layouts).",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Top folder of the data set.",
)
@click.option(
    "--split", required=True, callback=_check_split, help="Name of the split; written to <manifests-dir>/<split>.csv."
)
@click.option("--classes", help="Comma list of classes to keep (train/val layouts), e.g. car,cat,chair,horse.")
@click.option("--generators", help="Comma list of generators/sets to keep (test, genimage and parquet layouts).")
@click.option(
    "--raise-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="RAISE reals (synthbuster layout).",
)
@click.option(
    "--progan-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="CNNDetection root whose train/<class>/0_real/ hold the LSUN reals (ldm-* layouts).",
)
@click.option(
    "--coco-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="COCO root holding train2014/ and val2014/ (ldm-* layouts).",
)
@click.option(
    "--image-column",
    help=f"Column of the image bytes: a struct with 'bytes' or binary (parquet layout; default {DEFAULT_PARQUET_IMAGE_COLUMN}).",
)
@click.option(
    "--label-column",
    help=f"Column of the label: 0/1, false/true or real/fake (parquet layout; default {DEFAULT_PARQUET_LABEL_COLUMN}).",
)
@click.option(
    "--generator-column",
    help="Column naming each row's generator, its dataset (parquet layout; default: the root folder's name).",
)
@click.option("--manifests-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("manifests"))
def manifest_command(
    layout,
    root,
    split,
    classes,
    generators,
    raise_root,
    progan_root,
    coco_root,
    image_column,
    label_column,
    generator_column,
    manifests_dir,
) -> None:
    """List the images of a data set layout as a split manifest (CSV: path,label,dataset[,class])."""
    from ..features import build_manifest, manifest_path, sidecar_path, write_manifest

    try:
        manifest = build_manifest(
            layout,
            root,
            split,
            classes=_comma_list(classes),
            generators=_comma_list(generators),
            raise_root=raise_root,
            progan_root=progan_root,
            coco_root=coco_root,
            image_column=image_column,
            label_column=label_column,
            generator_column=generator_column,
        )
    except PipelineError:
        raise
    except ValueError as error:  # options the layout does not take
        raise click.UsageError(str(error)) from None
    path = manifest_path(manifests_dir, split)
    write_manifest(manifest, path)
    n_fake = sum(row.label for row in manifest.rows)
    datasets = sorted({row.dataset for row in manifest.rows})
    click.echo(
        f"{len(manifest)} images ({len(manifest) - n_fake} real, {n_fake} fake) in {len(datasets)} dataset(s)", err=True
    )
    if manifest.skipped:
        click.echo(
            f"{len(manifest.skipped)} file(s) skipped, listed under 'skipped' in {sidecar_path(path)}:", err=True
        )
        for name, reason in manifest.skipped[:10]:
            click.echo(f"  {name}: {reason}", err=True)
    click.echo(str(path))


@main.command("extract")
@_split_options
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    help="Hugging Face hub id or local directory of the backbone: CLIP/MetaCLIP (default), SigLIP, DINOv2 (with or "
    "without registers) or DINOv3 (docs/data.md, Backbones).",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) to load.")
@click.option(
    "--tap",
    "taps",
    type=click.Choice(TAPS),
    multiple=True,
    default=(DEFAULT_TAP,),
    help="Tensor taken from each block: ln2 = layer_norm2 output (authors' code, released heads), "
    "hidden = block output (paper text). Repeat to write both from one forward pass.",
)
@click.option("--blocks", default="all", help="Blocks to keep: all, last:K, or a comma list (negative from the end).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cache"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Explicit store path (one tap only).")
@backbone_options
@click.option(
    "--store-dtype", default=DEFAULT_STORE_DTYPE, type=click.Choice(STORE_DTYPES), help="dtype of the stored features."
)
@click.option(
    "--views",
    type=click.IntRange(1),
    default=1,
    help="Seeded augmented views per training image (epoch e reads view e mod K).",
)
@click.option(
    "--augment/--no-augment",
    default=None,
    help="Training recipe (blur/JPEG/random crop/flip) or center crop. Default: augment when the split name starts with 'train'.",
)
@click.option(
    "--perturb",
    type=click.Choice((*PERTURBATIONS, FORMAT_ALIGN)),
    help="Robustness variant of an evaluation split (paper Table 5), or format-align: every image re-encoded "
    "as the same JPEG (--align-quality) before the center crop, so the file format is no shortcut.",
)
@ALIGN_QUALITY_OPTION
@click.option(
    "--perturb-preset",
    type=click.Choice(PERTURB_PRESETS),
    default=DEFAULT_PERTURB_PRESET,
    help="official = the authors' code with its quirks; paper = the parameters the paper describes.",
)
@click.option(
    "--crop",
    type=click.Choice((CENTER, TEN_CROP)),
    default=CENTER,
    help="Evaluation crop: the center crop (no resize), or tencrop: the ten crops (corners, center and their "
    "flips; variants tencrop_0..9), scored by the sigmoid of the mean of the ten logits, the authors' protocol "
    "for large images (Synthbuster). The same word as a grid's `variant: tencrop` and `pipeline predict --crop`.",
)
@click.option("--ten-crop", is_flag=True, hidden=True, help="Deprecated: --crop tencrop.")
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    help="Seed of every random choice; each image's view is seeded by (seed, row, view).",
)
@click.option(
    "--shard-rows",
    type=click.IntRange(1),
    default=DEFAULT_SHARD_ROWS,
    help="Rows per shard: the unit of work and resume.",
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(1),
    default=DEFAULT_CHUNK_ROWS,
    help="Rows per inner chunk (divides --shard-rows).",
)
@max_pixels_option("are recorded as invalid")
@click.option("--fail-fast", is_flag=True, help="Stop at the first image that cannot be used (exit status 1).")
@click.option(
    "--max-invalid",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_MAX_INVALID,
    help="Share of rows that may fail to decode; above it the command exits 3 (the store keeps what was done).",
)
@click.option(
    "--retry-invalid",
    is_flag=True,
    help="Re-decode the rows recorded as invalid (after restoring files or fixing --data-root): "
    "their shards are re-extracted, every other shard is left as it is.",
)
@click.option(
    "--overwrite", is_flag=True, help="Delete an existing store (only a feature store; anything else is refused)."
)
@click.option(
    "--rank",
    type=click.IntRange(0),
    default=None,
    help="This process's rank among --world-size processes sharing the work [default: $RANK (torchrun), else 0].",
)
@click.option(
    "--world-size",
    type=click.IntRange(1),
    default=None,
    help="Number of processes sharing the work [default: $WORLD_SIZE (torchrun), else 1]. "
    "E.g. under SLURM: --rank $SLURM_PROCID --world-size $SLURM_NTASKS.",
)
@click.option(
    "--claim-timeout",
    type=click.FloatRange(0.0, min_open=True),
    default=DEFAULT_CLAIM_TIMEOUT,
    help="Seconds after which a claim on a shard that its owner stopped refreshing (a dead process on another "
    "machine) is taken over.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract_command(
    split,
    manifest_file,
    data_root,
    model,
    revision,
    taps,
    blocks,
    cache_dir,
    out,
    batch_size,
    device,
    dtype,
    store_dtype,
    views,
    augment,
    perturb,
    align_quality,
    perturb_preset,
    crop,
    ten_crop,
    seed,
    shard_rows,
    chunk_rows,
    workers,
    max_pixels,
    fail_fast,
    max_invalid,
    retry_invalid,
    overwrite,
    rank,
    world_size,
    claim_timeout,
    no_progress,
) -> None:
    """Run the frozen vision tower over a split and cache per-block tokens and its image embedding (resumable, shareable).

    Prints the store path(s). Several processes may extract into the same
    store: under torchrun (`torchrun --nproc-per-node N -m pipeline extract
    ...`, one rank per GPU), with --rank/--world-size, or simply started
    twice; they split the shards between them and each returns when the store
    is complete.

    \b
    Exit status: 0 the store is complete (images that could not be decoded are
    recorded with valid=false and summarised); 1 an error, or --fail-fast at
    the first bad image; 2 bad options; 3 more than --max-invalid of the rows
    could not be decoded (the store keeps them; fix and use --retry-invalid).
    """
    from ..features import (
        BackboneConfig,
        ExtractConfig,
        OptionError,
        TooManyInvalid,
        manifest_path,
        run_extract,
        variant_group_of,
    )

    rank, world_size = _rank_and_world_size(rank, world_size)
    if ten_crop:
        warnings.warn("--ten-crop is deprecated: use --crop tencrop", PipelineWarning, stacklevel=1)
        crop = TEN_CROP
    try:
        group = variant_group_of(
            split,
            views=views,
            augment=augment,
            perturbation=perturb,
            preset=perturb_preset,
            align_quality=align_quality,
            crop=crop,
        )
    except OptionError as error:
        raise click.UsageError(str(error)) from None
    config = ExtractConfig(
        split=split,
        manifest=manifest_file or manifest_path(Path("manifests"), split),
        backbone=BackboneConfig(model=model, revision=revision, device=device, dtype=dtype),
        data_root=data_root,
        taps=tuple(dict.fromkeys(taps)),
        block_selection=blocks,
        cache_dir=cache_dir,
        out=out,
        batch_size=batch_size,
        store_dtype=store_dtype,
        variant_group=group,
        seed=seed,
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        decode_workers=workers,
        max_pixels=max_pixels,
        fail_fast=fail_fast,
        max_invalid=max_invalid,
        retry_invalid=retry_invalid,
        overwrite=overwrite,
        rank=rank,
        world_size=world_size,
        claim_timeout=claim_timeout,
        progress=not no_progress,
    )
    try:
        summary = run_extract(config)
    except OptionError as error:
        raise click.UsageError(str(error)) from None
    except TooManyInvalid as error:
        click.echo(error.summary.report(), err=True)
        click.echo(f"Error: {error}", err=True)
        raise SystemExit(ExitCode.PARTIAL) from None
    click.echo(summary.report(), err=True)
    for path in summary.stores.values():
        click.echo(str(path))


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """--rank/--world-size, else torchrun's RANK/WORLD_SIZE, else one process."""
    if (rank is None) != (world_size is None):
        raise click.UsageError("--rank and --world-size go together")
    if rank is not None:
        return rank, world_size
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise click.UsageError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers"
        ) from None


@main.command("audit")
@_split_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    help="Folder for audit_<split>*.csv and .json.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.5, 1.0, min_open=True),
    default=0.8,
    help="Flag a dataset whose metadata predicts the label with at least this AUC.",
)
@click.option(
    "--folds",
    type=click.IntRange(2),
    default=5,
    help="Stratified cross-validation folds (fewer when a label has fewer images).",
)
@click.option("--seed", type=int, default=0, help="Seed of the folds and the trees.")
@click.option("--workers", type=click.IntRange(1), default=8, help="Header-reading threads.")
@click.option(
    "--perturb",
    type=click.Choice((FORMAT_ALIGN,)),
    help="Audit the files as `pipeline extract --perturb format-align` sees them (every image decoded and "
    "re-encoded as the same JPEG) instead of the files as they are; outputs audit_<split>_format-align-q<quality>*.",
)
@ALIGN_QUALITY_OPTION
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def audit_command(
    split, manifest_file, data_root, out, threshold, folds, seed, workers, perturb, align_quality, no_progress
) -> None:
    """Check a split for metadata shortcuts: can format, JPEG quality, size, mode, EXIF or file size alone tell reals from fakes?

    Reads the image headers only (no decoding, no backbone). Per dataset: the
    header statistics of reals and fakes, and the cross-validated AUC of a
    shallow tree predicting the label from each feature and from all together;
    a dataset reaching --threshold is FLAGGED with the feature responsible.
    Prints the flags, then the paths of the CSVs and JSON written.
    """
    from ..features import AuditConfig, manifest_path, run_audit

    config = AuditConfig(
        split=split,
        manifest=manifest_file or manifest_path(Path("manifests"), split),
        data_root=data_root,
        out=out,
        threshold=threshold,
        folds=folds,
        seed=seed,
        workers=workers,
        progress=not no_progress,
        perturbation=perturb,
        align_quality=align_quality,
    )
    summary = run_audit(config)
    click.echo(summary.report(), err=True)
    for path in summary.written:
        click.echo(str(path))


@main.group("cache")
def cache_group() -> None:
    """Inspect and verify feature stores; export them to HDF5 and import them back."""


@cache_group.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def cache_info_command(path: Path) -> None:
    """Print a store's attributes, variants and completion, and its invalid rows."""
    from .. import cache

    click.echo(cache.describe_store(path))


@cache_group.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--reset-bad",
    is_flag=True,
    help="Clear the progress flags of the shards found damaged, so that the next `pipeline extract` "
    "(same options) re-extracts them.",
)
def cache_verify_command(path: Path, reset_bad: bool) -> None:
    """Check a store end to end: every shard present and readable, its checksums, progress flags, row-aligned
    arrays, no NaN/Inf in valid rows. Prints what is wrong; exit status 1 when anything is.
    """
    from .. import cache

    problems = cache.verify_store(path)
    if not problems:
        click.echo(f"{path}: OK")
        return
    for problem in problems:
        click.echo(problem)
    if reset_bad:
        reset = cache.reset_damaged_shards(path)
        click.echo(f"reset {reset} shard flag(s); run `pipeline extract` again to re-extract them", err=True)
    raise click.ClickException(f"{path}: {len(problems)} problem(s) found")


@cache_group.command("export")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "file_format", type=click.Choice(["hdf5"]), default="hdf5", help="File format of OUT.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (a link at OUT is replaced, not its target).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_export_command(store: Path, out: Path, file_format: str, overwrite: bool, no_progress: bool) -> None:
    """Write STORE (every row array and complete variant, its attributes) to one HDF5 file OUT.

    \b
    Datasets: labels, paths, dataset, [class], valid, error, features/<variant>
    (rows chunked like the store), each with a CRC32C that `cache import` checks;
    the store's attributes on the root group. OUT is written under a temporary
    name and appears only when whole; an existing OUT only with --overwrite.
    """
    from ..cache.hdf5 import export_hdf5

    with disk_errors_explained(out):
        summary = export_hdf5(store, out, overwrite=overwrite, progress=not no_progress)
    click.echo(summary.report(), err=True)
    click.echo(str(out))


@cache_group.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace STORE if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_import_command(source: Path, store: Path, overwrite: bool, no_progress: bool) -> None:
    """Read an HDF5 file written by `pipeline cache export` back into the feature store STORE."""
    from ..cache.hdf5 import import_hdf5

    with disk_errors_explained(store):
        summary = import_hdf5(source, store, overwrite=overwrite, progress=not no_progress)
    click.echo(summary.report(), err=True)
    click.echo(str(store))
