"""The report end to end on a real small grid: intervals, seeds, format-align, error analysis, the page in a browser.

The world: images on disk (dataset ``gan`` with a format shortcut, reals JPEG
and fakes PNG; dataset ``clean`` without), its manifest and audits (as the
files are, and format-aligned), feature stores recording that data root
(features made here, no backbone), a grid of two configs x two seeds fitted
by ``run_grid`` with a center and a format-aligned test entry, then
``pipeline report``. Expectations are recomputed from the files with the csv
module, numpy, scikit-learn and Pillow.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score

from conftest import read_csv_rows
from pipeline import cache
from pipeline.cli import main
from pipeline.features import AuditConfig, Manifest, ManifestRow, run_audit, write_manifest
from pipeline.heads import FitConfig, parse_grid, run_grid
from pipeline.names import DEFAULT_RESAMPLES, FORMAT_ALIGN
from pipeline.report import ReportConfig, run_report
from pipeline.report.gallery import DEFAULT_GALLERY_SIZE
from pipeline.report.reading import IDENTIFYING
from pipeline.results.bootstrap import BootstrapConfig, bootstrap_set

pytestmark = pytest.mark.slow

CROP = 32
SIZES = ((24, 24), (48, 40), (80, 96))  # shorter side < crop, in [crop, 2 crop), in [2 crop, 4 crop)
RESAMPLES = 200
N_BLOCKS, DIM = 3, 12
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def pct(fraction: float) -> str:
    """How the report writes a fraction: percent with one decimal."""
    return f"{round(100 * fraction, 1):.1f}"


def scene(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([rng.uniform(40, 215) + rng.uniform(-60, 60) * (x + y) for _ in range(3)], -1)
    return np.clip(base + rng.normal(0, rng.uniform(2, 30), base.shape), 0, 255).astype(np.uint8)


def write_images(root: Path) -> Manifest:
    """Dataset gan: reals JPEG, fakes PNG (a format shortcut); dataset clean: both labels both formats."""
    rows = []
    for dataset in ("gan", "clean"):
        for index in range(24):
            label = index % 2
            as_jpeg = label == 0 if dataset == "gan" else (index // 2) % 2 == 0
            relative = f"{dataset}/{label}_{index:03d}." + ("jpg" if as_jpeg else "png")
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(scene(index + 100 * (dataset == "gan"), SIZES[(index // 2) % 3]))
            image.save(root / relative, **({"quality": 90} if as_jpeg else {}))
            rows.append(ManifestRow(relative, label, dataset))
    return Manifest("test", tuple(rows), root)


def features_for(labels: np.ndarray, seed: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(7).standard_normal(DIM)
    direction /= np.linalg.norm(direction)
    return (rng.standard_normal((len(labels), N_BLOCKS, DIM)) + shift * labels[:, None, None] * direction).astype(
        np.float32
    )


def write_world_store(path: Path, manifest: Manifest | None, n_rows: int, features: dict, data_root: Path) -> None:
    identity = cache.placeholder_identity(N_BLOCKS, DIM, model_revision="test", crop_size=CROP, max_pixels=10**8,
                                          shard_rows=64, chunk_rows=16)  # fmt: skip
    if manifest is None:
        labels = (np.arange(n_rows) % 2).tolist()
        paths, datasets = [f"progan/{i:04d}.png" for i in range(n_rows)], ["progan"] * n_rows
    else:
        labels = [row.label for row in manifest.rows]
        paths, datasets = [row.path for row in manifest.rows], [row.dataset for row in manifest.rows]
    cache.write_store(path, identity, split=path.stem, labels=labels, paths=paths, datasets=datasets,
                      features=features, extra_attrs={"data_root": str(data_root)})  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    manifest = write_images(data)
    manifest_csv = root / "manifests" / "test.csv"
    write_manifest(manifest, manifest_csv)
    reports = root / "reports"
    for perturbation in (None, FORMAT_ALIGN):
        run_audit(AuditConfig(split="test", manifest=manifest_csv, out=reports, progress=False,
                              perturbation=perturbation))  # fmt: skip
    labels = np.asarray([row.label for row in manifest.rows])
    train_labels = np.arange(120) % 2
    stores = root / "cache"
    write_world_store(stores / "train.zarr", None, 120, {"view_000": features_for(train_labels, 1, 2.5)}, data)
    write_world_store(stores / "val.zarr", None, 40, {"center": features_for(np.arange(40) % 2, 2, 1.5)}, data)
    test_features = {"center": features_for(labels, 3, 1.4), "format-align-q95": features_for(labels, 4, 0.9)}
    write_world_store(stores / "test.zarr", manifest, len(labels), test_features, data)
    grid = f"""
