"""Tests of ``pipeline fit --add-train`` (pipeline.heads.add_train, results.deltas): a known direction — a head
trained on generator a alone misses generator b; with b's rows added it detects b, and the delta table says so
with an interval above zero, while a barely moves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import generator_features, read_csv_rows, write_store
from pipeline.cli import main
from pipeline.heads import FitConfig
from pipeline.heads.add_train import DELTA_COLUMNS, run_add_train
from pipeline.heads.config import StoreRef, parse_grid
from pipeline.results.bootstrap import BootstrapConfig
from pipeline.results.deltas import paired_delta_replicates


def test_paired_deltas_of_a_run_with_itself_are_zero_and_of_a_better_run_positive() -> None:
    labels = np.array([0, 1] * 20)
    rng = np.random.default_rng(0)
    before = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.3, 40), 0, 1)
    same = paired_delta_replicates(labels, before, before, "x", BootstrapConfig(resamples=200))
    assert np.all(same.acc == 0) and np.all(same.ap == 0)
    better = paired_delta_replicates(labels, before, labels * 0.9 + 0.05, "x", BootstrapConfig(resamples=200))
    assert better.interval("acc").low > 0 and better.interval("ap").low > 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("add-train")
    features, labels, datasets = generator_features(96, seed=1, datasets=("a",))
    write_store(root / "train.zarr", {"view_000": features}, labels, datasets)
    features, labels, datasets = generator_features(64, seed=5, datasets=("b",))
    write_store(root / "new_b.zarr", {"view_000": features}, labels, datasets)
    features, labels, datasets = generator_features(24, seed=2, datasets=("a",))
    write_store(root / "val.zarr", {"center": features}, labels, datasets)
    features, labels, datasets = generator_features(80, seed=3, datasets=("a", "b"))
    write_store(root / "test.zarr", {"center": features}, labels, datasets)
    return root


def grid_text(root: Path, out: Path) -> str:
    return f"""
name: new_generator
out: {out}
data:
  model: synthetic
  train: {{store: {root / "train.zarr"}, views: 1}}  # one view, cycled on purpose
  val: {{store: {root / "val.zarr"}}}
  test: [{{store: {root / "test.zarr"}, name: test}}]
base: {{proj_layers: 1, proj_dim: 16, batch_size: 32, epochs: 8, lr: 0.01, lr_milestones: []}}
grid:
  contrastive_factor: [0.1, 0.4]
"""


@pytest.mark.slow
def test_adding_a_new_generators_rows_raises_its_accuracy_and_the_delta_says_so(stores: Path, tmp_path: Path) -> None:
    spec = parse_grid(grid_text(stores, tmp_path / "g"))
    added = StoreRef("new_b", stores / "new_b.zarr")
    summary = run_add_train(spec, FitConfig(device="cpu", progress=False), added, BootstrapConfig(resamples=200))
    assert summary.refit.out == tmp_path / "g" / "add_new_b" and summary.refit.n_errors == 0
    refit_rows = read_csv_rows(summary.refit.results)
    assert {row["train"] for row in refit_rows} == {"train+new_b"}
    fit = json.loads((summary.refit.out / "runs" / refit_rows[0]["run"] / "fit.json").read_text())
    assert fit["n_train"] == 96 + 64 and fit["train_rows"] == [[0, 160]]
    delta = read_csv_rows(summary.delta)
    assert list(delta[0]) == list(DELTA_COLUMNS)
    assert {(row["selection"], row["dataset"]) for row in delta} == {
        (rule, dataset) for rule in ("best_by_val", "best_by_test_mean_acc_ap") for dataset in ("a", "b")
    }
    before = {
        (r["run"], r["dataset"]): float(r["acc"]) for r in read_csv_rows(summary.base.results) if r["split"] == "test"
    }
    after = {(r["run"], r["dataset"]): float(r["acc"]) for r in refit_rows if r["split"] == "test"}
    for row in delta:
        assert float(row["acc"]) == before[(row["run"], row["dataset"])]
        assert float(row["acc_added"]) == after[(row["run_added"], row["dataset"])]
        assert float(row["acc_delta"]) == pytest.approx(float(row["acc_added"]) - float(row["acc"]), abs=1e-12)
        if row["dataset"] == "b":  # the new generator: detected once its rows are trained on
            assert float(row["acc_delta"]) > 0.2 and float(row["acc_delta_low"]) > 0
        else:
            assert abs(float(row["acc_delta"])) < 0.1


@pytest.mark.slow
def test_cli_fit_add_train_takes_a_split_of_the_cache_or_a_store(stores: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(grid_text(stores, tmp_path / "g").replace("[0.1, 0.4]", "[0.1]"))
    result = CliRunner().invoke(
        main, ["fit", "--grid", str(grid), "--add-train", str(stores / "new_b.zarr"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g" / "add_new_b" / "delta.csv").is_file()
    assert "delta.csv" in result.output


def test_the_grid_key_add_train_names_the_training_entry_after_both(tmp_path: Path) -> None:
    text = grid_text(tmp_path, tmp_path / "g").replace(
        "  val:", f"  add_train: {{store: {tmp_path / 'new_b.zarr'}}}\n  val:"
    )
    spec = parse_grid(text)  # parsing opens no store
    assert spec.add_train == StoreRef("new_b", tmp_path / "new_b.zarr") and spec.train.name == "train+new_b"
