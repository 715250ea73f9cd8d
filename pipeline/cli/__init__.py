"""The `pipeline` command: parse options, build a config, call one library function.

Every library error derives from :class:`pipeline.errors.PipelineError`; the
command group catches it in one place and prints ``Error: <message>`` with
exit status 1. Bad options exit 2 (click's usage errors).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from .. import cache
from ..errors import ExitCode, PipelineError, PipelineWarning
from ..features import LAYOUTS, build_manifest
from ..features.manifest import check_split_name, manifest_path, sidecar_path, write_manifest
from ..files import disk_errors_explained
from ..names import (
    AMP_MODES,
    COMPUTE_DTYPES,
    DEFAULT_ALIGN_QUALITY,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SHARD_ROWS,
    FORMAT_ALIGN,
    PAPER_BACKBONES,
    PERTURB_PRESETS,
    PERTURBATIONS,
    STORE_DTYPES,
    TAPS,
)

# Each command imports its own stage inside its body, so that `pipeline --help`
# and stage one do not pay for loading stage two (and the other way round).


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
    \b
    All of it on the paper's data:  pipeline paper DATA_ROOT
    On a built-in synthetic demo:   ./run_all.sh demo (pipeline demo builds its data)

    Exit status: 0 done; 1 an error (printed as "Error: ..."); 2 bad options;
    3 (extract) more rows than --max-invalid could not be decoded; (predict) some
    images could not be scored (their rows say why).
    """