name: world
out: {root / "runs" / "world"}
data:
  train: {{store: {stores / "train.zarr"}}}
  val: {{store: {stores / "val.zarr"}}}
  test:
    - {{store: {stores / "test.zarr"}, name: test}}
    - {{store: {stores / "test.zarr"}, variant: format-align-q95, name: test_aligned}}
base: {{proj_layers: 1, proj_dim: 16, batch_size: 32, epochs: 1}}
grid:
  contrastive_factor: [0.1, 0.8]
  seed: [0, 1]
"""
    grid_dir = run_grid(parse_grid(grid), FitConfig(device="cpu", progress=False)).out
    summary = run_report(
        ReportConfig(grid_dirs=(grid_dir,), out=reports, bootstrap=BootstrapConfig(RESAMPLES), progress=False)
    )
    return {"root": root, "data": data, "grid": grid_dir, "reports": reports, "summary": summary}


def scores_of(grid: Path, run: str, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Dataset -> (labels, scores, paths) read from a run's scores file."""
    grouped: dict[str, tuple[list, list, list]] = {}
    for row in read_csv_rows(grid / "runs" / run / f"scores_{split}.csv"):
        labels, scores, paths = grouped.setdefault(row["dataset"], ([], [], []))
        labels.append(int(row["label"]))
        scores.append(float(row["score"]))
        paths.append(row["path"])
    return {d: (np.array(labels), np.array(scores), paths) for d, (labels, scores, paths) in grouped.items()}


def selected_config_runs(grid: Path) -> set[str]:
    """Every run of a selected config (all its seeds): the runs the report bootstraps by default."""
    results = read_csv_rows(grid / "results.csv")
    factors = {row["contrastive_factor"] for row in read_csv_rows(grid / "selection.csv")}
    return {row["run"] for row in results if row["contrastive_factor"] in factors}


# ----------------------------------------------------------------------------- intervals


def test_metrics_intervals_are_the_bootstrap_of_each_score_file(world) -> None:
    grid, config = world["grid"], BootstrapConfig(RESAMPLES)
    rows = read_csv_rows(world["reports"] / "metrics.csv")
    in_scope = selected_config_runs(grid)
    assert {row["run"] for row in rows if row["acc_ci_low_pct"]} == in_scope
    for row in (row for row in rows if row["run"] in in_scope):
        labels, scores, _ = scores_of(grid, row["run"], row["split"])[row["dataset"]]
        replicates = bootstrap_set(labels, scores, row["dataset"], config)
        acc, ap = accuracy_score(labels, scores > 0.5), average_precision_score(labels, scores)
        for metric, point in (("acc", acc), ("ap", ap)):
            low, high = np.percentile(getattr(replicates, metric), (2.5, 97.5))
            assert (row[f"{metric}_ci_low_pct"], row[f"{metric}_ci_high_pct"]) == (pct(low), pct(high))
            assert low <= point <= high and row[f"{metric}_pct"] == pct(point)


def test_grid_means_have_the_interval_of_the_mean_over_test_sets(world) -> None:
    grid = world["grid"]
    for row in read_csv_rows(world["reports"] / "grid.csv"):
        if row["run"] not in selected_config_runs(grid):
            assert row["mean_acc_ci_low_pct"] == ""
            continue
        per_set = scores_of(grid, row["run"], "test")
        replicates = [
            bootstrap_set(labels, scores, d, BootstrapConfig(RESAMPLES)) for d, (labels, scores, _) in per_set.items()
        ]
        mean_acc = np.mean([r.acc for r in replicates], axis=0)
        assert row["mean_acc_ci_low_pct"] == pct(np.percentile(mean_acc, 2.5))
        assert float(row["mean_acc_ci_low_pct"]) <= float(row["mean_acc_pct"]) <= float(row["mean_acc_ci_high_pct"])
        assert float(row["mean_ap_ci_low_pct"]) <= float(row["mean_ap_pct"]) <= float(row["mean_ap_ci_high_pct"])


