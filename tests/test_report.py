"""Tests of pipeline.report / pipeline.results.reference on small grid folders built here.

The builder writes per-image score CSVs first and derives results.csv and
selection.csv from them (scikit-learn), in the format documented in
pipeline/results.py, spelled out here independently. The checks recompute
every expected number from the saved score files and from the packaged
reference CSVs read with the csv module (not through pipeline.results.reference).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import html.parser
import json
import math
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from conftest import read_csv_rows
from pipeline.heads import RunConfig
from pipeline.report import ReportConfig, ReportError, run_report
from pipeline.results import reference
from pipeline.results.metrics import METRIC_NAMES

PAPER_ORDER = (
    "progan stylegan stylegan2 biggan cyclegan stargan gaugan deepfake sitd san crn imle guided ldm_200 "
    "ldm_200_cfg ldm_100 glide_100_27 glide_50_27 glide_100_10 dalle"
).split()
SYNTHBUSTER = ("dalle2 dalle3 stable-diffusion-1-3 stable-diffusion-1-4 stable-diffusion-2 stable-diffusion-xl glide "
               "firefly midjourney-v5").split()  # fmt: skip
LARGE, BASE = "openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32"
SEARCHED = ("contrastive_factor", "proj_layers", "proj_dim")
SETTING = ("epochs", "batch_size", "lr", "lr_milestones", "classes", "n_classes", "train_fraction", "head_blocks",
           "aggregation", "seed", "amp")  # fmt: skip
METRIC_COLUMNS = ("acc", "ap", "auc", "real_acc", "fake_acc", "oracle_acc", "oracle_threshold", "calibrated_acc",
                  "calibrated_threshold")  # fmt: skip
RESULTS_HEADER = ("run", "status", "error", "grid", "model", "tap", "train", *SEARCHED, *SETTING, "n_params",
                  "fit_seconds", "views_used", "views_reused", "split", "variant", "dataset", "n", "n_invalid",
                  *METRIC_COLUMNS)  # fmt: skip
SELECTION_HEADER = ("selection", "run", "grid", "model", "tap", "train", *SEARCHED, *SETTING, "val_acc", "val_ap",
                    "mean_acc", "mean_ap", "n_mean_sets", "excluded_from_mean", "n_seeds", "seeds", "mean_acc_std",
                    "mean_ap_std")  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_BLOCKS = 6


# ----------------------------------------------------------------------------- grid folder builder


@dataclass(frozen=True)
class RunSpec:
    factor: float
    layers: int
    dim: int
    quality: float  # how far fake scores sit from real ones
    epochs: int = 1
    fraction: float = 1.0
    head_blocks: str = "all"
    aggregation: str = "tie"
    perturbed: tuple[str, ...] = ()
    fails: bool = False
    head: bool = False  # write head.safetensors (TIE) and embeddings.npz


def fmt(value) -> str:
    return ("nan" if math.isnan(value) else repr(float(value))) if isinstance(value, float) else str(value)


def row_metrics(labels: np.ndarray, scores: np.ndarray, calibrated: float | None) -> dict[str, float]:
    fake = labels == 1
    cuts = np.concatenate((np.unique(scores), [np.inf]))
    accuracies = [np.mean((scores >= cut) == fake) for cut in cuts]
    return {
        "acc": accuracy_score(labels, scores > 0.5),
        "ap": average_precision_score(labels, scores),
        "auc": roc_auc_score(labels, scores),
        "real_acc": float(np.mean(scores[~fake] <= 0.5)),
        "fake_acc": float(np.mean(scores[fake] > 0.5)),
        "oracle_acc": float(max(accuracies)),
        "oracle_threshold": float(cuts[int(np.argmax(accuracies))]),
        "calibrated_acc": math.nan if calibrated is None else float(np.mean((scores >= calibrated) == fake)),
        "calibrated_threshold": math.nan if calibrated is None else calibrated,
    }


def make_scores(rng: np.random.Generator, dataset: str, quality: float) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(30, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    shift = rng.normal(0, 0.4)
    logits = rng.normal((2 * labels - 1) * quality + shift, 1.0)
    return labels, 1 / (1 + np.exp(-logits))


def write_csv_file(path: Path, header, rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def paper_mean(values: dict[str, float]) -> float:
    """The 20-set rule: the paper's sets when any is present, else every set."""
    keys = [d for d in values if d in PAPER_ORDER] or list(values)
    return float(np.mean([values[d] for d in keys]))


