"""Grids of heads from cached stores: run folders, results, selection, resume, errors."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from conftest import separable_features, write_store
from pipeline import cache
from pipeline.cli import main
from pipeline.config import parse_grid
from pipeline.grid import FitOptions, ViewReuseWarning, run_grid
from pipeline.metrics import METRIC_NAMES
from pipeline.train import DataError


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores")
    features, labels = separable_features(360, seed=1, shift=3.0)
    classes = ["chair", "horse"] * 80
    write_store(
        root / "train.zarr",
        {"view_000": features[:160], "view_001": features[:160] + 0.01},
        labels[:160],
        ["progan"] * 160,
        classes,
    )
    write_store(
        root / "val.zarr", {"center": features[160:200]}, labels[160:200], ["progan"] * 40, ["chair", "horse"] * 20
    )
    test_datasets = ["gan_a"] * 80 + ["diff_b"] * 80
    valid = np.ones(160, dtype=bool)
    valid[[5, 90]] = False
    write_store(
        root / "test.zarr",
        {"center": features[200:], "jpeg-official": features[200:] * 0.5},
        labels[200:],
        test_datasets,
        valid=valid,
    )
    return root


def grid_text(root: Path, out: Path, grid: str = "  contrastive_factor: [0.1, 0.8]\n  proj_dim: [16, 32]\n") -> str:
    return f"""
name: unit
out: {out}
data:
  train: {{store: {root / "train.zarr"}}}
  val: {{store: {root / "val.zarr"}}}
  test:
    - {{store: {root / "test.zarr"}, name: test}}
    - {{store: {root / "test.zarr"}, variant: jpeg-official, name: test_jpeg}}
base:
  proj_layers: 1
  batch_size: 32
  epochs: 2