def test_intervals_are_reproducible_and_follow_the_seed(world, tmp_path: Path) -> None:
    again = run_report(ReportConfig(grid_dirs=(world["grid"],), out=tmp_path / "a", plots=False, html=False,
                                    bootstrap=BootstrapConfig(RESAMPLES), progress=False))  # fmt: skip
    assert read_csv_rows(again.out / "metrics.csv") == read_csv_rows(world["reports"] / "metrics.csv")
    other = run_report(ReportConfig(grid_dirs=(world["grid"],), out=tmp_path / "b", plots=False, html=False,
                                    bootstrap=BootstrapConfig(RESAMPLES, seed=5), bootstrap_all=True, progress=False))  # fmt: skip
    rows = read_csv_rows(other.out / "metrics.csv")
    assert all(row["acc_ci_low_pct"] for row in rows)  # --bootstrap-all: every run
    assert [r["ap_ci_low_pct"] for r in rows] != [r["ap_ci_low_pct"] for r in read_csv_rows(again.out / "metrics.csv")]


# ----------------------------------------------------------------------------- seeds and format-align


def test_seeds_table_gives_mean_and_std_over_seeds_per_config(world) -> None:
    results = [row for row in read_csv_rows(world["grid"] / "results.csv") if row["status"] == "ok"]
    seeds = read_csv_rows(world["reports"] / "seeds.csv")
    assert {row["contrastive_factor"] for row in seeds} == {"0.1", "0.8"}
    assert {(row["n_seeds"], row["seeds"]) for row in seeds} == {("2", "0+1")}
    for row in seeds:
        if row["dataset"] == "avg":
            continue
        values = [r for r in results if r["contrastive_factor"] == row["contrastive_factor"]
                  and r["variant"] == row["variant"] and r["dataset"] == row["dataset"] and r["split"] != "val"]  # fmt: skip
        accs = [float(r["acc"]) for r in values]
        assert len(accs) == 2
        assert row["acc_mean_pct"] == pct(np.mean(accs))
        assert row["acc_std_pct"] == pct(np.std(accs, ddof=1))
    averages = [row for row in seeds if row["dataset"] == "avg"]
    assert len(averages) == 2 and all(row["variant"] == "" for row in averages)
    settings = {row["setting_id"]: row["setting"] for row in read_csv_rows(world["reports"] / "settings.csv")}
    for row in read_csv_rows(world["reports"] / "acc.csv"):  # a selected config: the mean over its seeds
        assert row["seeds"] == "0+1" and "seed=" not in settings[row["setting_id"]]
        for dataset in ("gan", "clean"):
            accs = [float(r["acc"]) for r in results if r["contrastive_factor"] == row["contrastive_factor"]
                    and r["split"] == "test" and r["dataset"] == dataset]  # fmt: skip
            assert row[dataset] == f"{100 * np.mean(accs):.1f}"


def test_format_align_table_compares_center_with_the_aligned_copy(world) -> None:
    selection = read_csv_rows(world["grid"] / "selection.csv")
    results = [row for row in read_csv_rows(world["grid"] / "results.csv") if row["status"] == "ok"]
    table = read_csv_rows(world["reports"] / "format_align.csv")
    assert {row["run"] for row in table} == {row["run"] for row in selection}
    for row in table:
        factor = next(s["contrastive_factor"] for s in selection if s["run"] == row["run"])
        sets = ["clean", "gan"] if row["dataset"] == "avg" else [row["dataset"]]
        mine = [r for r in results if r["contrastive_factor"] == factor and r["dataset"] in sets]  # both seeds
        center, aligned = (
            np.mean([float(r["acc"]) for r in mine if r["variant"] == variant])
            for variant in ("center", "format-align-q95")
        )
        assert row["acc_center_pct"] == pct(center) and row["acc_aligned_pct"] == pct(aligned)
        assert float(row["acc_change_pts"]) == pytest.approx(100 * (aligned - center), abs=0.051)


def test_robustness_table_leaves_format_align_to_its_own_table(world) -> None:
    assert not (world["reports"] / "robustness.csv").exists()
    assert any(item.name == "robustness.csv" for item in world["summary"].skipped)


