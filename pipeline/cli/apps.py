"""The applications on top: ``demo`` (the synthetic demo's data) and ``paper`` (the paper's experiments)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExitCode
from ..names import PAPER_BACKBONES
from .group import main
from .options import DEVICE_OPTION, _comma_list


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
