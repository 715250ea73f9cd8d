"""The report's figures: plot jobs prepared from typed grid results, drawn as PNG files with matplotlib's Agg canvas.

Importing this module imports matplotlib; drawing uses no pyplot and no global state, and each figure is
written complete-or-absent. The figures (ACC/AP per test set beside the authors', hyper-parameter boxes, the
studies, TIE block importance, t-SNE of z) and :func:`plot_reliability`: docs/reports.md.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator

from ..files import atomic_path
from ..results import reference as ref
from ..results.metrics import ECE_BINS, brier_score, expected_calibration_error, reliability_bins
from ..results.run_folder import EMBEDDINGS_FILE, HEAD_FILE
from .inputs import GridResults, RunResult, Scores, all_runs, best_by_test_full_models
from .studies import block_importance, tie_runs
from .table import SkippedOutput, format_hyper, order_datasets, scores_from_reference

DPI = 100
# Okabe & Ito's colour-blind-safe palette, ordered so that neighbours also differ in lightness (greyscale).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000", "#F0E442")
ACC_COLOR, AP_COLOR = PALETTE[0], PALETTE[1]  # dark blue, light orange
CHANCE = 50.0  # percent: ACC of a coin flip on a balanced set
# black with a white edge: readable on the dark ACC box and on the light AP box alike
MEDIAN = {"color": "black", "linewidth": 1.5, "path_effects": [withStroke(linewidth=3.5, foreground="white")]}


def chance_line(axis, horizontal: bool = True) -> None:
    """The dashed chance line (50 %) on an accuracy axis."""
    line = axis.axhline if horizontal else axis.axvline
    line(CHANCE, color="black", linestyle="--", linewidth=1, label="chance (50 %)", zorder=3)


def uniform_line(axis, n_blocks: int) -> None:
    """The dotted uniform TIE weight (1 / blocks) for reference."""
    axis.axhline(1 / n_blocks, color="grey", linestyle=":", linewidth=1.2, label=f"uniform (1/{n_blocks})")


def block_ticks(axis, blocks: Sequence[int]) -> None:
    """Integer block ticks (every block up to 32 blocks)."""
    if len(blocks) <= 32:
        axis.set_xticks(list(blocks))
    else:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def plot_per_dataset(
    path: Path, title: str, datasets: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
) -> Path:
    """Grouped bars per test set, one bar per series (label -> (ACC %, AP %)); ACC panel above AP panel."""
    figure = new_figure(max(8.0, 0.3 * len(datasets) * max(1, len(series)) + 3), 7.5)
    axes = figure.subplots(2, 1, sharex=True)
    positions = np.arange(len(datasets))
    width = 0.8 / max(1, len(series))
    for axis, metric, index in ((axes[0], "ACC", 0), (axes[1], "AP", 1)):
        for k, (label, values) in enumerate(series.items()):
            heights = np.asarray(values[index], dtype=float)
            offset = (k - (len(series) - 1) / 2) * width
            axis.bar(positions + offset, heights, width, label=label, color=PALETTE[k % len(PALETTE)])
        axis.set_ylabel(f"{metric} (%)")
        axis.set_ylim(0, 100)
        axis.set_yticks(range(0, 101, 20))
        axis.grid(axis="y", alpha=0.4)
    chance_line(axes[0])
    axes[1].set_xticks(positions, datasets, rotation=40, ha="right")
    axes[1].set_xlabel("test set")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def plot_hyperparam_boxes(
    path: Path, title: str, panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]
) -> Path:
    """One panel per hyper-parameter: for each value, a box of ACC % and a box of AP % over runs."""
    figure = new_figure(4.5 * len(panels), 4.8)
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    width = 0.35
    for axis, (label, per_value) in zip(axes, panels.items()):
        positions = np.arange(len(per_value))
        for offset, index, color in ((-width / 2, 0, ACC_COLOR), (width / 2, 1, AP_COLOR)):
            data = [list(values[index]) for values in per_value.values()]
            boxes = axis.boxplot(
                data, positions=positions + offset, widths=width * 0.9, patch_artist=True, medianprops=MEDIAN
            )
            for box in boxes["boxes"]:
                box.set_facecolor(color)
        axis.set_xticks(positions, list(per_value))
        axis.set_xlabel(label)
        axis.grid(axis="y", alpha=0.4)
    axes[0].set_ylabel("mean over test sets (%)")
    legend = [Patch(facecolor=ACC_COLOR, label="ACC"), Patch(facecolor=AP_COLOR, label="AP")]
    figure.legend(handles=legend, loc="outside lower center", ncols=2, fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def plot_study(
    path: Path, title: str, xlabel: str, groups: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]
) -> Path:
    """One panel per group: mean and max over runs of ACC % and AP % at each x value."""
    figure = new_figure(7.0, 3.6 * len(groups) + 0.6)
    axes = np.atleast_1d(figure.subplots(len(groups), 1, squeeze=False)[:, 0])
    for axis, (label, per_value) in zip(axes, groups.items()):
        positions = np.arange(len(per_value))
        for index, metric, color, marker in ((0, "ACC", ACC_COLOR, "o"), (1, "AP", AP_COLOR, "d")):
            values = [np.asarray(v[index], dtype=float) for v in per_value.values()]
            axis.plot(positions, [v.max() for v in values], marker=marker, color=color, label=f"{metric} (max)")
            axis.plot(positions, [v.mean() for v in values], linestyle="--", color=color, label=f"{metric} (mean)")
        axis.set_xticks(positions, list(per_value))
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mean over test sets (%)")
        axis.set_title(label, fontsize="medium")
        axis.grid(alpha=0.4)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def plot_tie(path: Path, title: str, series: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> Path:
    """One line per setting: the TIE weight of each block (label -> (block indices, weights)); legend below."""
    figure = new_figure(8.0, 4.5 + 0.25 * len(series))
    axis = figure.subplots()
    markers = "osD^v<>p"
    top = 0.0
    for k, (label, (blocks, weights)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        axis.plot(blocks, weights, marker=markers[k % len(markers)], markersize=4, label=label, color=color)
        top = max(top, max(weights))
    first = next(iter(series.values()))[0]
    uniform_line(axis, len(first))
    block_ticks(axis, first)
    axis.set_ylim(0, max(top, 1 / len(first)) * 1.1)
    axis.set_xlabel("block")
    axis.set_ylabel("TIE weight (softmax(alpha))")
    axis.grid(alpha=0.4)
    figure.legend(loc="outside lower center", fontsize="small", ncols=1)
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def plot_embedding(path: Path, title: str, points: np.ndarray, groups: Mapping[str, np.ndarray]) -> Path:
    """A 2-D scatter of ``points``, one marker style per group (label -> boolean mask)."""
    figure = new_figure(6.5, 5.0)
    axis = figure.subplots()
    styles = ((PALETTE[0], "d"), (PALETTE[5], "o"), (PALETTE[2], "^"), (PALETTE[3], "s"))
    for (label, mask), (color, marker) in zip(groups.items(), styles):
        axis.scatter(
            points[mask, 0], points[mask, 1], s=12, facecolors="none", edgecolors=color, marker=marker, label=label
        )
    axis.set_xticks([])
    axis.set_yticks([])
    figure.legend(loc="outside lower center", ncols=len(groups), fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def plot_reliability(path: Path, title: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Reliability diagram: per split (label -> (labels, scores)), the fraction of fakes against the mean score per bin.

    Bins as ``metrics.reliability_bins`` (equal width); a marker's area follows its bin's count; the
    legend gives each split's ECE and Brier score. Below, the share of images per bin.
    """
    figure = new_figure(6.5, 7.0)
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    edges = np.linspace(0, 1, ECE_BINS + 1)
    width = 1 / ECE_BINS / (len(curves) + 1)
    for k, (label, (labels, scores)) in enumerate(curves.items()):
        counts, mean_score, fake_fraction = reliability_bins(labels, scores)
        filled = counts > 0
        ece, brier = expected_calibration_error(labels, scores), brier_score(labels, scores)
        line = top.plot(
            mean_score[filled],
            fake_fraction[filled],
            marker="o",
            markersize=0,
            color=PALETTE[k % len(PALETTE)],
            label=f"{label} (ECE {ece:.3f}, Brier {brier:.3f}, n {len(scores)})",
        )
        top.scatter(
            mean_score[filled],
            fake_fraction[filled],
            s=20 + 200 * counts[filled] / counts.sum(),
            color=line[0].get_color(),
        )
        bottom.bar(edges[:-1] + (k + 0.5) * width, counts / counts.sum(), width, color=line[0].get_color())
    top.set_ylabel("fraction of fakes")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.4)
    figure.legend(*top.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    bottom.set_xlabel(f"score (probability of fake), {ECE_BINS} bins")
    bottom.set_ylabel("share of images")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


# ----------------------------------------------------------------------------- plot jobs

PlotJob = tuple[str, Callable[[], Path]]


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_plot_name(prefix: str, run: RunResult, common_tokens: set[str]) -> str:
    """<prefix>_<backbone>-<tap>-<n>class-<setting parts that differ between plotted runs>-<hash>.png"""
    label = run.setting.label(without=())
    digest = hashlib.sha1("\n".join((run.grid_dir.name, label)).encode()).hexdigest()[:6]
    distinct = " ".join(token for token in label.split() if token not in common_tokens)
    classes = f"{run.n_classes}class" if run.n_classes is not None else ""
    readable = slugify(f"{run.backbone} {run.setting.tap} {classes} {distinct}")[:80].rstrip("-")
    return f"{prefix}_{readable}-{digest}.png"


def common_tokens(runs: Sequence[RunResult]) -> set[str]:
    return set.intersection(*(set(run.setting.label(without=()).split()) for run in runs)) if runs else set()


def percent_lists(scores: Mapping[str, Scores], datasets: Sequence[str]) -> tuple[list[float], list[float]]:
    return (
        [100 * scores[d].acc if d in scores else math.nan for d in datasets],
        [100 * scores[d].ap if d in scores else math.nan for d in datasets],
    )


def run_title(run: RunResult, what: str) -> str:
    """A short title (the setting is in the caption and the page's run section)."""
    classes = f", {run.n_classes}-class" if run.n_classes is not None else ""
    return f"{what}: {run.backbone}{classes}, run {run.run}"


def per_dataset_jobs(grids: Sequence[GridResults], out: Path) -> list[PlotJob]:
    """One figure per full-model setting (its best_by_test run, center test sets) next to the authors' published config."""
    runs = [run for run in best_by_test_full_models(grids) if run.center]
    tokens = common_tokens(runs)
    jobs = []
    for run in runs:
        series = {f"ours (xi/q/d' {run.head_config.label()})": run.center}
        published = ref.PUBLISHED_BEST.get((run.backbone, run.n_classes)) if run.n_classes is not None else None
        if published is not None:
            pairs = ref.reference_scores(run.backbone, run.n_classes, published)
            series[f"authors, published (xi/q/d' {'/'.join(format_hyper(published))})"] = scores_from_reference(pairs)
        datasets = order_datasets(d for scores in series.values() for d in scores)
        name = run_plot_name("per_dataset", run, tokens)
        bars = {label: percent_lists(scores, datasets) for label, scores in series.items()}
        jobs.append(
            (
                name,
                functools.partial(
                    plot_per_dataset, out / name, run_title(run, "ACC / AP per test set"), datasets, bars
                ),
            )
        )
    return jobs


def numeric_order(values: Iterable[str]) -> list[str]:
    def key(value: str) -> tuple[int, float, str]:
        try:
            return (0, float(value), value)
        except ValueError:
            return (1, 0.0, value)

    return sorted(set(values), key=key)


def mean_percents(runs: Sequence[RunResult]) -> tuple[list[float], list[float]]:
    return [100 * run.mean_acc for run in runs], [100 * run.mean_ap for run in runs]


def hyperparam_job(grids: Sequence[GridResults], out: Path) -> PlotJob | SkippedOutput:
    runs = [run for run in all_runs(grids) if run.is_full_model and run.has_test_mean]
    name = "hyperparams_box.png"
    if not runs:
        return SkippedOutput(name, "no full-model runs with test results")
    labels = {
        "contrastive_factor": r"contrastive factor $\xi$",
        "proj_layers": r"projection layers $q$",
        "proj_dim": r"projection dim $d'$",
    }
    panels = {}
    for column, label in labels.items():
        values = {run.run: str(getattr(run.head_config, column)) for run in runs}
        panels[label] = {
            value: mean_percents([run for run in runs if values[run.run] == value])
            for value in numeric_order(values.values())
        }
    title = f"Mean test ACC / AP per hyper-parameter value ({len(runs)} runs)"
    return (name, functools.partial(plot_hyperparam_boxes, out / name, title, panels))


def study_job(grids: Sequence[GridResults], out: Path, column: str, name: str) -> PlotJob | SkippedOutput:
    """Mean ACC/AP against ``column`` for full-model runs that differ only in it (and in xi/q/d')."""
    groups: dict[tuple, list[RunResult]] = {}
    for run in all_runs(grids):
        if run.is_full_model and run.has_test_mean:
            setting = run.setting
            key = tuple(getattr(setting, field) for field in setting.__dataclass_fields__ if field != column)
            groups.setdefault(key, []).append(run)
    studies = {}
    for runs in groups.values():
        values = numeric_order(str(getattr(run.setting, column)) for run in runs)
        if len(values) < 2:
            continue
        first = runs[0]
        label = f"{first.backbone} {first.setting.tap} classes={first.setting.classes} train={first.setting.train}"
        if label in studies:
            label = f"{label} #{len(studies) + 1}"
        studies[label] = {
            value: mean_percents([run for run in runs if str(getattr(run.setting, column)) == value])
            for value in values
        }
    if not studies:
        return SkippedOutput(name, f"no runs that differ only in {column} within a setting")
    title = f"Mean test ACC / AP vs {column}"
    return (name, functools.partial(plot_study, out / name, title, column, studies))


def tie_job(grids: Sequence[GridResults], out: Path) -> PlotJob | SkippedOutput:
    runs = tie_runs(grids)
    name = "tie.png"
    if not runs:
        return SkippedOutput(name, f"no best_by_test full-model run with a {HEAD_FILE} in its run folder")
    labels = [run.setting.label(without=("model", "tap", "train", "classes")) for run in runs]
    common = set.intersection(*(set(label.split()) for label in labels))
    series = {}
    for run, label in zip(runs, labels):
        blocks, weights = block_importance(run.folder / HEAD_FILE)
        classes = f"{run.n_classes}-class" if run.n_classes is not None else f"train={run.setting.train}"
        distinct = " ".join(part for part in label.split() if part not in common)
        series[" ".join(filter(None, (run.backbone, classes, distinct, f"run {run.run}")))] = (
            blocks.tolist(),
            weights.tolist(),
        )
    title = "TIE block importance per setting"
    return (name, functools.partial(plot_tie, out / name, title, series))


def tsne_points(z: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``z`` (scikit-learn; PCA init, perplexity 30 or less for small samples, fixed seed)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (len(z) - 1) / 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(z)


def embedding_groups(labels: np.ndarray, datasets: np.ndarray) -> dict[str, np.ndarray]:
    """real / fake of a set whose name holds 'gan' / other fakes (the authors' split of their t-SNE)."""
    gan = np.array(["gan" in name for name in datasets])
    groups = {"real": labels == 0, "fake (GAN)": (labels == 1) & gan, "fake (other)": (labels == 1) & ~gan}
    return {label: mask for label, mask in groups.items() if mask.any()}


def draw_tsne(path: Path, title: str, embeddings: Path) -> Path:
    with np.load(embeddings) as data:
        z, labels, datasets = data["z"], data["label"], data["dataset"]
    if len(z) < 5:
        raise ValueError(f"{embeddings}: only {len(z)} embedded rows, too few for a t-SNE")
    return plot_embedding(path, title, tsne_points(z), embedding_groups(labels, datasets))


def tsne_jobs(grids: Sequence[GridResults], out: Path) -> list[PlotJob | SkippedOutput]:
    runs = best_by_test_full_models(grids)
    with_embeddings = [run for run in runs if (run.folder / EMBEDDINGS_FILE).is_file()]
    if not with_embeddings:
        return [
            SkippedOutput(
                "tsne_*.png", f"no best_by_test full-model run with {EMBEDDINGS_FILE} (written by pipeline fit)"
            )
        ]
    tokens = common_tokens(with_embeddings)
    jobs: list[PlotJob | SkippedOutput] = []
    for run in with_embeddings:
        name = run_plot_name("tsne", run, tokens)
        title = run_title(run, "t-SNE of z")
        jobs.append((name, functools.partial(draw_tsne, out / name, title, run.folder / EMBEDDINGS_FILE)))
    return jobs


def plot_preparers(
    grids: Sequence[GridResults], out: Path
) -> tuple[tuple[str, Callable[[], list[PlotJob | SkippedOutput]]], ...]:
    """(label, prepare) per kind of figure; each prepare returns its jobs or why it has none."""
    return (
        ("per_dataset_*.png", lambda: list(per_dataset_jobs(grids, out))),
        ("hyperparams_box.png", lambda: [hyperparam_job(grids, out)]),
        ("epochs.png", lambda: [study_job(grids, out, "epochs", "epochs.png")]),
        ("fraction.png", lambda: [study_job(grids, out, "train_fraction", "fraction.png")]),
        ("tie.png", lambda: [tie_job(grids, out)]),
        ("tsne_*.png", lambda: tsne_jobs(grids, out)),
    )