# ----------------------------------------------------------------------------- error analysis


def test_error_analysis_counts_errors_by_label_size_and_format(world) -> None:
    grid, data = world["grid"], world["data"]
    table = read_csv_rows(world["reports"] / "errors.csv")
    selected = {row["run"] for row in read_csv_rows(grid / "selection.csv")}
    assert {row["run"] for row in table} == selected
    for run in selected:
        for split in ("test", "test_aligned"):
            for dataset, (labels, scores, paths) in scores_of(grid, run, split).items():
                wrong = (scores > 0.5) != (labels == 1)
                images = [Image.open(data / path) for path in paths]
                sides = np.array([min(image.size) for image in images])
                formats = [image.format for image in images]
                if split == "test_aligned":  # the format the detector saw: every image re-encoded as one JPEG
                    formats = [f"JPEG q95 (was {original})" for original in formats]
                buckets = {
                    "label": np.where(labels == 1, "fake", "real"),
                    "format": np.array(formats),
                    "size": np.select([sides < CROP, sides < 2 * CROP, sides < 4 * CROP],
                                      [f"< {CROP} (padded)", f"{CROP}-{2 * CROP - 1}", f"{2 * CROP}-{4 * CROP - 1}"],
                                      f">= {4 * CROP}"),
                }  # fmt: skip
                mine = [r for r in table if (r["run"], r["split"], r["dataset"]) == (run, split, dataset)]
                for facet, values in buckets.items():
                    expected = {b: (int((values == b).sum()), int(wrong[values == b].sum())) for b in set(values)}
                    got = {r["bucket"]: (int(r["n"]), int(r["n_errors"])) for r in mine if r["facet"] == facet}
                    assert got == expected, (run, split, dataset, facet)
                    for r in (r for r in mine if r["facet"] == facet):
                        if wrong.sum():
                            assert r["share_of_errors_pct"] == pct(int(r["n_errors"]) / wrong.sum())
                        assert r["share_of_images_pct"] == pct(int(r["n"]) / len(labels))


def test_error_analysis_says_unknown_without_audit_or_data(world, tmp_path: Path) -> None:
    moved = tmp_path / "grid"
    shutil.copytree(world["grid"], moved)
    for config_file in moved.glob("runs/*/config.yaml"):
        config_file.unlink()  # the stores can no longer be found: no data root
    summary = run_report(ReportConfig(grid_dirs=(moved,), out=tmp_path / "out", plots=False,
                                      bootstrap=BootstrapConfig(0), progress=False))  # fmt: skip
    rows = read_csv_rows(summary.out / "errors.csv")
    assert {r["bucket"] for r in rows if r["facet"] == "size"} == {"unknown"}
    # the detector saw the format-aligned JPEG whatever the file was
    assert {(r["split"], r["bucket"]) for r in rows if r["facet"] == "format"} == {
        ("test", "unknown"),
        ("test_aligned", "JPEG q95 (was unknown)"),
    }
    assert {row["acc_ci_low_pct"] for row in read_csv_rows(summary.out / "metrics.csv")} == {""}  # --bootstrap 0: none
    page = (summary.out / "index.html").read_text()
    assert "config.yaml is missing" in page and "no thumbnail" in page


def test_a_missing_score_file_is_named_not_silently_skipped(world, tmp_path: Path) -> None:
    copied = tmp_path / "grid"
    shutil.copytree(world["grid"], copied)
    run = read_csv_rows(copied / "selection.csv")[0]["run"]
    (copied / "runs" / run / "scores_test_aligned.csv").unlink()
    summary = run_report(ReportConfig(grid_dirs=(copied,), out=tmp_path / "out", plots=False,
                                      bootstrap=BootstrapConfig(50), progress=False))  # fmt: skip
    reasons = {item.name: item.reason for item in summary.skipped}
    assert "test_aligned" in reasons[f"intervals of run {run}"]
    rows = read_csv_rows(summary.out / "metrics.csv")
    assert {r["acc_ci_low_pct"] == "" for r in rows if r["run"] == run and r["split"] == "test_aligned"} == {True}
    assert all(r["acc_ci_low_pct"] for r in rows if r["run"] == run and r["split"] == "test")
    assert f"no scores_test_aligned.csv in {copied / 'runs' / run}" in (summary.out / "index.html").read_text()