def write_head_files(run_dir: Path, rng: np.random.Generator, dim: int, tests: list[str]) -> None:
    from safetensors.numpy import save_file

    alpha = rng.normal(size=(1, N_BLOCKS, dim)).astype(np.float32)
    save_file(
        {"alpha": alpha},
        str(run_dir / "head.safetensors"),
        metadata={"store_blocks": json.dumps(list(range(N_BLOCKS)))},
    )
    n = 12 * len(tests)
    labels = np.tile([0, 1], n // 2).astype(np.int8)
    z = rng.normal(size=(n, 8)) + 2.0 * labels[:, None]
    np.savez(run_dir / "embeddings.npz", z=z.astype(np.float32), label=labels, dataset=np.repeat(tests, 12),
             split=np.full(n, "test"), path=np.array([f"{i}.png" for i in range(n)]))  # fmt: skip


def build_grid(root: Path, name: str, model: str, classes: str, specs: list[RunSpec], tests: list[str], seed: int,
               train: str = "train_4class", test_variant: str = "center") -> Path:  # fmt: skip
    """A grid output folder: results.csv, selection.csv, runs/<id>/scores_*.csv (scores first, metrics from them)."""
    rng = np.random.default_rng(seed)
    out = root / name
    results: list[dict[str, object]] = []
    summaries: list[dict[str, object]] = []
    for spec in specs:
        rid = hashlib.sha1(f"{name}{spec}".encode()).hexdigest()[:12]
        values = {
            "contrastive_factor": fmt(spec.factor), "proj_layers": spec.layers, "proj_dim": spec.dim,
            "epochs": spec.epochs, "batch_size": 128, "lr": "0.001", "lr_milestones": "6+11", "classes": classes,
            "n_classes": "" if classes == "all" else len(classes.split("+")), "train_fraction": fmt(spec.fraction),
            "head_blocks": spec.head_blocks, "aggregation": spec.aggregation, "seed": 0, "amp": "none",
        }  # fmt: skip
        base = {"run": rid, "grid": name, "model": model, "tap": "ln2", "train": train, **values}
        if spec.fails:
            results.append({**base, "status": "error", "error": "RuntimeError: out of memory"})
            continue
        base.update(status="ok", error="", n_params=1000 + spec.dim * spec.layers, fit_seconds=round(rng.uniform(1, 9), 4),
                    views_used=1, views_reused=spec.epochs - 1)  # fmt: skip
        run_dir = out / "runs" / rid
        run_dir.mkdir(parents=True)
        if spec.head:
            write_head_files(run_dir, rng, spec.dim, tests)
        splits = [("val", "center", ["progan"]), ("test", test_variant, tests)]
        splits += [(f"test_{variant}", variant, tests) for variant in spec.perturbed]
        key = tuple(str(base[c]) for c in ("model", "tap", "train", *SETTING))
        summary = {"run": rid, "key": key, "row": base, "val": [], "test": {}}
        for split, variant, datasets in splits:
            score_rows = []
            for dataset in datasets:
                quality = spec.quality * (0.6 if variant not in ("center", "tencrop") else 1.0)
                labels, scores = make_scores(rng, dataset, quality)
                score_rows += [(f"{dataset}/{i:03d}.png", int(label), dataset, repr(float(score)))
                               for i, (label, score) in enumerate(zip(labels, scores))]  # fmt: skip
                metrics = row_metrics(labels, scores, None if split == "val" else 0.5)
                results.append({**base, "split": split, "variant": variant, "dataset": dataset, "n": len(labels),
                                "n_invalid": 0, **metrics})  # fmt: skip
                if split == "val":
                    summary["val"].append((metrics["acc"], metrics["ap"]))
                elif variant in ("center", "tencrop"):
                    summary["test"][dataset] = (metrics["acc"], metrics["ap"])
            write_csv_file(run_dir / f"scores_{split}.csv", ("path", "label", "dataset", "score"), score_rows)
        summaries.append(summary)
    write_csv_file(
        out / "results.csv", RESULTS_HEADER, [[fmt(row.get(c, "")) for c in RESULTS_HEADER] for row in results]
    )
    selection_rows = []
    for key in dict.fromkeys(s["key"] for s in summaries):
        candidates = [s for s in summaries if s["key"] == key]
        means = {}
        for s in candidates:
            averaged = [d for d in s["test"] if d in PAPER_ORDER] or list(s["test"])
            means[s["run"]] = {
                "val_acc": np.mean([a for a, _ in s["val"]]), "val_ap": np.mean([p for _, p in s["val"]]),
                "mean_acc": np.mean([s["test"][d][0] for d in averaged]), "mean_ap": np.mean([s["test"][d][1] for d in averaged]),
                "n_mean_sets": len(averaged), "excluded_from_mean": "+".join(sorted(set(s["test"]) - set(averaged))),
            }  # fmt: skip
        by_val = max(candidates, key=lambda s: (means[s["run"]]["val_acc"], means[s["run"]]["val_ap"]))
        by_test = max(candidates, key=lambda s: means[s["run"]]["mean_acc"] + means[s["run"]]["mean_ap"])
        for rule, chosen in (("best_by_val", by_val), ("best_by_test_mean_acc_ap", by_test)):
            single_seed = {
                "n_seeds": 1,
                "seeds": chosen["row"]["seed"],
                "mean_acc_std": math.nan,
                "mean_ap_std": math.nan,
            }
            row = {"selection": rule, **chosen["row"], **means[chosen["run"]], **single_seed}
            selection_rows.append([fmt(row[c]) for c in SELECTION_HEADER])
    write_csv_file(out / "selection.csv", SELECTION_HEADER, selection_rows)
    return out


MAIN_TESTS = ["dalle", "progan", "my_extra", "guided", "stylegan", "san", "crn"]
STUDY_TESTS = ["progan", "biggan", "deepfake", "guided", "ldm_200", "dalle"]
PERTURBED = ("jpeg-official", "blur-paper")


def build_main_grid(root: Path) -> Path:
    """ViT-L/14, 4 classes, three configs and one failed run; no ablations, no perturbations."""
    specs = [
        RunSpec(0.2, 2, 1024, 1.6, head=True),
        RunSpec(0.1, 4, 128, 1.0, head=True),
        RunSpec(0.8, 1, 256, 1.3),
        RunSpec(0.4, 2, 512, 1.0, fails=True),
    ]
    return build_grid(root, "vitl14-4class", LARGE, "car+cat+chair+horse", specs, MAIN_TESTS, seed=1)


def build_study_grid(root: Path) -> Path:
    """ViT-L/14, 2 classes: epochs 1 and 3, the three ablations, perturbed test variants."""
    specs = [
        RunSpec(0.2, 4, 128, 1.8, perturbed=PERTURBED),
        RunSpec(0.4, 4, 128, 0.9, perturbed=PERTURBED),
        RunSpec(0.2, 4, 128, 1.5, epochs=3, perturbed=PERTURBED),
        RunSpec(0.4, 4, 128, 1.2, epochs=3, perturbed=PERTURBED),
        RunSpec(0.2, 4, 128, 1.1, head_blocks="last"),
        RunSpec(0.4, 2, 256, 1.0, aggregation="mean"),
        RunSpec(0.0, 4, 128, 0.7),
    ]
    return build_grid(root, "vitl14-2class-studies", LARGE, "chair+horse", specs, STUDY_TESTS, seed=2)


def build_fractions_grid(root: Path) -> Path:
    """ViT-L/14, 4 classes, the published config on 20 % and 100 % of the training set."""
    specs = [RunSpec(0.2, 2, 1024, 1.0, fraction=0.2), RunSpec(0.2, 2, 1024, 1.5)]
    return build_grid(root, "vitl14-fractions", LARGE, "car+cat+chair+horse", specs, STUDY_TESTS, seed=4)


def build_ldm_grid(root: Path) -> Path:
    """ViT-L/14 on the LDM training set (no classes), Synthbuster by ten crops, 1 and 3 epochs."""
    specs = [RunSpec(0.2, 4, 1024, 1.0), RunSpec(0.2, 4, 1024, 1.4, epochs=3)]
    return build_grid(
        root, "vitl14-ldm", LARGE, "all", specs, list(SYNTHBUSTER), seed=5, train="train_ldm", test_variant="tencrop"
    )


# ----------------------------------------------------------------------------- independent expectations


def percent(value: float) -> str:
    return f"{round(100 * value, 1):.1f}"


def scores_per_dataset(score_file: Path) -> dict[str, tuple[float, float]]:
    """Dataset -> (accuracy at 0.5, average precision) recomputed from a per-image score file."""
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for row in read_csv_rows(score_file):
        labels, scores = grouped.setdefault(row["dataset"], ([], []))
        labels.append(int(row["label"]))
        scores.append(float(row["score"]))
    return {
        dataset: (accuracy_score(labels, np.array(scores) > 0.5), average_precision_score(labels, scores))
        for dataset, (labels, scores) in grouped.items()
    }


def packaged_reference(name: str) -> list[dict[str, str]]:
    with (resources.files("pipeline.results") / "data" / name).open("r", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def packaged_grid_scores(
    backbone: str, n_classes: int, factor: float, layers: int, dim: int
) -> dict[str, tuple[float, float]]:
    return {
        row["dataset"]: (float(row["acc"]), float(row["ap"]))
        for row in packaged_reference("rine_official_grid.csv")
        if row["backbone"] == backbone and int(row["classes"]) == n_classes and float(row["contrastive_factor"]) == factor
        and int(row["proj_layers"]) == layers and int(row["proj_dim"]) == dim
    }  # fmt: skip


def merged_rules(selections: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(rules joined by '+', run) per selected run, in first-appearance order: one row when two rules pick one run."""
    rules: dict[str, list[str]] = {}
    for row in selections:
        rules.setdefault(row["run"], []).append(row["selection"])
    return [("+".join(chosen), run) for run, chosen in rules.items()]


def expected_percent_row(per_dataset: dict[str, tuple[float, float]], index: int, columns: list[str]) -> dict[str, str]:
    expected = {
        d: percent(v[index]) if d in per_dataset else "" for d, v in ((d, per_dataset.get(d, (0, 0))) for d in columns)
    }
    expected["avg"] = percent(paper_mean({d: v[index] for d, v in per_dataset.items()}))
    return expected


def run_folders(*grids: Path) -> dict[str, Path]:
    return {folder.name: folder for grid in grids for folder in (grid / "runs").iterdir()}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def grids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    root = tmp_path_factory.mktemp("grids")
    return build_main_grid(root), build_study_grid(root), build_fractions_grid(root), build_ldm_grid(root)


@pytest.fixture(scope="module")
def report(grids, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report")
    return run_report(ReportConfig(grid_dirs=grids, out=out, plots=True))


# ----------------------------------------------------------------------------- reference data


def test_reference_loaders_parse_every_row() -> None:
    grid = reference.load_reference_grid()
    shared = packaged_reference("rine_official_grid.csv")
    assert len(grid) == len(shared) == 5760
    assert (grid[7].backbone, grid[7].n_classes, grid[7].dataset, grid[7].acc, grid[7].ap) == (
        shared[7]["backbone"], int(shared[7]["classes"]), shared[7]["dataset"], float(shared[7]["acc"]), float(shared[7]["ap"])
    )  # fmt: skip
    assert len(reference.load_reference_ablations()) == len(packaged_reference("rine_official_ablations.csv")) == 180
    perturbations = reference.load_reference_perturbations()
    assert len(perturbations) == 300
    assert {row.our_perturbation for row in perturbations} == {"blur", "crop", "jpeg", "noise", "combined"}
    assert reference.PAPER_DATASETS == tuple(row.dataset for row in grid[:20])  # the authors' order in their results
    assert [row.dataset for row in grid[:20]] == PAPER_ORDER


def test_non_gan_follows_the_authors_folder_name_rule() -> None:
    folders = {"sitd": "seeingdark"}  # the only test set whose folder differs from its name
    assert reference.NON_GAN_DATASETS == tuple(d for d in PAPER_ORDER if "gan" not in folders.get(d, d))
    assert len(reference.NON_GAN_DATASETS) == 13


def test_published_best_is_the_spec_for_vitl14_and_the_grid_argmax_for_vitb32() -> None:
    per_config: dict[tuple, list[tuple[float, float]]] = {}
    for row in packaged_reference("rine_official_grid.csv"):
        key = (row["backbone"], int(row["classes"]), float(row["contrastive_factor"]), int(row["proj_layers"]),
               int(row["proj_dim"]))  # fmt: skip
        per_config.setdefault(key, []).append((float(row["acc"]), float(row["ap"])))
    for backbone in ("ViT-L/14", "ViT-B/32"):
        for n_classes in (1, 2, 4):
            keys = [k for k in per_config if k[:2] == (backbone, n_classes)]
            best = max(
                keys, key=lambda k: np.mean([a for a, _ in per_config[k]]) + np.mean([p for _, p in per_config[k]])
            )
            assert tuple(reference.PUBLISHED_BEST[(backbone, n_classes)]) == best[2:]
    assert reference.PUBLISHED_BEST[("ViT-L/14", 1)] == (0.1, 4, 1024)
    assert reference.PUBLISHED_BEST[("ViT-L/14", 2)] == (0.2, 4, 128)
    assert reference.PUBLISHED_BEST[("ViT-L/14", 4)] == (0.2, 2, 1024)


def test_backbone_name_of_hub_ids_and_local_folders() -> None:
    assert reference.backbone_name(LARGE) == "ViT-L/14"
    assert reference.backbone_name(BASE) == "ViT-B/32"
    assert reference.backbone_name("/models/clip-vit-base-patch32/") == "ViT-B/32"
    assert reference.backbone_name("/models/tiny-clip") is None


# ----------------------------------------------------------------------------- acc.csv / ap.csv


def test_acc_and_ap_tables_match_a_recomputation_from_the_score_files(grids, report) -> None:
    folders = run_folders(*grids)
    selections = [row for grid in grids for row in read_csv_rows(grid / "selection.csv")]
    # Architecture-ablation settings go to ablations.csv, not to Tables 2/3.
    # The LDM setting (scored by ten crops on Synthbuster) goes to ldm.csv.
    selections = [row for row in selections if row["head_blocks"] != "last" and row["aggregation"] != "mean"
                  and row["train"] != "train_ldm"]  # fmt: skip
    assert selections
    selections.sort(key=lambda row: int(row["n_classes"]))  # rows are grouped by (backbone, n_classes)
    for name, index in (("acc.csv", 0), ("ap.csv", 1)):
        table = read_csv_rows(report.out / name)
        ours = [row for row in table if row["source"] == "ours"]
        assert [(r["selection"], r["run"]) for r in ours] == merged_rules(selections)
        columns = [c for c in table[0] if c in PAPER_ORDER or c == "my_extra"]
        for row in ours:
            per_dataset = scores_per_dataset(folders[row["run"]] / "scores_test.csv")
            expected = expected_percent_row(per_dataset, index, columns)
            assert {c: row[c] for c in [*columns, "avg"]} == expected, (name, row["run"])
            assert row["backbone"] == "ViT-L/14" and row["tap"] == "ln2"


def test_dataset_columns_are_in_paper_order_with_extras_last(report) -> None:
    for name in ("acc.csv", "ap.csv"):
        with (report.out / name).open(newline="") as handle:
            header = next(csv.reader(handle))
        # Metric columns first: the authors' rows bring all 20 paper sets; our extra set comes after them, then the
        # average (20-set rule); then the columns that say which model a row is.
        assert header == [*PAPER_ORDER, "my_extra", "avg", "source", "backbone", "tap", "n_classes", "setting_id",
                          "selection", "run", "contrastive_factor", "proj_layers", "proj_dim", "seeds",
                          "excluded_from_avg"]  # fmt: skip
    acc = read_csv_rows(report.out / "acc.csv")
    assert {row["excluded_from_avg"] for row in acc if row["source"] == "ours" and row["my_extra"]} == {"my_extra"}
    assert {row["excluded_from_avg"] for row in acc if row["source"] == "authors"} == {""}


def test_authors_rows_equal_the_shared_reference_numbers(report) -> None:
    acc, ap = read_csv_rows(report.out / "acc.csv"), read_csv_rows(report.out / "ap.csv")
    authors = [(a, p) for a, p in zip(acc, ap) if a["source"] == "authors"]
    # Our grids are ViT-L/14 4-class and 2-class; the published config is also the authors' best by test.
    assert [(a["n_classes"], a["selection"]) for a, _ in authors] == [("2", "published"), ("4", "published")]
    for a, p in authors:
        factor, layers, dim = float(a["contrastive_factor"]), int(a["proj_layers"]), int(a["proj_dim"])
        shared = packaged_grid_scores("ViT-L/14", int(a["n_classes"]), factor, layers, dim)
        assert len(shared) == 20
        for row, index in ((a, 0), (p, 1)):
            assert {c: row[c] for c in [*PAPER_ORDER, "avg"]} == expected_percent_row(shared, index, PAPER_ORDER)
            assert row["my_extra"] == ""
    four_class = next((a, p) for a, p in authors if a["n_classes"] == "4")
    assert (four_class[0]["contrastive_factor"], four_class[0]["proj_layers"], four_class[0]["proj_dim"]) == (
        "0.2",
        "2",
        "1024",
    )
    assert (four_class[0]["avg"], four_class[1]["avg"]) == ("91.5", "98.8")


class TableCells(html.parser.HTMLParser):
    """The cells of one table of the page (by its data-csv name): header, then rows of (text, style, title)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.inside, self.cell = name, False, None
        self.header: list[str] = []
        self.rows: list[list[tuple[str, str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table":
            self.inside = values.get("data-csv") == self.name
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = [tag, "", values.get("style") or "", values.get("title") or ""]

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            kind, text, style, title = self.cell
            if kind == "th":
                self.header.append(text.strip())
            else:
                self.rows[-1].append((text, style, title))
            self.cell = None


def test_the_page_colours_our_values_by_their_difference_with_the_authors(report) -> None:
    """acc.csv in index.html: each of our set values differs from the authors' published row of its setting."""
    cells = TableCells("acc.csv")
    cells.feed((report.out / "index.html").read_text(encoding="utf-8"))
    rows = [dict(zip(cells.header, row)) for row in cells.rows if row]
    assert [row["source"][0] for row in rows] == [row["source"] for row in read_csv_rows(report.out / "acc.csv")]
    coloured = 0
    for row in (row for row in rows if row["source"][0] == "ours"):
        authors = next(r for r in rows if r["source"][0] == "authors" and r["n_classes"][0] == row["n_classes"][0])
        for dataset in [*PAPER_ORDER, "avg"]:
            ours, theirs = row[dataset][0], authors[dataset][0]
            if not ours:
                continue
            delta = float(ours) - float(theirs)
            text, style, title = row[dataset]
            assert title == f"ours {ours} - authors {theirs} = {delta:+.1f} points"
            if abs(delta) >= 0.05:
                assert ("46, 160, 67" if delta > 0 else "218, 54, 51") in style
                coloured += 1
        assert row["my_extra"][1] == ""  # no authors' number: not coloured
    assert coloured > 20


def test_vitb32_authors_rows_use_the_grid_best(tmp_path: Path) -> None:
    grid = build_grid(tmp_path, "vitb32-1class", BASE, "horse", [RunSpec(0.1, 2, 512, 1.2)], ["progan"], seed=3)
    summary = run_report(ReportConfig(grid_dirs=(grid,), out=tmp_path / "out", plots=False))
    authors = [row for row in read_csv_rows(summary.out / "acc.csv") if row["source"] == "authors"]
    assert [
        (r["backbone"], r["selection"], r["contrastive_factor"], r["proj_layers"], r["proj_dim"]) for r in authors
    ] == [("ViT-B/32", "published", "0.1", "2", "512")]
    shared = packaged_grid_scores("ViT-B/32", 1, 0.1, 2, 512)
    assert authors[0]["avg"] == percent(np.mean([a for a, _ in shared.values()])) == "77.7"


# ----------------------------------------------------------------------------- other tables


def test_best_table_lists_each_selection_with_size_and_time(grids, report) -> None:
    results = {(r["run"]): r for grid in grids for r in read_csv_rows(grid / "results.csv") if r["status"] == "ok"}
    selections = [row for grid in grids for row in read_csv_rows(grid / "selection.csv")]  # best.csv keeps input order
    best = read_csv_rows(report.out / "best.csv")
    settings = {row["setting_id"]: row["setting"] for row in read_csv_rows(report.out / "settings.csv")}
    assert [(r["selection"], r["run"]) for r in best] == merged_rules(selections)
    for row in best:
        source = results[row["run"]]
        for column in (
            "train",
            "contrastive_factor",
            "proj_layers",
            "proj_dim",
            "n_params",
            "n_classes",
        ):
            assert row[column] == source[column], column
        assert row["fit_seconds"] == f"{float(source['fit_seconds']):.4g}"
        assert f"epochs={source['epochs']}" in settings[row["setting_id"]].split()
        if row["train"] == "train_ldm":
            assert row["published_proj_dim"] == ""
            continue
        assert (row["backbone"], row["tap"]) == ("ViT-L/14", "ln2")
        published = reference.PUBLISHED_BEST[("ViT-L/14", int(row["n_classes"]))]
        assert float(row["published_contrastive_factor"]) == published[0]
        assert (int(row["published_proj_layers"]), int(row["published_proj_dim"])) == published[1:]


def test_grid_and_metrics_tables_cover_every_ok_run(grids, report) -> None:
    folders = run_folders(*grids)
    ok_rows = [(grid, r) for grid in grids for r in read_csv_rows(grid / "results.csv") if r["status"] == "ok"]
    table = read_csv_rows(report.out / "grid.csv")
    assert sorted(r["run"] for r in table) == sorted({r["run"] for _, r in ok_rows}) == sorted(folders)
    # every field of a run's config is a column (calibration was once left out), as results.csv wrote it
    assert {f.name for f in dataclasses.fields(RunConfig)} <= set(table[0])
    written = {r["run"]: r for _, r in ok_rows}
    assert all(row["calibration"] == written[row["run"]].get("calibration", "none") for row in table)
    for row in table:
        test = scores_per_dataset(folders[row["run"]] / "scores_test.csv")
        val = scores_per_dataset(folders[row["run"]] / "scores_val.csv")
        assert row["mean_acc_pct"] == percent(paper_mean({d: a for d, (a, _) in test.items()}))
        assert row["mean_ap_pct"] == percent(paper_mean({d: p for d, (_, p) in test.items()}))
        assert row["excluded_from_mean"] == ("my_extra" if "my_extra" in test else "")
        assert row["val_acc_pct"] == percent(val["progan"][0])
    metrics = read_csv_rows(report.out / "metrics.csv")
    assert len(metrics) == len(ok_rows)
    assert "status" not in metrics[0] and "error" not in metrics[0]
    assert list(metrics[0])[:6] == ["acc_pct", "acc_ci_low_pct", "acc_ci_high_pct", "ap_pct", "ap_ci_low_pct",
                                    "ap_ci_high_pct"]  # fmt: skip
    for (grid, source), row in zip(ok_rows, metrics):
        assert row["grid_dir"] == str(grid)
        for column in (c for c in source if c not in ("status", "error")):
            text = source[column]
            if column.endswith("_threshold") or column in ("brier", "fit_seconds"):  # 4 significant digits
                assert row[column] == ("nan" if text == "nan" else f"{float(text):.4g}"), column
            elif column in METRIC_NAMES:  # rates: percent with one decimal
                assert row[f"{column}_pct"] == ("nan" if text == "nan" else percent(float(text))), column
            else:
                assert row[column] == text, column


def test_ablations_table_compares_each_ablation_with_the_full_model(grids, report) -> None:
    folders = run_folders(*grids)
    study = {r["run"]: r for r in read_csv_rows(grids[1] / "results.csv")}
    table = read_csv_rows(report.out / "ablations.csv")
    ours = [row for row in table if row["source"] == "ours"]
    assert [row["variant"] for row in ours] == ["full", "without_intermediate", "without_tie", "without_contrastive"]
    full = ours[0]
    best_by_test = next(r for r in read_csv_rows(grids[1] / "selection.csv")
                        if r["selection"] == "best_by_test_mean_acc_ap" and r["epochs"] == "1" and r["head_blocks"] == "all"
                        and r["aggregation"] == "tie")  # fmt: skip
    assert full["run"] == best_by_test["run"]
    assert (full["contrastive_factor"], full["proj_layers"], full["proj_dim"]) == ("0.2", "4", "128")
    assert study[ours[1]["run"]]["head_blocks"] == "last" and "same hyper-params" in ours[1]["note"]
    assert (
        study[ours[2]["run"]]["aggregation"] == "mean"
        and "no run with the full model's hyper-params" in ours[2]["note"]
    )
    assert float(study[ours[3]["run"]]["contrastive_factor"]) == 0 and "same hyper-params" in ours[3]["note"]
    assert [row["same_hyper_as_full"] for row in ours] == ["yes", "yes", "no", "yes"]
    non_gan = [d for d in PAPER_ORDER if "gan" not in d]
    for row in ours:
        per_dataset = scores_per_dataset(folders[row["run"]] / "scores_test.csv")
        subset = [v for d, v in per_dataset.items() if d in non_gan]
        assert len(subset) == 4
        assert (row["acc_all_pct"], row["ap_all_pct"]) == (percent(np.mean([a for a, _ in per_dataset.values()])),
                                                           percent(np.mean([p for _, p in per_dataset.values()])))  # fmt: skip
        assert row["acc_non_gan_pct"] == percent(np.mean([a for a, _ in subset]))
        assert row["ap_non_gan_pct"] == percent(np.mean([p for _, p in subset]))

    authors = {row["variant"]: row for row in table if row["source"] == "authors"}
    assert set(authors) == {"full", "without_intermediate", "without_tie", "without_contrastive"}
    shared = {
        f"without_{w}": {r["dataset"]: (float(r["acc"]), float(r["ap"])) for r in packaged_reference("rine_official_ablations.csv")
                         if r["without"] == w and r["classes"] == "2"}
        for w in ("intermediate", "tie", "contrastive")
    }  # fmt: skip
    shared["full"] = packaged_grid_scores("ViT-L/14", 2, 0.2, 4, 128)
    for variant, per_dataset in shared.items():
        row = authors[variant]
        assert (row["n_classes"], row["contrastive_factor"], row["proj_layers"], row["proj_dim"]) == (
            "2",
            "0.2",
            "4",
            "128",
        )
        subset = [v for d, v in per_dataset.items() if d in non_gan]
        assert len(per_dataset) == 20 and len(subset) == 13
        assert row["acc_all_pct"] == percent(np.mean([a for a, _ in per_dataset.values()]))
        assert row["ap_all_pct"] == percent(np.mean([p for _, p in per_dataset.values()]))
        assert row["acc_non_gan_pct"] == percent(np.mean([a for a, _ in subset]))
        assert row["ap_non_gan_pct"] == percent(np.mean([p for _, p in subset]))


def test_robustness_table_has_ours_per_perturbed_variant_and_the_authors(grids, report) -> None:
    folders = run_folders(*grids)
    table = read_csv_rows(report.out / "robustness.csv")
    best_runs = {
        r["run"] for r in read_csv_rows(grids[1] / "selection.csv") if r["selection"] == "best_by_test_mean_acc_ap"
    }
    ours = [row for row in table if row["source"] == "ours"]
    perturbed_best = {row["run"] for row in ours}
    assert (
        perturbed_best <= best_runs and len(perturbed_best) == 2
    )  # epochs 1 and 3 (ablation runs have no perturbations)
    assert {(row["perturbation"], row["preset"]) for row in ours} == {("jpeg", "official"), ("blur", "paper")}
    for row in ours:
        variant = f"{row['perturbation']}-{row['preset']}"
        per_dataset = scores_per_dataset(folders[row["run"]] / f"scores_test_{variant}.csv")
        index = {"acc": 0, "ap": 1}[row["metric"]]
        columns = [d for d in PAPER_ORDER if d in per_dataset]
        assert {c: row[c] for c in [*columns, "avg"]} == expected_percent_row(per_dataset, index, columns)
    authors = [row for row in table if row["source"] == "authors"]
    assert len(authors) == 10  # five perturbations x (acc, ap), 2-class only
    names = {"blur": "blur", "crop": "crop", "compress": "jpeg", "noise": "noise", "combined": "combined"}
    for shared_row in packaged_reference("rine_official_perturbations.csv"):
        if shared_row["classes"] != "2":
            continue
        for metric in ("acc", "ap"):
            row = next(
                r for r in authors if r["perturbation"] == names[shared_row["perturbation"]] and r["metric"] == metric
            )
            assert row["preset"] == "official"
            assert row[shared_row["dataset"]] == percent(float(shared_row[metric]))
    metrics_in_order = [row["metric"] for row in table]
    assert metrics_in_order == sorted(metrics_in_order)  # an ACC block, then an AP block


# ----------------------------------------------------------------------------- plots and skipped outputs


def test_plots_are_non_empty_pngs(grids, report) -> None:
    pngs = sorted(path for path in report.written if path.suffix == ".png")
    names = [path.name for path in pngs]
    full_settings = [
        r for grid in grids for r in read_csv_rows(grid / "selection.csv")
        if r["selection"] == "best_by_test_mean_acc_ap" and r["head_blocks"] == "all" and r["aggregation"] == "tie"
        and float(r["contrastive_factor"]) != 0 and r["train"] != "train_ldm"
    ]  # fmt: skip
    per_dataset = [name for name in names if name.startswith("per_dataset_")]
    # 4-class, 2-class epochs 1 and 3, 4-class fractions 0.2 and 1.0; not the ablation or LDM settings
    assert len(per_dataset) == len(full_settings) == 5
    assert sum("epochs-3" in name for name in per_dataset) == 1
    assert {"hyperparams_box.png", "epochs.png", "fraction.png", "tie.png"} <= set(names)
    assert len([name for name in names if name.startswith("tsne_")]) == 1  # the one selected run with embeddings
    selected = {row["run"] for grid in grids for row in read_csv_rows(grid / "selection.csv")}
    assert {name for name in names if name.startswith("run_")} >= {f"run_{run}_scores.png" for run in selected}
    # no such runs (no seeds, no format-align entry, no per-block probe); no figure failed
    assert {item.name for item in report.skipped} == {"seeds.csv", "format_align.csv", "blocks.csv", "which_block.png"}
    for path in pngs:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path
    assert sorted(report.out.glob("*.png")) == pngs


def test_no_ablation_runs_skips_the_ablation_table_and_plots_off_writes_no_png(grids, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_report(ReportConfig(grid_dirs=(grids[0],), out=out, plots=False))
    skipped = {item.name: item.reason for item in summary.skipped}
    assert "ablation runs" in skipped["ablations.csv"]
    assert "perturbed" in skipped["robustness.csv"]
    assert not (out / "ablations.csv").exists() and not (out / "robustness.csv").exists()
    assert {path.name for path in summary.written} == {
        "acc.csv",
        "ap.csv",
        "best.csv",
        "grid.csv",
        "metrics.csv",
        "tie.csv",
        "errors.csv",
        "detectors.csv",
        "settings.csv",
        "summary.md",
        "index.html",
    }
    assert {"epochs.csv", "fractions.csv", "ldm.csv"} <= set(skipped)
    assert list(out.glob("*.png")) == []
    assert "skipped ablations.csv" in summary.report()


def test_missing_results_or_selection_is_a_clear_error(grids, tmp_path: Path) -> None:
    empty = tmp_path / "runs" / "x"
    empty.mkdir(parents=True)
    with pytest.raises(ReportError, match=r"runs/x: no results\.csv — run `pipeline fit --grid"):
        run_report(ReportConfig(grid_dirs=(empty,), out=tmp_path / "out"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "results.csv").write_bytes((grids[0] / "results.csv").read_bytes())
    with pytest.raises(ReportError, match=r"unfinished: results\.csv without selection\.csv"):
        run_report(ReportConfig(grid_dirs=(unfinished,), out=tmp_path / "out"))
    with pytest.raises(ReportError, match="no such grid folder"):
        run_report(ReportConfig(grid_dirs=(tmp_path / "absent",), out=tmp_path / "out"))


def test_missing_matplotlib_still_writes_every_table(grids, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.report

    monkeypatch.setitem(sys.modules, "pipeline.report.figures", None)  # makes `from . import figures` raise ImportError
    monkeypatch.delattr(pipeline.report, "figures", raising=False)
    summary = run_report(ReportConfig(grid_dirs=grids, out=tmp_path / "out", plots=True))
    assert {path.suffix for path in summary.written} == {".csv", ".md", ".html"} and len(summary.written) == 16
    assert any(item.name == "plots" and "matplotlib" in item.reason for item in summary.skipped)


def test_a_failing_plot_is_reported_not_raised(grids, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.report import figures

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(figures, "plot_hyperparam_boxes", broken)
    summary = run_report(ReportConfig(grid_dirs=(grids[0],), out=tmp_path / "out", plots=True))
    skipped = {item.name: item.reason for item in summary.skipped}
    assert skipped["hyperparams_box.png"] == "plot failed: RuntimeError: boom"
    assert any(path.name.startswith("per_dataset_") for path in summary.written)
    assert (tmp_path / "out" / "acc.csv").is_file()


def test_malformed_inputs_name_the_file_and_line(grids, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "selection.csv").write_bytes((grids[0] / "selection.csv").read_bytes())
    lines = (grids[0] / "results.csv").read_text().splitlines()
    (broken / "results.csv").write_text("\n".join([lines[0].replace(",ap,", ",average_precision,"), *lines[1:]]) + "\n")
    with pytest.raises(ReportError, match=r"broken/results\.csv: missing column\(s\) \['ap'\]"):
        run_report(ReportConfig(grid_dirs=(broken,), out=tmp_path / "out"))
    # The same test set scored twice for one variant (two center test splits) is ambiguous.
    first_ok = next(line for line in lines[1:] if ",ok,," in line and ",test,center," in line)
    (broken / "results.csv").write_text(
        "\n".join([*lines, first_ok.replace(",test,center,", ",test_again,center,")]) + "\n"
    )
    with pytest.raises(ReportError, match=rf"results\.csv:{len(lines) + 1}: run \w+ scores test set .* twice"):
        run_report(ReportConfig(grid_dirs=(broken,), out=tmp_path / "out"))


def test_report_module_does_not_import_matplotlib() -> None:
    import subprocess

    code = "import sys, pipeline.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------------------- the studies: epochs, fractions, LDM


def packaged_runs(name: str) -> dict[tuple, dict[str, tuple[float, float]]]:
    """(backbone, classes, xi, q, d', epochs, fraction) -> dataset -> (acc, ap) of a packaged run file."""
    runs: dict[tuple, dict[str, tuple[float, float]]] = {}
    for row in packaged_reference(name):
        key = (row["backbone"], row.get("classes", ""), float(row["contrastive_factor"]), int(row["proj_layers"]),
               int(row["proj_dim"]), int(row["epochs"]), float(row.get("train_fraction", 1.0)))  # fmt: skip
        runs.setdefault(key, {})[row["dataset"]] = (float(row["acc"]), float(row["ap"]))
    return runs


def test_study_reference_files_have_their_shape_and_agree_with_the_grid_file() -> None:
    grid = packaged_runs("rine_official_grid.csv")
    epochs = packaged_runs("rine_official_epochs.csv")
    assert len(epochs) == 9 * 4 and {key[5] for key in epochs} == {3, 5, 10, 15}
    assert all(list(scores) == PAPER_ORDER for scores in epochs.values())
    # the studied configs are the authors' three best grid configs (mean ACC + mean AP) of each class setting
    for n_classes in ("1", "2", "4"):
        ranked = sorted((key for key in grid if key[1] == n_classes),
                        key=lambda k: -(np.mean([a for a, _ in grid[k].values()]) + np.mean([p for _, p in grid[k].values()])))  # fmt: skip
        studied = {key[:5] for key in epochs if key[1] == n_classes}
        assert studied == {key[:5] for key in ranked[:3]}
        assert reference.best_reference_configs("ViT-L/14", int(n_classes), 3) == [
            reference.HeadConfig(*k[2:5]) for k in ranked[:3]
        ]
    fractions = packaged_runs("rine_official_fractions.csv")
    assert len(fractions) == 3 * 4 and {key[6] for key in fractions} == {0.2, 0.5, 0.8, 1.0}
    for key, scores in fractions.items():
        published = reference.PUBLISHED_BEST[("ViT-L/14", int(key[1]))]
        assert key[2:5] == tuple(published) and key[5] == 1
        if key[6] == 1.0:  # the full training set is the grid's run of the same config (grid file: 6 decimals)
            same = grid[key[:6] + (1.0,)]
            assert all(abs(scores[d][i] - same[d][i]) < 1e-6 for d in PAPER_ORDER for i in (0, 1))
    ldm = packaged_runs("rine_official_ldm.csv")
    assert len(ldm) == 2 * 2 * 2 * 3 and all(list(scores) == SYNTHBUSTER for scores in ldm.values())
    assert {key[2:6] for key in ldm} == {
        (xi, q, d, e) for xi in (0.2, 0.4) for q in (2, 4) for d in (512, 1024) for e in (1, 3, 5)
    }
    # the typed loaders read the same rows
    assert len(reference.load_reference_epochs()) == 720 and len(reference.load_reference_fractions()) == 240
    assert {row.n_classes for row in reference.load_reference_ldm()} == {None} and len(
        reference.load_reference_ldm()
    ) == 216
    study = reference.reference_epochs_study()
    assert len(study) == 9 * 5 and {key.epochs for key in study} == {1, 3, 5, 10, 15}


def study_rows(report, name: str) -> list[dict[str, str]]:
    return read_csv_rows(report.out / name)


def test_epochs_table_has_ours_per_epochs_and_the_authors_top_three(grids, report) -> None:
    table = study_rows(report, "epochs.csv")
    folders = run_folders(*grids)
    ours = [row for row in table if row["source"] == "ours"]
    # the study grid's full models at (0.2, 4, 128) and (0.4, 4, 128), each at 1 and 3 epochs, acc then ap
    assert sorted({(r["contrastive_factor"], r["epochs"]) for r in ours}) == [
        ("0.2", "1"),
        ("0.2", "3"),
        ("0.4", "1"),
        ("0.4", "3"),
    ]
    for row in ours:
        per_dataset = scores_per_dataset(folders[row["run"]] / "scores_test.csv")
        index = {"acc": 0, "ap": 1}[row["metric"]]
        assert {c: row[c] for c in [*STUDY_TESTS, "avg"]} == expected_percent_row(per_dataset, index, STUDY_TESTS)
    authors = [row for row in table if row["source"] == "authors"]
    assert {r["n_classes"] for r in authors} == {"2"}  # only the settings we ran
    assert {(r["contrastive_factor"], r["proj_layers"], r["proj_dim"]) for r in authors} == {
        ("0.2", "4", "128"),
        ("0.4", "4", "128"),
        ("0.8", "4", "128"),
    }
    assert len(authors) == 2 * 3 * 5
    expected = packaged_runs("rine_official_epochs.csv")[("ViT-L/14", "2", 0.8, 4, 128, 10, 1.0)]
    row = next(r for r in authors if (r["contrastive_factor"], r["epochs"], r["metric"]) == ("0.8", "10", "ap"))
    assert {c: row[c] for c in [*PAPER_ORDER, "avg"]} == expected_percent_row(expected, 1, PAPER_ORDER)
    one_epoch = packaged_grid_scores("ViT-L/14", 2, 0.8, 4, 128)
    row = next(r for r in authors if (r["contrastive_factor"], r["epochs"], r["metric"]) == ("0.8", "1", "acc"))
    assert row["avg"] == percent(np.mean([a for a, _ in one_epoch.values()]))


def test_fractions_table_has_ours_per_fraction_and_the_authors(grids, report) -> None:
    table = study_rows(report, "fractions.csv")
    ours = [row for row in table if row["source"] == "ours"]
    assert sorted({r["train_fraction"] for r in ours}) == ["0.2", "1"] and {r["n_classes"] for r in ours} == {"4"}
    authors = [row for row in table if row["source"] == "authors"]
    assert len(authors) == 4 * 2 and {r["train_fraction"] for r in authors} == {"0.2", "0.5", "0.8", "1"}
    expected = packaged_runs("rine_official_fractions.csv")[("ViT-L/14", "4", 0.2, 2, 1024, 1, 0.5)]
    row = next(r for r in authors if (r["train_fraction"], r["metric"]) == ("0.5", "acc"))
    assert {c: row[c] for c in [*PAPER_ORDER, "avg"]} == expected_percent_row(expected, 0, PAPER_ORDER)


def test_ldm_table_averages_the_synthbuster_sets_beside_the_authors(grids, report) -> None:
    table = study_rows(report, "ldm.csv")
    folders = run_folders(*grids)
    ours = [row for row in table if row["source"] == "ours"]
    assert {r["train"] for r in ours} == {"train_ldm"} and sorted({r["epochs"] for r in ours}) == ["1", "3"]
    for row in ours:
        per_dataset = scores_per_dataset(folders[row["run"]] / "scores_test.csv")
        index = {"acc": 0, "ap": 1}[row["metric"]]
        # none of the paper's 20 sets: all nine Synthbuster sets form the mean
        assert row["avg"] == percent(np.mean([v[index] for v in per_dataset.values()]))
        assert row["excluded_from_avg"] == ""
    authors = [row for row in table if row["source"] == "authors"]
    assert len(authors) == 24 * 2
    expected = packaged_runs("rine_official_ldm.csv")[("ViT-L/14", "", 0.2, 4, 1024, 1, 1.0)]
    row = next(r for r in authors if (r["contrastive_factor"], r["proj_layers"], r["proj_dim"], r["epochs"], r["metric"])
               == ("0.2", "4", "1024", "1", "acc"))  # fmt: skip
    assert {c: row[c] for c in SYNTHBUSTER} == {d: percent(a) for d, (a, _) in expected.items()}
    assert row["avg"] == percent(np.mean([a for a, _ in expected.values()]))
    assert not set(SYNTHBUSTER) & set(
        read_csv_rows(report.out / "acc.csv")[0]
    )  # ten-crop LDM runs stay out of Tables 2/3


def test_tie_table_is_the_softmax_of_alpha_per_block_of_the_selected_runs(grids, report) -> None:
    import torch
    from safetensors.torch import load_file

    table = read_csv_rows(report.out / "tie.csv")
    selected = {
        r["run"] for r in read_csv_rows(grids[0] / "selection.csv") if r["selection"] == "best_by_test_mean_acc_ap"
    }
    with_heads = {folder.name for folder in (grids[0] / "runs").iterdir() if (folder / "head.safetensors").is_file()}
    assert {row["run"] for row in table} == selected & with_heads and len(table) == N_BLOCKS * len(
        selected & with_heads
    )
    for run in {row["run"] for row in table}:
        alpha = load_file(str(grids[0] / "runs" / run / "head.safetensors"))["alpha"].double()
        expected = torch.softmax(alpha, dim=1).mean(dim=2).squeeze(0)
        weights = [float(row["weight"]) for row in table if row["run"] == run]
        assert [int(row["block"]) for row in table if row["run"] == run] == list(range(N_BLOCKS))
        assert np.allclose(weights, expected.numpy(), rtol=5e-4, atol=0)  # 4 significant digits
        assert math.isclose(sum(weights), 1.0, abs_tol=1e-3)


def test_tsne_points_are_scikit_learns_tsne() -> None:
    from sklearn.manifold import TSNE

    from pipeline.report.figures import embedding_groups, tsne_points

    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 5))
    expected = TSNE(n_components=2, init="pca", perplexity=13.0, random_state=0).fit_transform(z)
    assert np.allclose(tsne_points(z), expected)
    groups = embedding_groups(np.array([0, 1, 1, 0]), np.array(["progan", "progan", "guided", "guided"]))
    assert {k: v.tolist() for k, v in groups.items()} == {
        "real": [True, False, False, True],
        "fake (GAN)": [False, True, False, False],
        "fake (other)": [False, False, True, False],
    }


# ----------------------------------------------------------------------------- calibration figures


def test_each_selected_run_gets_a_reliability_diagram_and_histograms_marked_with_its_val_thresholds(
    grids, report
) -> None:
    from pipeline.report.analysis import RunSection
    from pipeline.report.inputs import all_runs, read_grid_dir
    from pipeline.report.run_figures import run_jobs
    from pipeline.report.scores import read_run_scores
    from pipeline.results.metrics import best_threshold, choose_thresholds

    names = {path.name for path in report.written}
    selected = {row["run"] for grid in grids for row in read_csv_rows(grid / "selection.csv")}
    assert {f"run_{run}_reliability.png" for run in selected} <= names
    run = next(r for r in all_runs([read_grid_dir(grids[0])]) if r.run in selected)
    tests, _ = read_run_scores(run)
    section = RunSection(run, (), tuple(tests), (), (), (), ())
    jobs = {job[0]: job[1] for job in run_jobs(section, report.out)}
    val = read_csv_rows(run.folder / "scores_val.csv")
    labels, scores = np.array([int(r["label"]) for r in val]), np.array([float(r["score"]) for r in val])
    curves = jobs[f"run_{run.run}_reliability.png"].args[2]
    assert list(curves) == ["val", "test"]
    np.testing.assert_array_equal(curves["val"][0], labels)
    np.testing.assert_array_equal(curves["val"][1], scores)
    test = read_csv_rows(run.folder / "scores_test.csv")
    np.testing.assert_array_equal(curves["test"][1], [float(r["score"]) for r in test])
    thresholds = jobs[f"run_{run.run}_scores.png"].args[3]
    chosen = choose_thresholds(labels, scores)
    assert thresholds["val best acc"] == best_threshold(labels, scores)[0]
    assert (thresholds["val EER"], thresholds["val 1 % FPR"]) == (chosen["eer"].threshold, chosen["fpr1"].threshold)


def test_the_page_header_says_which_precision_the_heads_trained_in(report) -> None:
    from types import SimpleNamespace

    from pipeline.report.html import precision_line

    page = (report.out / "index.html").read_text(encoding="utf-8")
    assert '<span id="precision">heads trained in float32, as the authors</span>' in page

    def grid(*amps: str) -> SimpleNamespace:
        runs = {
            str(i): SimpleNamespace(row=SimpleNamespace(setting=SimpleNamespace(amp=amp))) for i, amp in enumerate(amps)
        }
        return SimpleNamespace(runs=runs)

    assert precision_line([grid("none", "bf16"), grid("bf16")]).startswith("2 of 3 runs trained in bf16 (amp: bf16)")


def test_the_ranked_view_orders_every_config_by_val_and_keeps_the_selected(grids, report) -> None:
    from pipeline.report.analysis import run_key
    from pipeline.report.inputs import read_grid_dir
    from pipeline.report.ranking import MAX_ROWS, ranked_runs

    loaded = [read_grid_dir(grid) for grid in grids]
    ok = {(grid, r["run"]) for grid in grids for r in read_csv_rows(grid / "results.csv") if r["status"] == "ok"}
    selected = {run_key(s.run) for grid in loaded for s in grid.selections}
    runs, total = ranked_runs(loaded, selected)
    assert total == len([run for grid in loaded for run in grid.runs.values() if run.has_test_mean]) <= len(ok)
    val = [(run.summary.val_acc, run.summary.val_ap) for run in runs[:MAX_ROWS]]
    assert val == sorted(val, reverse=True)  # the best-by-val rule reads the top
    assert selected <= {run_key(run) for run in runs}  # every selected config is shown, even beyond MAX_ROWS
    assert (report.out / "ranked.png").is_file()


@pytest.mark.parametrize(
    ("code", "text"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")]
)
def test_a_full_or_read_only_output_folder_is_one_error_line(grids, tmp_path, monkeypatch, code, text) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    def refuse(src: object, dst: object) -> None:
        raise OSError(code, text, str(dst))  # as the kernel reports it when the report's first file lands

    monkeypatch.setattr(os, "replace", refuse)
    out = tmp_path / "reports"
    result = CliRunner().invoke(main, ["report", str(grids[0]), "--out", str(out), "--no-plots", "--no-html"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    (line,) = result.output.strip().splitlines()[-1:]
    assert line.startswith(f"Error: {out}/") and f"cannot write ({text})" in line, result.output