@main.command("manifest")
@click.option(
    "--layout",
    type=click.Choice(tuple(LAYOUTS)),
    required=True,
    help="On-disk layout of the data set (README: Manifests).",
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
@click.option("--generators", help="Comma list of generators/sets to keep (test layouts).")
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
@click.option("--manifests-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("manifests"))
def manifest_command(
    layout, root, split, classes, generators, raise_root, progan_root, coco_root, manifests_dir
) -> None:
    """List the images of a data set layout as a split manifest (CSV: path,label,dataset[,class])."""
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
@click.option("--model", default=DEFAULT_MODEL, help="Hugging Face hub id or local directory of a CLIP (vision) model.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) to load.")
@click.option(
    "--tap",
    "taps",
    type=click.Choice(TAPS),
    multiple=True,
    default=("ln2",),
    help="Tensor taken from each block: ln2 = layer_norm2 output (authors' code, released heads), "
    "hidden = block output (paper text). Repeat to write both from one forward pass.",
)
@click.option("--blocks", default="all", help="Blocks to keep: all, last:K, or a comma list (negative from the end).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cache"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Explicit store path (one tap only).")
@click.option("--batch-size", type=click.IntRange(1), default=32)
@DEVICE_OPTION
@click.option(
    "--dtype",
    default="auto",
    type=click.Choice(("auto", *COMPUTE_DTYPES)),
    help="Backbone compute dtype; auto = float16 on GPU (as the authors), float32 on CPU.",
)
@click.option("--store-dtype", default="float16", type=click.Choice(STORE_DTYPES), help="dtype of the stored features.")
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
    default="official",
    help="official = the authors' code with its quirks; paper = the parameters the paper describes.",
)
@click.option(
    "--ten-crop",
    is_flag=True,
    help="Evaluation by ten crops (corners, center and their flips; variants tencrop_0..9), "
    "scored by the sigmoid of the mean of the ten logits: the authors' protocol for large images (Synthbuster).",
)
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
@click.option("--workers", type=click.IntRange(1), default=2, help="Decoding threads.")
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=DEFAULT_MAX_PIXELS,
    help="Images with more pixels are recorded as invalid.",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first image that cannot be used (exit status 1).")
@click.option(
    "--max-invalid",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
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
    """Run the frozen CLIP tower over a split and cache per-block CLS tokens (resumable, shareable).

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
    from ..features import BackboneConfig, ExtractConfig, OptionError, TooManyInvalid, run_extract

    rank, world_size = _rank_and_world_size(rank, world_size)

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
        views=views,
        augment=augment,
        perturbation=perturb,
        perturb_preset=perturb_preset,
        align_quality=align_quality,
        ten_crop=ten_crop,
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
    from ..features import AuditConfig, run_audit

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
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_export_command(store: Path, out: Path, file_format: str, no_progress: bool) -> None:
    """Write STORE (every row array and complete variant, its attributes) to one HDF5 file OUT.

    \b
    Datasets: labels, paths, dataset, [class], valid, error, features/<variant>
    (rows chunked like the store); the store's attributes on the root group.
    OUT is written under a temporary name and appears only when whole.
    """
    from ..cache.hdf5 import export_hdf5

    with disk_errors_explained(out):
        summary = export_hdf5(store, out, progress=not no_progress)
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


@main.command("fit")
@click.option(
    "--grid",
    "grid_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=Path("grid.yaml"),
    help="Grid YAML: data (train/val/test stores), base config and grid of lists.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: the grid's `out`, else runs/<name>).",
)
@click.option(
    "--jobs",
    type=click.IntRange(1),
    default=1,
    help="Configs (fused groups) fitted in parallel, in threads sharing one copy of the features.",
)
@DEVICE_OPTION
@click.option(
    "--scheduler",
    metavar="ADDRESS|local:N",
    help="Run the groups on a Dask cluster through joblib's Dask backend: a dask.distributed scheduler address "
    "(e.g. tcp://head:8786, the scheduler_address of a dask-jobqueue SLURMCluster), or local:N for N worker "
    "processes on this machine. Each worker process loads the stores once and keeps them for all its groups; "
    "run folders are written by the workers (a shared file system), results.csv by this process; the numbers "
    "equal --jobs 1. Needs pip install 'rine-pipeline[dask]'.",
)
@click.option(
    "--devices",
    metavar="DEV[,DEV...]",
    help="One local Dask worker per device, each pinned to it (in place of --device): e.g. cuda:0,cuda:1,cuda:2,"
    "cuda:3 on one multi-GPU node, cpu,cpu for CPU workers. Needs pip install 'rine-pipeline[dask]'.",
)
@click.option(
    "--no-fuse",
    is_flag=True,
    help="Fit every config alone. By default configs that differ only in contrastive_factor train together "
    "(one batched matmul per layer for the group; the same results to float rounding).",
)
@click.option(
    "--memory-budget",
    type=ByteSize(),
    help="Bytes of features held in memory (e.g. 16G); stores beyond it are read batch by batch from their "
    "shard files, with the same results. Default: 80 % of the RAM available now (of the free GPU memory on a GPU); "
    "on a Dask cluster, per worker process (a local cluster's CPU workers share the default out).",
)
@click.option(
    "--amp",
    type=click.Choice(AMP_MODES),
    help="Training precision of every config, in place of the grid's amp: none (float32, the default and the "
    "authors') or bf16 (bfloat16 matmuls: ~2x faster on GPUs and on CPUs with AMX or AVX-512 BF16, ~100x slower "
    "on other CPUs; heads differ slightly, see docs: fine for screening configs, not for numbers to publish). "
    "Scores are float32 either way; results.csv records the precision of every run.",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first failing config instead of recording an error row.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def fit_command(
    grid_file, out, jobs, device, scheduler, devices, no_fuse, memory_budget, amp, fail_fast, no_progress
) -> None:
    """Train and evaluate every head config of a grid from cached features (finished runs are skipped).

    The groups run in this process (--jobs threads) or on a Dask cluster
    (--scheduler, --devices); the results are the same, bit for bit.
    Prints the results table path. Exit status 1 when any config failed
    (its error row is in results.csv), 0 otherwise.
    """
    from ..heads import FitConfig, load_grid, run_grid

    cluster = _cluster_spec(scheduler, devices, jobs)
    spec = load_grid(grid_file, out=out, amp=amp)
    options = FitConfig(
        device=device,
        jobs=jobs,
        fail_fast=fail_fast,
        progress=not no_progress,
        fuse=not no_fuse,
        memory_budget=memory_budget,
        cluster=cluster,
    )
    summary = run_grid(spec, options)
    click.echo(
        f"{summary.n_runs} runs ({summary.n_skipped} already done, {summary.n_errors} failed) in {summary.seconds:.1f} s; "
        f"best configs in {summary.selection}",
        err=True,
    )
    click.echo(str(summary.results))
    if summary.n_errors:
        raise SystemExit(ExitCode.ERROR)


def _cluster_spec(scheduler: str | None, devices: str | None, jobs: int):
    """The Dask cluster of ``pipeline fit`` (None: threads of this process); bad combinations exit 2."""
    from ..heads import ClusterConfig, check_devices

    if scheduler is None and devices is None:
        return None
    if scheduler is not None and devices is not None:
        raise click.UsageError("--scheduler and --devices are exclusive: --devices starts its own local cluster")
    if jobs > 1:
        raise click.UsageError("--jobs is for threads of this process; with a Dask cluster its workers run the groups")
    try:
        if devices is not None:
            return ClusterConfig(devices=check_devices(_comma_list(devices) or ()))
        return ClusterConfig(scheduler=scheduler)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--devices" if devices else "--scheduler") from None


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
    type=click.Path(exists=True, path_type=Path),
    help="A run folder (runs/<grid>/runs/<id>), its head.safetensors, a folder written by `pipeline export`, "
    "or an official RINE .pth checkpoint.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_check_output,
    help="Output file: .csv, .jsonl or .parquet (pyarrow), written batch by batch; re-running with the same "
    "--out skips the images it holds. Default: CSV on stdout.",
)
@click.option(
    "--crop",
    type=click.Choice(("center", "tencrop", "auto")),
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
@click.option(
    "--model", default=None, help="Another backbone than the one recorded with the head (needs --allow-other-backbone)."
)
@click.option(
    "--allow-other-backbone",
    is_flag=True,
    help="Score even when the backbone (model id, revision or content) is not the head's; recorded in the output.",
)
@DEVICE_OPTION
@click.option("--dtype", default="auto", type=click.Choice(("auto", *COMPUTE_DTYPES)), help="Backbone compute dtype.")
@click.option("--batch-size", type=click.IntRange(1), default=32)
@click.option("--workers", type=click.IntRange(1), default=2, help="Decoding threads.")
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=DEFAULT_MAX_PIXELS,
    help="Images with more pixels get an error row instead of a score.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def predict_command(
    inputs,
    head_path,
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
    no_progress,
) -> None:
    """Score images: files, folders (recursive), a CSV with a path column, or a .txt list of paths.

    \b
    One row per image: path, score (probability of fake), label (fake when
    score >= threshold), threshold, threshold_name, crop, width, height,
    format, backbone, error. Images that cannot be used get a row with the
    reason in `error` and no score.
    Exit status: 0 every image scored; 3 some images could not be scored (their
    rows say why); 1 an error (e.g. a head file that cannot be read, a
    backbone other than the head's); 2 bad options.
    """
    from ..detector import PredictConfig, run_predict

    config = PredictConfig(
        head=head_path,
        inputs=tuple(inputs),
        out=out,
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
        progress=not no_progress,
    )
    summary = run_predict(config, sys.stdout, log=lambda line: click.echo(line, err=True))
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
def export_command(run_dir: Path, out: Path, onnx: bool, overwrite: bool) -> None:
    """Write a trained run (RUN_DIR = runs/<grid>/runs/<id>) as a self-contained detector folder.

    \b
    OUT gets head.safetensors, config.json (backbone id and revision, tap,
    blocks, crop, thresholds, temperature) and README.md (a model card: training
    data, config, metrics, intended use and limitations, how to load); with
    --onnx also detector.onnx. Load it with `pipeline predict --head OUT` or
    `Detector.load(OUT)`. The backbone weights are not copied: they load from
    the hub (or the local folder) the config names.
    """
    from ..detector import ExportConfig, run_export

    summary = run_export(ExportConfig(run_dir=run_dir, out=out, onnx=onnx, overwrite=overwrite))
    click.echo(summary.report(), err=True)
    click.echo(str(summary.out))


@main.command("report")
@click.argument("grid_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    help="Without GRID_DIRS: report every grid folder (with results.csv and selection.csv) under this folder.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    help="Folder for the tables, plots and index.html (audit_*.json found here are shown in the page).",
)
@click.option("--no-plots", is_flag=True, help="Write no PNG figures (the page then has tables only).")
@click.option("--no-html", is_flag=True, help="Write no index.html.")
@click.option(
    "--bootstrap",
    "resamples",
    type=click.IntRange(0),
    default=DEFAULT_RESAMPLES,
    help="Bootstrap resamples of the 95 % intervals of ACC and AP (stratified by label); 0: none.",
)
@click.option("--bootstrap-seed", type=int, default=0, help="Seed of the bootstrap resamples.")
@click.option(
    "--bootstrap-all",
    is_flag=True,
    help="Intervals for every run in metrics.csv and grid.csv, not only the selected configs' runs (slower).",
)
@click.option(
    "--gallery",
    "gallery_size",
    type=click.IntRange(0),
    default=8,  # report.gallery.DEFAULT_GALLERY_SIZE
    help="Worst false positives and worst false negatives shown per selected run.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def report_command(
    grid_dirs, runs_dir, out, no_plots, no_html, resamples, bootstrap_seed, bootstrap_all, gallery_size, no_progress
) -> None:
    """Write the paper's tables (CSV), plots (PNG) and one self-contained page (index.html) from grid folders.

    GRID_DIRS are grid output folders of `pipeline fit`; without them, every
    grid folder under --runs-dir. Tables whose inputs are absent (no ablation
    runs, no perturbed test variants, ...) are skipped with the reason; plots
    never stop a table. The page also shows the audits (`pipeline audit`)
    found in --out and, per selected run, ACC/AP with bootstrap intervals,
    the error analysis, score histograms, the TIE curve and its worst errors.
    """
    from ..report import ReportConfig, run_report
    from ..results.bootstrap import BootstrapConfig

    config = ReportConfig(
        grid_dirs=tuple(grid_dirs),
        out=out,
        plots=not no_plots,
        html=not no_html,
        runs_dir=runs_dir,
        bootstrap=BootstrapConfig(resamples=resamples, seed=bootstrap_seed),
        bootstrap_all=bootstrap_all,
        gallery_size=gallery_size,
        progress=not no_progress,
    )
    summary = run_report(config)
    click.echo(summary.report(), err=True)
    click.echo(str(summary.out))


@main.command("demo")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo/data"),
    help="Folder of the demo data set.",
)
@click.option(
    "--backbone",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo/tiny-random-clip"),
    help="Folder of the tiny random CLIP.",
)
@click.option("--n-train", type=click.IntRange(1), default=1000, help="Training images per label.")
@click.option(
    "--n-test", type=click.IntRange(1), default=100, help="Validation and test images per label and generator."
)
@click.option("--seed", type=int, default=0)
def demo_command(root: Path, backbone: Path, n_train: int, n_test: int, seed: int) -> None:
    """Build the demo's synthetic data set and tiny random-weight CLIP (each skipped when already built).

    The images are procedural scenes and copies carrying generator-like
    up-sampling traces; the backbone has random weights. They show the
    pipeline working end to end (./run_all.sh demo runs the whole chain on
    them), not detection quality.
    """
    from ..demo import DemoConfig, build_demo

    click.echo(build_demo(DemoConfig(root=root, backbone=backbone, n_train=n_train, n_test=n_test, seed=seed)).report())


@main.command("paper")
@click.argument("data_root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backbones", default=",".join(PAPER_BACKBONES), help="Comma list of backbones whose grids run.")
@click.option(
    "--grids",
    "grid_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Grid file to run (repeat); default: grid.yaml and grids/*.yaml except grids/demo.yaml.",
)
@click.option("--manifests-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("manifests"))
@click.option("--reports-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"))
@DEVICE_OPTION
@click.option("--batch-size", type=click.IntRange(1), default=32, help="Backbone batch of the extractions.")
@click.option("--jobs", type=click.IntRange(1), default=1, help="Configs fitted in parallel.")
@click.option("--no-plots", is_flag=True, help="Write the report's CSV tables only.")
@click.option("--dry-run", is_flag=True, help="Check the layout and print the plan; extract and fit nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def paper_command(
    data_root,
    backbones,
    grid_files,
    manifests_dir,
    reports_dir,
    device,
    batch_size,
    jobs,
    no_plots,
    dry_run,
    no_progress,
) -> None:
    """The paper's experiments on the real data under DATA_ROOT: check, manifests, extract, fit, report.

    \b
    DATA_ROOT holds CNNDetection's train/ val/ test/ and test/diffusion_datasets/
    (UniversalFakeDetect); optionally synthbuster/ + RAISEpng/ and
    latent_diffusion_trainingset/ + coco/. Missing folders are listed first.
    The work is planned from the grid files: grids of unselected backbones or
    of absent optional data are skipped with the reason; each training split
    gets as many augmented views as the largest `epochs` of its grids. Every
    step is resumable: re-running the command redoes nothing finished.
    Exit status 1 when any config failed (its error row is in results.csv).
    """
    from ..paper import PaperConfig, run_paper

    config = PaperConfig(
        data_root=data_root,
        backbones=_comma_list(backbones) or PAPER_BACKBONES,
        grid_files=tuple(grid_files) or None,
        manifests_dir=manifests_dir,
        reports_dir=reports_dir,
        device=device,
        batch_size=batch_size,
        jobs=jobs,
        plots=not no_plots,
        dry_run=dry_run,
        progress=not no_progress,
    )
    summary = run_paper(config, log=lambda line: click.echo(line, err=True))
    if summary.reports_dir is not None:
        click.echo(str(summary.reports_dir))
    if summary.n_failed_runs:
        raise SystemExit(ExitCode.ERROR)