# ----------------------------------------------------------------------------- the page


class PageParser(html.parser.HTMLParser):
    """Collects the page's tables (data-csv), figures (data-figure), audits, thumbnails and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str] = []
        self.figures: list[str] = []
        self.audits: list[str] = []
        self.thumbnails: list[str] = []
        self.external: list[str] = []
        self.flagged_cells = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table" and values.get("data-csv"):
            self.tables.append(values["data-csv"] or "")
        if tag == "img":
            source = values.get("src") or ""
            if values.get("data-figure"):
                assert source.startswith("data:image/png;base64,")
                self.figures.append(values["data-figure"] or "")
            elif source.startswith("data:image/jpeg;base64,"):
                self.thumbnails.append(source)
        if tag == "h3" and values.get("data-audit"):
            self.audits.append(values["data-audit"] or "")
        for name in ("src", "href"):
            link = values.get(name) or ""
            if link and not link.startswith(("data:", "#")):
                self.external.append(link)
        if "flagged" in (values.get("class") or "").split():
            self.flagged_cells += 1


def test_the_page_holds_every_table_figure_audit_and_the_galleries(world) -> None:
    summary = world["summary"]
    page = world["reports"] / "index.html"
    assert page in summary.written
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    csvs = sorted(path.name for path in summary.written if path.suffix == ".csv")
    pngs = sorted(path.name for path in summary.written if path.suffix == ".png")
    assert {"seeds.csv", "format_align.csv", "errors.csv", "metrics.csv"} <= set(csvs)
    assert sorted(parser.tables) == csvs
    assert sorted(parser.figures) == pngs and any(name.endswith("_scores.png") for name in pngs)
    assert "ranked.png" in pngs  # every config by val ACC against its test mean
    assert parser.audits == ["audit_test.json", "audit_test_format-align-q95.json"]
    assert parser.thumbnails and parser.external == []
    assert parser.flagged_cells > 0
    text = page.read_text(encoding="utf-8")
    assert "gan: format predicts real vs fake" in text and "No dataset flagged." in text
    assert "Worst false positives" in text and "over 2 seeds" in text


# ----------------------------------------------------------------------------- the answer first


def selected_full_run(world) -> dict[str, str]:
    """The run the summary card shows first: the first row of selection.csv (every run of this grid is a full model)."""
    return read_csv_rows(world["grid"] / "selection.csv")[0]


def card_expectations(world, run: str) -> tuple[str, str]:
    """(mean test ACC in percent, '[low, high]') of ``run``: its center test sets from results.csv, its interval from grid.csv."""
    rows = [r for r in read_csv_rows(world["grid"] / "results.csv") if r["run"] == run and r["split"] == "test"]
    grid = next(r for r in read_csv_rows(world["reports"] / "grid.csv") if r["run"] == run)
    interval = f"[{grid['mean_acc_ci_low_pct']}, {grid['mean_acc_ci_high_pct']}]"
    return pct(np.mean([float(r["acc"]) for r in rows])), interval


def test_the_summary_answers_first_in_summary_md_and_the_last_lines(world) -> None:
    run = selected_full_run(world)
    mean_acc, interval = card_expectations(world, run["run"])
    rules = [r["selection"] for r in read_csv_rows(world["grid"] / "selection.csv") if r["run"] == run["run"]]
    markdown = (world["reports"] / "summary.md").read_text(encoding="utf-8")
    lines = world["summary"].report().splitlines()
    result = lines[lines.index("== result ==") :]
    for text in (markdown, "\n".join(result)):
        assert run["run"] in text and f"ACC {mean_acc} % {interval}" in text
        assert "no comparison with the authors' numbers" in text  # a backbone without published numbers
        assert "audit flag gan (test): format alone predicts the label (AUC 1.000)" in text
        assert ("both rules pick this run: shown once" in text) == (len(rules) == 2)
    gan = [r for r in read_csv_rows(world["grid"] / "results.csv") if r["run"] == run["run"] and r["dataset"] == "gan"]
    before, after = (pct(float(r["acc"])) for r in sorted(gan, key=lambda r: r["split"]) if r["split"] != "val")
    assert f"detector ACC {before} % as the files are, {after} % format-align-q95" in markdown
    assert "pipeline report --out" in markdown and "rine-pipeline" in markdown
    assert lines[-1].startswith("details: ") and "summary.md" in lines[-1]


FLOAT = re.compile(r"(?<![\w.+-])-?\d+\.\d+(?:e[-+]?\d+)?(?![\w.])")
ONE_DECIMAL = re.compile(r"^(-?\d+(\.\d)?|nan)?$")


def too_precise(text: str) -> list[str]:
    """Numbers written with more than 4 significant digits (the report's widest stated format)."""
    return [t for t in FLOAT.findall(text) if len(t.lstrip("-").split("e")[0].replace(".", "").lstrip("0")) > 4]


class VisibleText(html.parser.HTMLParser):
    """What a reader sees of a page: text outside scripts and styles, and hover titles."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hidden += tag in ("script", "style")
        self.parts += [value or "" for name, value in attrs if name == "title"]

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def test_no_csv_or_page_number_has_more_than_the_stated_digits(world) -> None:
    reports = world["reports"]
    csvs = sorted(reports.glob("*.csv"))
    assert {"acc.csv", "grid.csv", "metrics.csv", "errors.csv", "seeds.csv", "tie.csv", "audit_test.csv"} <= {
        path.name for path in csvs
    }
    percent_columns = 0
    for path in csvs:
        for row in read_csv_rows(path):
            for column, text in row.items():
                if column.endswith(("_pct", "_pts")) or (path.name == "acc.csv" and column in ("gan", "clean", "avg")):
                    percent_columns += 1
                    assert ONE_DECIMAL.match(text), (path.name, column, text)  # percent: one decimal
                else:
                    assert too_precise(text) == [], (path.name, column, text)  # others: 4 significant digits
    assert percent_columns > 100
    parser = VisibleText()
    parser.feed((reports / "index.html").read_text(encoding="utf-8"))
    assert too_precise(" ".join(parser.parts)) == []
    assert too_precise((reports / "summary.md").read_text(encoding="utf-8")) == []
    assert too_precise(world["summary"].report()) == []


def test_cli_report_without_arguments_reports_every_grid_under_runs(world, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(world["root"])
    result = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "r"), "--no-plots", "--bootstrap", "0",
                                       "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "r")
    result_lines = result.stderr.splitlines()
    assert "== result ==" in result_lines and "test mean over 2 sets ACC" in result.stderr  # the result comes last
    assert result_lines[-1].startswith("details: ")
    assert {row["grid_dir"] for row in read_csv_rows(tmp_path / "r" / "metrics.csv")} == {"runs/world"}
    defaults = {param.name: param.default for param in main.commands["report"].params}
    assert (defaults["resamples"], defaults["gallery_size"]) == (DEFAULT_RESAMPLES, DEFAULT_GALLERY_SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    missing = CliRunner().invoke(main, ["report"])
    assert missing.exit_code == 1 and "runs: no such folder" in missing.output


# ----------------------------------------------------------------------------- in a real browser

SCREEN = (1400, 900)  # the first screen a researcher sees
HARNESS = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="report" src="index.html" style="width:1400px;height:900px;border:0"></iframe><pre id="result">pending</pre>
<script>
document.getElementById("report").addEventListener("load", function () {
  var doc = this.contentDocument, out = {};
  function box(element) {
    if (!element) return null;
    var r = element.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, text: element.textContent.trim()};
  }
  try {
    out.ready = doc.documentElement.getAttribute("data-ready");
    out.errors = Array.from(doc.querySelectorAll("#page-errors li")).map(function (li) { return li.textContent; });
    out.tables = Array.from(doc.querySelectorAll("table[data-csv]")).map(function (t) { return t.getAttribute("data-csv"); });
    out.figures = Array.from(doc.querySelectorAll("img[data-figure]"))
      .filter(function (img) { return img.complete && img.naturalWidth > 0; })
      .map(function (img) { return img.getAttribute("data-figure"); });
    out.thumbnails = Array.from(doc.querySelectorAll("figure.thumb img"))
      .filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
    var card = doc.querySelector("#summary .selected");
    out.card = {run: card.getAttribute("data-run"), config: box(card.querySelector(".config")),
                tiles: Array.from(card.querySelectorAll(".tile.main")).map(function (tile) {
                  return {box: box(tile), value: tile.querySelector(".value").textContent, ci: tile.querySelector(".ci").textContent};
                })};
    var first = doc.querySelector("table[data-csv]");
    out.first_table = first.getAttribute("data-csv");
    out.first_header = Array.from(first.tHead.rows[0].cells).map(function (h) { return [h.textContent, h.getBoundingClientRect().left]; });
    var table = doc.querySelector('table[data-csv="grid.csv"]');
    var headers = Array.from(table.tHead.rows[0].cells);
    var index = headers.findIndex(function (h) { return h.textContent === "mean_acc_pct"; });
    var column = function () { return Array.from(table.tBodies[0].rows).map(function (r) { return Number(r.cells[index].textContent); }); };
    headers[index].click(); out.ascending = column();
    headers[index].click(); out.descending = column();
  } catch (error) { out.exception = String(error); }
  document.getElementById("result").textContent = JSON.stringify(out);
});
</script></body></html>"""


def chromium() -> str:
    found = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    if found is None:
        pytest.skip(
            "headless Chromium not found, so the report page is not checked in a browser: install it "
            "(Debian/Ubuntu, as root: apt-get install -y chromium; .ci/run does this) to run this test"
        )
    return found


def browse(browser: str, url: str, profile: Path, *options: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", *options, url]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_page_renders_in_headless_chromium(world, tmp_path: Path) -> None:
    browser = chromium()
    reports, summary = world["reports"], world["summary"]
    page = (reports / "index.html").as_uri()
    direct = browse(browser, page, tmp_path / "profile-a", "--dump-dom")
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert 'data-ready="1"' in direct.stdout.split("<head>")[0]  # the page's script ran to its end
    console = [line for line in direct.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console  # no console message at all: no error, no warning

    (reports / "harness.html").write_text(HARNESS, encoding="utf-8")
    harness = browse(browser, (reports / "harness.html").as_uri(), tmp_path / "profile-b", "--dump-dom",
                     "--allow-file-access-from-files")  # fmt: skip
    (reports / "harness.html").unlink()
    result = json.loads(html.unescape(harness.stdout.split('<pre id="result">')[1].split("</pre>")[0]))
    assert "exception" not in result, result
    assert result["ready"] == "1" and result["errors"] == []
    assert sorted(result["tables"]) == sorted(path.name for path in summary.written if path.suffix == ".csv")
    assert sorted(result["figures"]) == sorted(path.name for path in summary.written if path.suffix == ".png")
    assert result["thumbnails"] > 0
    assert result["ascending"] == sorted(result["ascending"]) and result["descending"] == result["ascending"][::-1]

    # The first screen (1,400 x 900) answers: the selected config in words and its test mean with its interval.
    width, height = SCREEN
    card, run = result["card"], selected_full_run(world)
    assert card["run"] == run["run"]
    assert f"xi={float(run['contrastive_factor']):g}" in card["config"]["text"]
    acc, ap = card["tiles"]
    mean_acc, interval = card_expectations(world, run["run"])
    assert (acc["value"], acc["ci"]) == (f"{mean_acc} %", interval)
    for element in (card["config"], acc["box"], ap["box"]):
        assert 0 <= element["top"] and element["bottom"] <= height and element["right"] <= width, element
    # ... and the first results table starts with its metric columns, none beyond the first screen's width.
    assert result["first_table"] == "acc.csv"
    metric_columns = [
        (name, left) for name, left in result["first_header"] if name.lstrip("\u2691 ") not in IDENTIFYING
    ]
    assert [name for name, _ in metric_columns] == ["clean", "gan", "avg"]
    assert all(left < width for _, left in metric_columns), metric_columns

    artefacts = Path(os.environ.get("RINE_TEST_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    for name, size in (("report_page.png", SCREEN), ("report_page_long.png", (width, 3000))):
        screenshot = artefacts / name
        shot = browse(browser, page, tmp_path / f"profile-{name}", f"--screenshot={screenshot}",
                      f"--window-size={size[0]},{size[1]}", "--hide-scrollbars")  # fmt: skip
        assert shot.returncode == 0, shot.stderr[-2000:]
        pixels = np.asarray(Image.open(screenshot).convert("L"))
        assert pixels.shape == (size[1], size[0]) and pixels.std() > 10  # a drawn page, not a blank one
