"""Tests of the generalization protocols (pipeline.heads.protocols and their grid runs): one-vs-rest and
leave-one-out take row subsets of the cached training store, name them in fit.json and results.csv, and select per
cell.

The synthetic generators: the fakes of dataset d are shifted along a direction of its own, so a head trained on d
alone tells d's fakes apart and not the others' (a known direction for the cells to show).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import GENERATOR_DATASETS as DATASETS
from conftest import generator_features, read_csv_rows, write_store
from pipeline.heads import FitConfig, run_grid
from pipeline.heads.config import ConfigError, RunConfig, make_run_config, parse_grid
from pipeline.heads.grid import run_id
from pipeline.heads.protocols import ProtocolError, expand_protocols, protocol_cells


@pytest.fixture(scope="module")
def generator_stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generators")
    features, labels, datasets = generator_features(64, seed=1)
    write_store(root / "train.zarr", {"view_000": features}, labels, datasets)
    features, labels, datasets = generator_features(24, seed=2)
    write_store(root / "val.zarr", {"center": features}, labels, datasets)
    features, labels, datasets = generator_features(60, seed=3)
    write_store(root / "test.zarr", {"center": features}, labels, datasets)
    return root


def protocol_grid(root: Path, out: Path, protocols: str, extra: str = "") -> str:
    return f"""
name: protocols
out: {out}
data:
  model: synthetic
  train: {{store: {root / "train.zarr"}, views: 1}}  # one view, cycled on purpose
  val: {{store: {root / "val.zarr"}}}
  test: [{{store: {root / "test.zarr"}, name: test}}]
base: {{proj_layers: 1, proj_dim: 16, batch_size: 32, epochs: 8, lr: 0.01, lr_milestones: []}}
grid:
  protocol: {protocols}
  contrastive_factor: [0.1, 0.4]
{extra}"""


def test_protocol_cells_and_expansion() -> None:
    assert protocol_cells("standard", ["b", "a"]) == [None]
    assert protocol_cells("one-vs-rest", ["b", "a", "c"]) == [("a",), ("b",), ("c",)]
    assert protocol_cells("leave-one-out", ["b", "a", "c"]) == [("b", "c"), ("a", "c"), ("a", "b")]
    with pytest.raises(ProtocolError, match="at least two datasets"):
        protocol_cells("leave-one-out", ["a"])
    runs = expand_protocols([RunConfig(protocol="one-vs-rest"), RunConfig(train_datasets=("a",))], ["a", "b"])
    assert [(run.protocol, run.train_datasets) for run in runs] == [
        ("one-vs-rest", ("a",)),
        ("one-vs-rest", ("b",)),
        ("standard", ("a",)),
    ]
    grid = "name: g\ndata: {train: t, val: v, test: [x]}\nbase: {protocol: one-vs-rest, train_datasets: [a]}\n"
    with pytest.raises(ConfigError, match="chooses each run's train_datasets itself"):
        parse_grid(grid)
    with pytest.raises(ConfigError, match="protocol: 'all-vs-one' is not one of standard, one-vs-rest, leave-one-out"):
        make_run_config({"protocol": "all-vs-one"})


def test_a_standard_run_keeps_the_id_it_had_before_protocols_existed() -> None:
    import hashlib

    config = RunConfig()
    values = {key: value for key, value in json.loads(json.dumps(config.__dict__)).items()}
    for added in ("protocol", "train_datasets", "head", "features", "k", "C"):  # the fields newer than run ids
        del values[added]
    text = json.dumps({"run": values, "data": {}, "views": []}, sort_keys=True)
    assert run_id(config, {}, ()) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert run_id(RunConfig(train_datasets=("a",)), {}, ()) != run_id(config, {}, ())


@pytest.fixture(scope="module")
def protocol_run(generator_stores: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("protocol-grid")
    spec = parse_grid(protocol_grid(generator_stores, out, "[one-vs-rest, leave-one-out]"))
    summary = run_grid(spec, FitConfig(device="cpu", progress=False))
    return {
        "summary": summary,
        "out": out,
        "rows": read_csv_rows(summary.results),
        "selection": read_csv_rows(summary.selection),
    }


@pytest.mark.slow
def test_each_cell_trains_on_its_datasets_rows_named_in_fit_json(protocol_run: dict) -> None:
    rows, out = protocol_run["rows"], protocol_run["out"]
    assert protocol_run["summary"].n_runs == 2 * (3 + 3) and protocol_run["summary"].n_errors == 0
    cells = {(row["protocol"], row["train_datasets"]) for row in rows}
    assert cells == {
        ("one-vs-rest", "a"),
        ("one-vs-rest", "b"),
        ("one-vs-rest", "c"),
        ("leave-one-out", "b+c"),
        ("leave-one-out", "a+c"),
        ("leave-one-out", "a+b"),
    }
    ranges = {"a": [0, 64], "b": [64, 128], "c": [128, 192]}  # the store's rows, dataset by dataset
    for row in rows:
        fit = json.loads((out / "runs" / row["run"] / "fit.json").read_text())
        trained = row["train_datasets"].split("+")
        assert fit["train_datasets"] == trained and fit["protocol"] == row["protocol"]
        assert fit["n_train"] == 64 * len(trained)
        covered = sorted(ranges[name] for name in trained)
        merged = [covered[0]]
        for start, stop in covered[1:]:
            if merged[-1][1] == start:
                merged[-1] = [merged[-1][0], stop]
            else:
                merged.append([start, stop])
        assert fit["train_rows"] == merged
        val_datasets = {r["dataset"] for r in rows if r["run"] == row["run"] and r["split"] == "val"}
        assert val_datasets == set(trained)  # val scoped to the cell's datasets: selection within the cell
        test_datasets = {r["dataset"] for r in rows if r["run"] == row["run"] and r["split"] == "test"}
        assert test_datasets == set(DATASETS)  # every test set


@pytest.mark.slow
def test_selection_picks_per_cell_and_a_generator_is_detected_where_trained(protocol_run: dict) -> None:
    selection = protocol_run["selection"]
    assert len(selection) == 6 * 2  # every cell, both rules
    assert {(s["protocol"], s["train_datasets"]) for s in selection} == {
        (row["protocol"], row["train_datasets"]) for row in protocol_run["rows"]
    }
    acc = {(r["run"], r["dataset"]): float(r["acc"]) for r in protocol_run["rows"] if r["split"] == "test"}
    for protocol in ("one-vs-rest", "leave-one-out"):
        seen, unseen = [], []
        for s in selection:
            if s["protocol"] == protocol and s["selection"] == "best_by_val":
                trained = s["train_datasets"].split("+")
                seen += [acc[(s["run"], d)] for d in trained]
                unseen += [acc[(s["run"], d)] for d in DATASETS if d not in trained]
        assert len(seen) + len(unseen) == 9
        assert np.mean(seen) > 0.9 and np.mean(seen) > np.mean(unseen) + 0.15, (protocol, seen, unseen)


@pytest.mark.slow
def test_a_protocol_over_a_split_of_one_dataset_is_refused(generator_stores: Path, tmp_path: Path) -> None:
    from pipeline.heads.stores import DataError

    features, labels, datasets = generator_features(32, seed=4, datasets=("a",))
    write_store(tmp_path / "train.zarr", {"view_000": features}, labels, datasets)
    text = protocol_grid(generator_stores, tmp_path / "g", "[leave-one-out]").replace(
        str(generator_stores / "train.zarr"), str(tmp_path / "train.zarr")
    )
    with pytest.raises(DataError, match="leave-one-out needs at least two datasets"):
        run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
