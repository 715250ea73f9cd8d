"""Stage two's commands: ``fit`` (a grid of heads) and ``report`` (tables, figures, one page)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExitCode
from ..names import AMP_MODES, DEFAULT_RESAMPLES
from .group import main
from .options import DEVICE_OPTION, ByteSize, _comma_list


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
@click.option(
    "--add-train",
    metavar="SPLIT",
    help="After the grid, refit its selected configs with the rows of SPLIT added to training (a split whose store "
    "lies beside the training store's, e.g. cache/<model>/<tap>/SPLIT.zarr, or a store path) into <out>/add_SPLIT/, "
    "and write there delta.csv: per test set, the change of ACC and AP with bootstrap intervals.",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first failing config instead of recording an error row.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def fit_command(
    grid_file, out, jobs, device, scheduler, devices, no_fuse, memory_budget, amp, add_train, fail_fast, no_progress
) -> None:
    """Train and evaluate every head config of a grid from cached features (finished runs are skipped).

    A grid's configs choose their head (head: rine, linear, knn, logreg) and
    what it reads (features: blocks, block:K, embedding): docs/training.md.
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
    if add_train is not None:
        from ..heads.add_train import added_store_ref, run_add_train

        added = run_add_train(spec, options, added_store_ref(spec, add_train))
        click.echo(added.report(), err=True)
        click.echo(str(added.delta))
        if added.base.n_errors or added.refit.n_errors:
            raise SystemExit(ExitCode.ERROR)
        return
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
    """Write the paper's tables (CSV), plots (PNG), summary.md and one self-contained page (index.html) from grid folders.

    GRID_DIRS are grid output folders of `pipeline fit`; without them, every
    grid folder under --runs-dir. Tables whose inputs are absent (no ablation
    runs, no perturbed test variants, ...) are skipped with the reason; plots
    never stop a table. The page opens with the result (the selected config,
    its test mean with intervals, ablations, the authors' numbers, audit
    flags; also summary.md and the last lines printed) and also shows the
    audits (`pipeline audit`) found in --out and, per selected run, ACC/AP
    with bootstrap intervals, the error analysis, score histograms, the TIE
    curve and its worst errors.
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
    click.echo(str(summary.out))
    click.echo(summary.report(), err=True)  # the result (the summary card's lines) last