grid:
{grid}"""


def run(root: Path, out: Path, jobs: int = 1, grid: str | None = None):
    spec = parse_grid(grid_text(root, out) if grid is None else grid_text(root, out, grid))
    return run_grid(spec, FitOptions(device="cpu", jobs=jobs, progress=False))


def test_results_equal_metrics_recomputed_from_saved_scores(stores, tmp_path):
    summary = run(stores, tmp_path / "g")
    rows = read(summary.results)
    runs = sorted({r["run"] for r in rows})
    assert summary.n_runs == 4 and len(runs) == 4
    # 1 val dataset + 2 datasets x 2 test entries, per run
    assert len(rows) == 4 * 5
    for row in rows:
        scores = read(tmp_path / "g" / "runs" / row["run"] / f"scores_{row['split']}.csv")
        mine = [s for s in scores if s["dataset"] == row["dataset"]]
        labels = np.array([int(s["label"]) for s in mine])
        values = np.array([float(s["score"]) for s in mine])
        assert int(row["n"]) == len(mine)
        assert float(row["acc"]) == pytest.approx(accuracy_score(labels, values > 0.5), abs=1e-12)
        assert float(row["ap"]) == pytest.approx(average_precision_score(labels, values), abs=1e-12)
        assert float(row["auc"]) == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
        assert float(row["real_acc"]) == pytest.approx(np.mean(values[labels == 0] <= 0.5), abs=1e-12)
        assert float(row["fake_acc"]) == pytest.approx(np.mean(values[labels == 1] > 0.5), abs=1e-12)
    test_rows = [r for r in rows if r["split"] == "test"]
    assert {r["dataset"]: r["n_invalid"] for r in test_rows} == {"gan_a": "1", "diff_b": "1"}
    assert {r["variant"] for r in rows if r["split"] == "test_jpeg"} == {"jpeg-official"}
    assert all(not math.isnan(float(r["calibrated_threshold"])) for r in test_rows)


def test_run_folder_holds_config_head_scores_and_metrics(stores, tmp_path):
    run(stores, tmp_path / "g", grid="  proj_dim: [16]\n")
    (folder,) = (tmp_path / "g" / "runs").iterdir()
    assert {p.name for p in folder.iterdir()} == {
        "config.yaml",
        "fit.json",
        "head.safetensors",
        "metrics.csv",
        "scores_val.csv",
        "scores_test.csv",
        "scores_test_jpeg.csv",
        "embeddings.npz",  # the run is selected (it is the only one)
    }
    header = (folder / "scores_test.csv").read_text().splitlines()[0]
    assert header == "path,label,dataset,score"
    from pipeline.head import load_head

    head, metadata = load_head(folder / "head.safetensors")
    assert (head.n_blocks, head.in_dim, head.proj_dim) == (4, 16, 16) and metadata["tap"] == "ln2"
    assert metadata["head_blocks"] == "all"
    fit = json.loads((folder / "fit.json").read_text())
    assert fit["epoch_views"] == ["view_000", "view_001"] and (fit["views_used"], fit["views_reused"]) == (2, 0)
    assert fit["epoch_lrs"] == [0.001, 0.001]


def test_selection_labels_both_rules(stores, tmp_path):
    summary = run(stores, tmp_path / "g")
    rows = read(summary.results)
    selection = read(summary.selection)
    assert [s["selection"] for s in selection] == ["best_by_val", "best_by_test_mean_acc_ap"]
    per_run = {}
    for r in rows:
        if r["split"] in ("test", "test_jpeg") and r["variant"] == "center":
            per_run.setdefault(r["run"], []).append((float(r["acc"]), float(r["ap"])))
    best = max(per_run, key=lambda k: (np.mean([a for a, _ in per_run[k]]) + np.mean([p for _, p in per_run[k]]), k))
    assert selection[1]["run"] == best
    assert float(selection[1]["mean_acc"]) == pytest.approx(np.mean([a for a, _ in per_run[best]]))


def test_a_grid_of_seeds_selects_the_config_with_the_best_mean_over_seeds(stores, tmp_path):
    summary = run(
        stores, tmp_path / "g", grid="  contrastive_factor: [0.1, 0.8]\n  seed: [0, 1, 2]\n  proj_dim: [16]\n"
    )
    rows = [r for r in read(summary.results) if r["split"] == "test" and r["variant"] == "center"]
    assert len({r["run"] for r in rows}) == 6 and {r["seed"] for r in rows} == {"0", "1", "2"}
    per_config: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        per_config.setdefault(r["contrastive_factor"], {}).setdefault(r["seed"], []).append(float(r["acc"]))
    seed_means = {factor: [np.mean(per_config[factor][seed]) for seed in "012"] for factor in per_config}
    selection = read(summary.selection)
    assert len(selection) == 2  # one setting: the seed is not part of it
    chosen = selection[1]
    assert (chosen["n_seeds"], chosen["seeds"], chosen["seed"]) == ("3", "0+1+2", "0")
    accs = seed_means[chosen["contrastive_factor"]]
    assert float(chosen["mean_acc"]) == pytest.approx(np.mean(accs))
    assert float(chosen["mean_acc_std"]) == pytest.approx(np.std(accs, ddof=1))
    named = [r for r in rows if r["run"] == chosen["run"]]
    assert {(r["seed"], r["contrastive_factor"]) for r in named} == {("0", chosen["contrastive_factor"])}


def test_rerun_skips_finished_runs_and_same_seed_gives_same_metrics(stores, tmp_path, monkeypatch):
    first = run(stores, tmp_path / "a")
    with monkeypatch.context() as patch:
        patch.setattr("pipeline.cache.read_features", lambda *a, **k: pytest.fail("a finished grid read features"))
        again = run(stores, tmp_path / "a")
    assert again.n_skipped == 4
    assert read(again.results) == read(first.results)
    other_folder = run(stores, tmp_path / "b", jobs=2)
    assert other_folder.n_skipped == 0
    # Threads split the CPU between jobs, so float32 scores may differ in their last bits: numbers agree to 1e-6.
    for one, two in zip(read(first.results), read(other_folder.results), strict=True):
        assert one.keys() == two.keys()
        for column in one.keys() - {"fit_seconds"}:
            if column in METRIC_NAMES and one[column] not in ("", "nan"):
                assert float(one[column]) == pytest.approx(float(two[column]), rel=1e-6, abs=1e-7), column
            else:
                assert one[column] == two[column], column


def test_a_failing_config_becomes_an_error_row_and_the_grid_goes_on(stores, tmp_path):
    grid = "  - {proj_dim: [16]}\n  - {proj_dim: [16], classes: [[dog]]}\n"
    summary = run(stores, tmp_path / "g", grid=grid)
    rows = read(summary.results)
    errors = [r for r in rows if r["status"] == "error"]
    assert summary.n_errors == 1 and len(errors) == 1
    assert "classes ['dog'] not in the store" in errors[0]["error"]
    assert len([r for r in rows if r["status"] == "ok"]) == 5
    with pytest.raises(DataError):
        spec = parse_grid(grid_text(stores, tmp_path / "h", grid))
        run_grid(spec, FitOptions(device="cpu", fail_fast=True, progress=False))


def test_stores_with_other_features_are_refused(stores, tmp_path):
    features, labels = separable_features(40)
    write_store(tmp_path / "hidden.zarr", {"center": features}, labels, ["x"] * 40, tap="hidden")
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        str(stores / "val.zarr"), str(tmp_path / "hidden.zarr")
    )
    with pytest.raises(DataError, match="tap: store has 'ln2', asked for 'hidden'"):
        run_grid(parse_grid(text), FitOptions(device="cpu", progress=False))


def test_cli_fit_prints_results_and_exits_1_on_error_rows(stores, tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n"))
    result = CliRunner().invoke(main, ["fit", "--grid", str(grid_file), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("results.csv")
    bad = tmp_path / "bad.yaml"
    bad.write_text(grid_text(stores, tmp_path / "g2", "  proj_dim: [16]\n  classes: [[dog]]\n"))
    result = CliRunner().invoke(main, ["fit", "--grid", str(bad), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(grid_text(stores, tmp_path / "g3", "  proj_dimm: [16]\n"))
    result = CliRunner().invoke(main, ["fit", "--grid", str(unknown), "--no-progress"])
    assert result.exit_code == 1 and "unknown key 'proj_dimm'" in result.output


def test_ten_crop_score_is_the_sigmoid_of_the_mean_of_the_ten_logits(stores, tmp_path):
    import torch

    from pipeline.head import load_head

    features, labels = separable_features(40, seed=7, shift=3.0)
    crops = {f"tencrop_{i}": features * (1 + i) - 2.0 * i for i in range(10)}
    write_store(tmp_path / "big.zarr", crops, labels, ["synthbuster_x"] * 40)
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        f"    - {{store: {stores / 'test.zarr'}, variant: jpeg-official, name: test_jpeg}}\n",
        f"    - {{store: {tmp_path / 'big.zarr'}, variant: tencrop}}\n",
    )
    summary = run_grid(parse_grid(text), FitOptions(device="cpu", progress=False))
    rows = [r for r in read(summary.results) if r["split"] == "big_tencrop"]
    assert len(rows) == 1 and rows[0]["variant"] == "tencrop" and rows[0]["n"] == "40"
    head, _ = load_head(tmp_path / "g" / "runs" / rows[0]["run"] / "head.safetensors")
    with torch.no_grad():  # by hand, from the stored (float16) crops: the authors' sigmoid(logits.view(B, 10).mean(1))
        stored = [cache.read_features(tmp_path / "big.zarr", name) for name in crops]
        logits = np.stack([head(torch.from_numpy(c).float())[0].squeeze(1).double().numpy() for c in stored], axis=1)
    expected = 1 / (1 + np.exp(-logits.mean(axis=1)))
    mean_of_sigmoids = (1 / (1 + np.exp(-logits))).mean(axis=1)
    assert not np.allclose(expected, mean_of_sigmoids, atol=1e-4)  # the two rules differ on these crops
    saved = read(tmp_path / "g" / "runs" / rows[0]["run"] / "scores_big_tencrop.csv")
    assert np.allclose([float(s["score"]) for s in saved], expected, atol=1e-6)
    assert float(rows[0]["acc"]) == pytest.approx(accuracy_score(labels, expected > 0.5))


def test_more_epochs_than_views_warns_once_per_grid_and_is_recorded(stores, tmp_path):
    grid = "  epochs: [1, 3, 4]\n  proj_dim: [16]\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(stores, tmp_path / "g", grid=grid)
    reuse = [w for w in caught if issubclass(w.category, ViewReuseWarning)]
    assert len(reuse) == 1 and "2 of 3 runs" in str(reuse[0].message) and "--views 4" in str(reuse[0].message)
    rows = read(summary.results)
    assert {(r["epochs"], r["views_used"], r["views_reused"]) for r in rows} == {
        ("1", "1", "0"),
        ("3", "2", "1"),
        ("4", "2", "2"),
    }
    for run_id in {r["run"] for r in rows if r["epochs"] == "4"}:
        fit = json.loads((tmp_path / "g" / "runs" / run_id / "fit.json").read_text())
        assert fit["epoch_views"] == ["view_000", "view_001", "view_000", "view_001"]
        assert (fit["views_used"], fit["views_reused"]) == (2, 2)


def test_a_grid_of_one_epoch_configs_reads_the_first_view_once(stores, tmp_path, monkeypatch):
    reads: list[str] = []
    read_features = cache.read_features

    def counting(path, variant, *args, **kwargs):
        reads.append(f"{Path(path).name}:{variant}")
        return read_features(path, variant, *args, **kwargs)

    monkeypatch.setattr(cache, "read_features", counting)
    grid = "  contrastive_factor: [0.1, 0.2, 0.4]\n  proj_dim: [8, 16]\n  epochs: [1]\n"
    run(stores, tmp_path / "g", jobs=2, grid=grid)
    assert reads.count("train.zarr:view_000") == 1 and "train.zarr:view_001" not in reads


def test_the_paper_sets_alone_form_the_mean_and_a_stray_set_is_named(stores, tmp_path):
    features, labels = separable_features(120, seed=3, shift=2.0)
    datasets = ["progan"] * 40 + ["guided"] * 40 + ["whichfaceisreal"] * 40
    write_store(tmp_path / "mixed.zarr", {"center": features}, labels, datasets)
    text = grid_text(stores, tmp_path / "g", "  contrastive_factor: [0.1, 0.8]\n  proj_dim: [16]\n").replace(
        f"    - {{store: {stores / 'test.zarr'}, variant: jpeg-official, name: test_jpeg}}\n",
        f"    - {{store: {tmp_path / 'mixed.zarr'}, name: mixed}}\n",
    )
    summary = run_grid(parse_grid(text), FitOptions(device="cpu", progress=False))
    rows = read(summary.results)
    assert "whichfaceisreal" in {r["dataset"] for r in rows}  # still scored, in its own rows
    for selected in read(summary.selection):
        mine = [
            r
            for r in rows
            if r["run"] == selected["run"] and r["split"] == "mixed" and r["dataset"] != "whichfaceisreal"
        ]
        assert float(selected["mean_acc"]) == pytest.approx(np.mean([float(r["acc"]) for r in mine]))
        assert float(selected["mean_ap"]) == pytest.approx(np.mean([float(r["ap"]) for r in mine]))
        # gan_a / diff_b of the other test store are not paper sets either
        assert selected["excluded_from_mean"] == "diff_b+gan_a+whichfaceisreal" and selected["n_mean_sets"] == "2"


def test_selected_runs_get_embeddings_of_a_sample_of_their_test_rows(stores, tmp_path):
    from pipeline.head import load_head

    summary = run(stores, tmp_path / "g", grid="  contrastive_factor: [0.1, 0.8]\n  proj_dim: [16]\n")
    selected = {r["run"] for r in read(summary.selection)}
    folders = {folder.name: folder for folder in (tmp_path / "g" / "runs").iterdir()}
    assert {name for name, folder in folders.items() if (folder / "embeddings.npz").is_file()} == selected
    folder = folders[sorted(selected)[0]]
    with np.load(folder / "embeddings.npz") as data:
        z, label, dataset, split, path = (data[k] for k in ("z", "label", "dataset", "split", "path"))
    assert set(split) == {"test"}  # the center-crop test entry only, not test_jpeg
    assert len(z) == 158 and sorted(set(dataset)) == ["diff_b", "gan_a"]  # 160 rows, 2 invalid; < 200 per set
    rows = cache.read_rows(stores / "test.zarr")
    index = {p: i for i, p in enumerate(rows.paths)}
    order = np.array([index[p] for p in path])
    assert (label == rows.labels[order]).all()
    head, _ = load_head(folder / "head.safetensors")
    import torch

    with torch.no_grad():
        expected = head(torch.from_numpy(cache.read_features(stores / "test.zarr", "center")[order]).float())[1]
    assert np.allclose(z, expected.numpy(), atol=1e-5)
