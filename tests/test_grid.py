"""Grids of heads from cached stores: run folders, results, selection, resume, errors."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from conftest import read_csv_rows, separable_features, write_store
from pipeline import cache
from pipeline.cli import main
from pipeline.heads import ConfigError, DataError, cluster, parse_grid
from pipeline.heads.cluster import ClusterConfig, ClusterError, dask_client
from pipeline.heads.config import with_added
from pipeline.heads.grid import FitConfig, ViewReuseWarning, run_grid


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
  model: synthetic
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
    return run_grid(spec, FitConfig(device="cpu", jobs=jobs, progress=False))


def test_results_equal_metrics_recomputed_from_saved_scores(stores, tmp_path):
    summary = run(stores, tmp_path / "g")
    rows = read_csv_rows(summary.results)
    runs = sorted({r["run"] for r in rows})
    assert summary.n_runs == 4 and len(runs) == 4
    # 1 val dataset + 2 datasets x 2 test entries, per run
    assert len(rows) == 4 * 5
    for row in rows:
        scores = read_csv_rows(tmp_path / "g" / "runs" / row["run"] / f"scores_{row['split']}.csv")
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
    from pipeline.heads import load_head

    head, metadata = load_head(folder / "head.safetensors")
    assert (head.n_blocks, head.in_dim, head.proj_dim) == (4, 16, 16) and metadata["tap"] == "ln2"
    assert metadata["head_blocks"] == "all"
    fit = json.loads((folder / "fit.json").read_text())
    assert fit["epoch_views"] == ["view_000", "view_001"] and (fit["views_used"], fit["views_reused"]) == (2, 0)
    assert fit["epoch_lrs"] == [0.001, 0.001]


def test_selection_labels_both_rules(stores, tmp_path):
    summary = run(stores, tmp_path / "g")
    rows = read_csv_rows(summary.results)
    selection = read_csv_rows(summary.selection)
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
    rows = [r for r in read_csv_rows(summary.results) if r["split"] == "test" and r["variant"] == "center"]
    assert len({r["run"] for r in rows}) == 6 and {r["seed"] for r in rows} == {"0", "1", "2"}
    per_config: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        per_config.setdefault(r["contrastive_factor"], {}).setdefault(r["seed"], []).append(float(r["acc"]))
    seed_means = {factor: [np.mean(per_config[factor][seed]) for seed in "012"] for factor in per_config}
    selection = read_csv_rows(summary.selection)
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
    assert read_csv_rows(again.results) == read_csv_rows(first.results)
    threads = torch.get_num_threads()
    other_folder = run(stores, tmp_path / "b", jobs=2)
    assert torch.get_num_threads() == threads  # --jobs shares the CPU out while it runs, then gives it back
    assert other_folder.n_skipped == 0
    assert_same_results(first.out, other_folder.out)


def test_the_numbers_do_not_depend_on_the_number_of_torch_threads(stores, tmp_path):
    # torch splits a softmax over an inner dim, and elementwise ops past its grain size, across threads, and rounds
    # each share's vectorised body and scalar tail differently: the trainer and the scoring avoid both.
    first = run(stores, tmp_path / "a")
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 16):
            torch.set_num_threads(threads)
            assert_same_results(first.out, run(stores, tmp_path / f"threads_{threads}").out)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_local_dask_cluster_gives_the_numbers_of_one_job(stores, tmp_path, monkeypatch):
    first = run(stores, tmp_path / "a")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_text(stores, tmp_path / "b"))
    monkeypatch.setattr("pipeline.heads.grid.available_memory", lambda device: 10**9)  # (in this process only)
    command = ["fit", "--grid", str(grid_file), "--scheduler", "local:2", "--device", "cpu", "--no-progress"]
    environment = dict(os.environ)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert dict(os.environ) == environment  # (Dask's nannies set OMP_NUM_THREADS=1 and more in this process)
    assert_same_results(first.out, tmp_path / "b")
    fits = [json.loads(path.read_text()) for path in (tmp_path / "b").glob("runs/*/fit.json")]
    # each worker process holds its own copy of the features: the RAM is shared out between the two
    assert [fit["memory_budget_bytes"] for fit in fits] == [10**9 // 2] * 4


@pytest.mark.slow
def test_dask_workers_load_the_stores_once_and_keep_them_for_the_next_grid(stores, tmp_path):
    def worker_state() -> tuple[str, int, str | None, list[int]]:  # run on each worker
        from pipeline.heads import grid

        held = [id(context.data) for context in grid._WORKER_CONTEXT.values()]
        return (
            os.environ[cluster.WORKER_DEVICE_ENV],
            torch.get_num_threads(),
            os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            held,
        )

    grid = "  contrastive_factor: [0.1, 0.8]\n  proj_dim: [8, 16, 24, 32]\n"  # four groups
    first = run(stores, tmp_path / "a", grid=grid)
    with dask_client(ClusterConfig(devices=("cpu", "cpu"))) as client:  # what --devices cpu,cpu starts
        address = ClusterConfig(scheduler=client.scheduler.address)  # reached as --scheduler ADDRESS
        options = FitConfig(device="cpu", progress=False, cluster=address)
        run_grid(parse_grid(grid_text(stores, tmp_path / "b", grid)), options)
        held = client.run(worker_state)
        run_grid(parse_grid(grid_text(stores, tmp_path / "c", grid)), options)
        held_after = client.run(worker_state)
    # each worker on its device, with its share of the CPUs, and glibc's malloc as usual (see LOCAL_NANNY_CONFIG)
    assert len(held) == 2 and {state[:3] for state in held.values()} == {("cpu", cluster.worker_threads(2), None)}
    assert all(len(ids) == 1 for *_, ids in held.values())  # both workers had groups, and one copy of the stores
    assert held_after == held  # kept for the next grid: not loaded again
    assert_same_results(first.out, tmp_path / "b")
    assert_same_results(first.out, tmp_path / "c")


def test_a_dask_cluster_without_dask_installed_says_what_to_install(stores, tmp_path, monkeypatch):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_text(stores, tmp_path / "g"))
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    for option in (["--scheduler", "local:2"], ["--devices", "cpu,cpu"]):
        result = CliRunner().invoke(main, ["fit", "--grid", str(grid_file), "--no-progress", *option])
        assert result.exit_code == 1
        assert "not installed: pip install 'rine-pipeline[dask]'" in result.output
    assert not (tmp_path / "g" / "results.csv").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scheduler", "local:0"], "local:N with N >= 1"),
        (["--scheduler", "local:1000000"], "this machine has"),
        (["--scheduler", "garbage"], "not a scheduler address"),
        (["--scheduler", ""], "not a scheduler address"),
        (["--scheduler", "tcp://"], "not a scheduler address"),
        (["--scheduler", "inproc://x"], "not a scheduler address"),
        (["--scheduler", "tcp://head:99999"], "not a scheduler address"),
        (["--devices", "cuda:99"], "CUDA device"),
        (["--devices", "cpu", "--scheduler", "local:2"], "exclusive"),
        (["--jobs", "2", "--scheduler", "local:2"], "--jobs"),
    ],
)
def test_bad_cluster_options_are_refused(stores, tmp_path, options, message):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_text(stores, tmp_path / "g"))
    result = CliRunner().invoke(main, ["fit", "--grid", str(grid_file), "--no-progress", *options])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "g").exists()  # refused before any work


@pytest.mark.parametrize("address", ["tcp://head:8786", "head:8786", "tls://10.0.0.1:8786", "tcp://[::1]:8786"])
def test_scheduler_addresses_dask_reaches_are_accepted(address: str) -> None:
    assert ClusterConfig(scheduler=address).local_ram_sharers() == 0


def test_an_unreachable_scheduler_is_an_error_naming_it(stores, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr("pipeline.heads.cluster.CONNECT_TIMEOUT_S", 1)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    options = FitConfig(device="cpu", progress=False, cluster=ClusterConfig(scheduler=address))
    with pytest.raises(ClusterError, match=f"cannot reach the Dask scheduler {address}"):
        run_grid(parse_grid(grid_text(stores, tmp_path / "g")), options)


def assert_same_results(one: Path, two: Path) -> None:
    """Two grid folders hold the same results (every column but fit_seconds, as text) and the same scores, bit for
    bit."""

    def timeless(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{column: value for column, value in row.items() if column != "fit_seconds"} for row in rows]

    assert timeless(read_csv_rows(one / "results.csv")) == timeless(read_csv_rows(two / "results.csv"))
    assert read_csv_rows(one / "selection.csv") == read_csv_rows(two / "selection.csv")
    scores = sorted(path.relative_to(one) for path in one.glob("runs/*/scores_*.csv"))
    assert scores == sorted(path.relative_to(two) for path in two.glob("runs/*/scores_*.csv"))
    for path in scores:
        assert (one / path).read_bytes() == (two / path).read_bytes(), path


def test_a_failing_config_becomes_an_error_row_and_the_grid_goes_on(stores, tmp_path):
    grid = "  - {proj_dim: [16]}\n  - {proj_dim: [16], classes: [[dog]]}\n"
    summary = run(stores, tmp_path / "g", grid=grid)
    rows = read_csv_rows(summary.results)
    errors = [r for r in rows if r["status"] == "error"]
    assert summary.n_errors == 1 and len(errors) == 1
    assert "classes ['dog'] not in the store" in errors[0]["error"]
    assert len([r for r in rows if r["status"] == "ok"]) == 5
    with pytest.raises(DataError):
        spec = parse_grid(grid_text(stores, tmp_path / "h", grid))
        run_grid(spec, FitConfig(device="cpu", fail_fast=True, progress=False))


def test_stores_with_other_features_are_refused(stores, tmp_path):
    features, labels = separable_features(40)
    write_store(tmp_path / "hidden.zarr", {"center": features}, labels, ["x"] * 40, tap="hidden")
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        str(stores / "val.zarr"), str(tmp_path / "hidden.zarr")
    )
    with pytest.raises(DataError, match="tap: store has 'ln2', asked for 'hidden'"):
        run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))


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
    from pipeline.heads import load_head

    features, labels = separable_features(40, seed=7, shift=3.0)
    crops = {f"tencrop_{i}": features * (1 + i) - 2.0 * i for i in range(10)}
    write_store(tmp_path / "big.zarr", crops, labels, ["synthbuster_x"] * 40)
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        f"    - {{store: {stores / 'test.zarr'}, variant: jpeg-official, name: test_jpeg}}\n",
        f"    - {{store: {tmp_path / 'big.zarr'}, variant: tencrop}}\n",
    )
    summary = run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
    rows = [r for r in read_csv_rows(summary.results) if r["split"] == "big_tencrop"]
    assert len(rows) == 1 and rows[0]["variant"] == "tencrop" and rows[0]["n"] == "40"
    head, _ = load_head(tmp_path / "g" / "runs" / rows[0]["run"] / "head.safetensors")
    with torch.no_grad():  # by hand, from the stored (float16) crops: the authors' sigmoid(logits.view(B, 10).mean(1))
        stored = [cache.read_features(tmp_path / "big.zarr", name) for name in crops]
        logits = np.stack([head(torch.from_numpy(c).float())[0].squeeze(1).double().numpy() for c in stored], axis=1)
    expected = 1 / (1 + np.exp(-logits.mean(axis=1)))
    mean_of_sigmoids = (1 / (1 + np.exp(-logits))).mean(axis=1)
    assert not np.allclose(expected, mean_of_sigmoids, atol=1e-4)  # the two rules differ on these crops
    saved = read_csv_rows(tmp_path / "g" / "runs" / rows[0]["run"] / "scores_big_tencrop.csv")
    assert np.allclose([float(s["score"]) for s in saved], expected, atol=1e-6)
    assert float(rows[0]["acc"]) == pytest.approx(accuracy_score(labels, expected > 0.5))


def test_more_epochs_than_views_warns_once_per_grid_and_is_recorded(stores, tmp_path):
    grid = "  epochs: [1, 3, 4]\n  proj_dim: [16]\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(stores, tmp_path / "g", grid=grid)
    reuse = [w for w in caught if issubclass(w.category, ViewReuseWarning)]
    assert len(reuse) == 1 and "2 of 3 runs" in str(reuse[0].message) and "--views 4" in str(reuse[0].message)
    rows = read_csv_rows(summary.results)
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
    summary = run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
    rows = read_csv_rows(summary.results)
    assert "whichfaceisreal" in {r["dataset"] for r in rows}  # still scored, in its own rows
    for selected in read_csv_rows(summary.selection):
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
    from pipeline.heads import load_head

    summary = run(stores, tmp_path / "g", grid="  contrastive_factor: [0.1, 0.8]\n  proj_dim: [16]\n")
    selected = {r["run"] for r in read_csv_rows(summary.selection)}
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
    with torch.no_grad():
        expected = head(torch.from_numpy(cache.read_features(stores / "test.zarr", "center")[order]).float())[1]
    assert np.allclose(z, expected.numpy(), atol=1e-5)


def strip_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_training_precision_is_float32_unless_asked_recorded_and_scores_are_float32(stores, tmp_path, monkeypatch, amp):
    """The bf16 probe forced on changes nothing; ``amp: bf16`` is recorded everywhere and still scores in float32."""
    from pipeline import devices
    from pipeline.heads import load_head
    from pipeline.results.run_folder import CALIBRATION_METADATA_KEYS, HEAD_METADATA_KEYS

    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")
    grid = "  proj_dim: [16]\n" + ("" if amp is None else f"  amp: [{amp}]\n")
    summary = run(stores, tmp_path / "g", grid=grid)
    expected = amp or "none"
    assert {row["amp"] for row in read_csv_rows(summary.results)} == {expected}
    (folder,) = (tmp_path / "g" / "runs").iterdir()
    assert json.loads((folder / "fit.json").read_text())["amp"] == expected
    head, metadata = load_head(folder / "head.safetensors")
    assert metadata["amp"] == expected
    assert {*HEAD_METADATA_KEYS, *CALIBRATION_METADATA_KEYS} <= set(metadata)  # the detector's contract
    saved = {row["path"]: float(row["score"]) for row in read_csv_rows(folder / "scores_test.csv")}
    rows = cache.read_rows(stores / "test.zarr")
    valid = np.flatnonzero(rows.valid)
    features = torch.from_numpy(cache.read_features(stores / "test.zarr", "center")[valid]).float()
    with torch.inference_mode():  # the saved head in float32, by hand
        expected_scores = torch.sigmoid(head(features)[0].squeeze(1).double()).numpy()
    np.testing.assert_allclose([saved[rows.paths[i]] for i in valid], expected_scores, rtol=0, atol=1e-6)


def test_bf16_on_hardware_without_bfloat16_units_warns_that_it_is_emulated(stores, tmp_path, monkeypatch):
    from pipeline import devices
    from pipeline.heads.grid import SlowPrecisionWarning

    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    with pytest.warns(SlowPrecisionWarning, match="amp bf16 on cpu, which has no bfloat16 units"):
        run(stores, tmp_path / "g", grid="  proj_dim: [16]\n  amp: [bf16]\n")


def test_fit_amp_option_sets_every_configs_precision_and_the_run_ids_say_so(stores, tmp_path, monkeypatch):
    from pipeline import devices

    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")  # no warning about emulated bf16, whatever this CPU has
    grid = tmp_path / "grid.yaml"
    grid.write_text(grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n"))
    ids = {}
    for amp in ("none", "bf16"):
        result = CliRunner().invoke(
            main, ["fit", "--grid", str(grid), "--amp", amp, "--device", "cpu", "--no-progress"]
        )
        assert result.exit_code == 0, result.output
        rows = read_csv_rows(tmp_path / "g" / "results.csv")
        assert {row["amp"] for row in rows} == {amp}
        ids[amp] = {row["run"] for row in rows}
    assert ids["none"].isdisjoint(ids["bf16"])  # another precision is another run, never a reused one
    result = CliRunner().invoke(main, ["fit", "--grid", str(grid), "--amp", "auto"])
    assert result.exit_code == 2 and "'auto' is not one of 'none', 'bf16'" in result.output


@pytest.mark.parametrize("select_across, n_selected", [(None, 4), ("[epochs]", 2)])
def test_select_across_epochs_selects_one_best_over_every_epoch_count(stores, tmp_path, select_across, n_selected):
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16, 32]\n  epochs: [1, 2]\n")
    if select_across:
        text += f"select_across: {select_across}\n"
    summary = run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
    selected = read_csv_rows(summary.selection)
    assert len(selected) == n_selected  # two rules x (one setting, or one per epoch count)
    if select_across:  # the winner by the paper's rule is the best of all four runs, whatever its epochs
        results = read_csv_rows(summary.results)
        score = {}
        for row in results:
            if row["split"] == "test":
                score.setdefault(row["run"], []).append((float(row["acc"]), float(row["ap"])))
        means = {run: np.mean([a for a, _ in v]) + np.mean([p for _, p in v]) for run, v in score.items()}
        (best,) = [row["run"] for row in selected if row["selection"] == "best_by_test_mean_acc_ap"]
        assert means[best] == max(means.values())


def test_fused_groups_give_the_unfused_metrics_and_record_their_group(stores, tmp_path):
    grid = "  contrastive_factor: [0.1, 0.2, 0.4, 0.8]\n  proj_dim: [16, 32]\n"
    spec = parse_grid(grid_text(stores, tmp_path / "fused", grid))
    fused = run_grid(spec, FitConfig(device="cpu", progress=False))
    alone = run_grid(
        parse_grid(grid_text(stores, tmp_path / "alone", grid)), FitConfig(device="cpu", progress=False, fuse=False)
    )
    fused_rows, alone_rows = read_csv_rows(fused.results), read_csv_rows(alone.results)
    assert [r["run"] for r in fused_rows] == [r["run"] for r in alone_rows]  # same configs, same ids
    for a, b in zip(fused_rows, alone_rows):
        for metric in ("acc", "ap", "auc", "real_acc", "fake_acc", "calibrated_acc"):
            assert float(a[metric]) == pytest.approx(float(b[metric]), abs=5e-5, nan_ok=True), metric
    groups = {}
    for run_id in {r["run"] for r in fused_rows}:
        fit = json.loads((tmp_path / "fused" / "runs" / run_id / "fit.json").read_text())
        assert fit["group"]["runs"][fit["group"]["index"]] == run_id and fit["group"]["fused"] is True
        groups.setdefault(tuple(fit["group"]["runs"]), set()).add(run_id)
        assert fit["amp"] == "none" and fit["features"]["train"] == "memory"
        assert fit["peak_memory_bytes"]["process_rss"] > 0
        single = json.loads((tmp_path / "alone" / "runs" / run_id / "fit.json").read_text())
        assert single["group"]["runs"] == [run_id] and single["group"]["fused"] is False
    # one group per proj_dim, holding its four contrastive factors
    assert sorted(len(members) for members in groups.values()) == [4, 4]
    assert all(set(key) == members for key, members in groups.items())


def test_a_grid_beyond_its_memory_budget_streams_and_gives_the_same_results(stores, tmp_path, monkeypatch):
    in_memory = run(stores, tmp_path / "memory")
    loads: list[str] = []
    read_features = cache.read_features
    monkeypatch.setattr(cache, "read_features", lambda *a, **k: loads.append(a[1]) or read_features(*a, **k))
    spec = parse_grid(grid_text(stores, tmp_path / "streamed"))
    streamed = run_grid(spec, FitConfig(device="cpu", progress=False, memory_budget=1000))
    assert loads == []  # no variant was read whole
    assert strip_timing(read_csv_rows(streamed.results)) == strip_timing(read_csv_rows(in_memory.results))
    run_id = read_csv_rows(streamed.results)[0]["run"]
    fit = json.loads((tmp_path / "streamed" / "runs" / run_id / "fit.json").read_text())
    assert fit["features"] == {"train": "streamed", "val": "streamed", "test": "streamed", "test_jpeg": "streamed"}
    assert fit["memory_budget_bytes"] == 1000


def test_the_memory_budget_keeps_what_fits_in_order(stores, tmp_path):
    from pipeline.heads.grid import place_features, plan_grid_stores

    spec = parse_grid(grid_text(stores, tmp_path / "g"))  # two-epoch runs: two training views resident
    view = 160 * 4 * 16 * 2  # rows x blocks x dim x float16
    budget = 2 * view + 40 * 4 * 16 * 2 + 10  # the two views and val, not the 160-row test store
    assert place_features(spec, plan_grid_stores(spec), budget) == (True, True, False, False)
    assert place_features(spec, plan_grid_stores(spec), 10**9) == (True, True, True, True)


def test_a_declared_tap_or_model_that_the_stores_do_not_hold_is_refused(stores, tmp_path):
    hidden = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        "  model: synthetic\n", "  model: synthetic\n  tap: hidden\n"
    )
    with pytest.raises(
        DataError, match=r"train \(.*train.zarr\) holds features of tap 'ln2', but the grid's data.tap is 'hidden'"
    ):
        run_grid(parse_grid(hidden), FitConfig(device="cpu", progress=False))
    other_model = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        "model: synthetic", "model: org/other"
    )
    with pytest.raises(
        DataError, match="holds features of model 'synthetic', but the grid's data.model is 'org/other'"
    ):
        run_grid(parse_grid(other_model), FitConfig(device="cpu", progress=False))
    assert not list((tmp_path / "g" / "runs").iterdir())


def test_an_undeclared_tap_and_model_are_taken_from_the_stores(tmp_path):
    features, labels = separable_features(120, seed=4, shift=3.0)
    for name, rows in (("train", slice(0, 80)), ("val", slice(80, 100)), ("test", slice(100, 120))):
        write_store(
            tmp_path / f"{name}.zarr",
            {"center": features[rows]},
            labels[rows],
            ["d"] * 20 if name != "train" else ["d"] * 80,
            tap="hidden",
            model="mine",
        )
    text = f"""
name: undeclared
out: {tmp_path / "g"}
data:
  train: {{store: {tmp_path / "train.zarr"}}}
  val: {{store: {tmp_path / "val.zarr"}}}
  test: [{{store: {tmp_path / "test.zarr"}}}]
base: {{proj_layers: 1, proj_dim: 8, batch_size: 32}}
"""
    summary = run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
    assert {(r["model"], r["tap"]) for r in read_csv_rows(summary.results)} == {("mine", "hidden")}
    declared = text.replace("data:\n", "data:\n  tap: ln2\n")
    with pytest.raises(DataError, match="holds features of tap 'hidden', but the grid's data.tap is 'ln2'"):
        run_grid(parse_grid(declared), FitConfig(device="cpu", progress=False))


def test_a_one_label_training_split_is_refused_before_any_fit(stores, tmp_path):
    features, labels = separable_features(40)
    write_store(tmp_path / "fakes.zarr", {"center": features}, np.ones(40, dtype=np.int8), ["progan"] * 40)
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16, 32]\n  epochs: [1]\n").replace(
        str(stores / "train.zarr"), str(tmp_path / "fakes.zarr")
    )
    with pytest.raises(DataError, match="40 valid training rows of all classes are all fake"):
        run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
    assert list((tmp_path / "g" / "runs").iterdir()) == []  # refused before any config was fitted


def test_a_test_set_whose_rows_are_all_invalid_gets_a_row_saying_why(stores, tmp_path):
    features, labels = separable_features(60, seed=9)
    valid = np.ones(60, dtype=bool)
    valid[:30] = False  # every row of broken_set
    write_store(tmp_path / "t.zarr", {"center": features}, labels, ["broken_set"] * 30 + ["fine_set"] * 30, valid=valid)
    text = grid_text(stores, tmp_path / "g", "  proj_dim: [16]\n").replace(
        f"    - {{store: {stores / 'test.zarr'}, variant: jpeg-official, name: test_jpeg}}\n",
        f"    - {{store: {tmp_path / 't.zarr'}, name: partly_broken}}\n",
    )
    summary = run_grid(parse_grid(text), FitConfig(device="cpu", progress=False))
    rows = {r["dataset"]: r for r in read_csv_rows(summary.results) if r["split"] == "partly_broken"}
    assert set(rows) == {"broken_set", "fine_set"}
    broken = rows["broken_set"]
    assert (broken["status"], broken["n"], broken["n_invalid"], broken["acc"]) == ("no_valid_rows", "0", "30", "")
    assert (
        broken["error"].startswith("all 30 rows of broken_set are invalid, e.g. broken_set/")
        and "synthetic failure" in broken["error"]
    )
    assert rows["fine_set"]["status"] == "ok" and rows["fine_set"]["n"] == "30"
    assert summary.n_errors == 0
    assert len(read_csv_rows(summary.selection)) == 2  # the run is still selected on its valid sets


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_an_output_folder_that_cannot_be_written_stops_the_grid_with_a_message(stores, tmp_path, monkeypatch, code):
    def refuse(source, target):  # the disk refuses the rename that makes a written file visible
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(os, "replace", refuse)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid_text(stores, tmp_path / "g", "  proj_dim: [16, 32]\n"))
    result = CliRunner().invoke(main, ["fit", "--grid", str(grid_file), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and f"{tmp_path / 'g'}/" in result.output
    assert f"cannot write ({os.strerror(code)})" in result.output
    assert not (tmp_path / "g" / "results.csv").exists()


@pytest.mark.parametrize("device", ["tpu", "mps", "xla:0", "meta"])
def test_a_device_the_pipeline_cannot_run_on_is_a_bad_option(tmp_path, device):
    (tmp_path / "grid.yaml").write_text("name: g\n")
    result = CliRunner().invoke(main, ["fit", "--grid", str(tmp_path / "grid.yaml"), "--device", device])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--device'" in result.output and "Traceback" not in result.output


def test_a_grid_that_says_how_many_views_it_reads_cycles_them_without_warning(stores, tmp_path):
    grid = "  epochs: [3]\n  proj_dim: [16]\n"
    text = grid_text(stores, tmp_path / "g", grid).replace(
        f"train: {{store: {stores / 'train.zarr'}}}", f"train: {{store: {stores / 'train.zarr'}, views: 1}}"
    )
    spec = parse_grid(text)
    assert spec.train.views == 1
    assert with_added(spec.train, spec.val).views == 1  # an --add-train refit reads the views the grid reads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_grid(spec, FitConfig(device="cpu", progress=False))
    assert not [w for w in caught if issubclass(w.category, ViewReuseWarning)]
    (run_id,) = {r["run"] for r in read_csv_rows(summary.results)}
    fit = json.loads((tmp_path / "g" / "runs" / run_id / "fit.json").read_text())
    assert fit["epoch_views"] == ["view_000"] * 3  # the store has two views; the grid reads the first
    too_many = parse_grid(text.replace("views: 1", "views: 3").replace(str(tmp_path / "g"), str(tmp_path / "h")))
    with pytest.raises(DataError, match=r"has 2 complete training view\(s\), the grid reads 3 .*--views 3"):
        run_grid(too_many, FitConfig(device="cpu", progress=False))
    for bad, message in (("views: 0", "positive number"), ("views: 1, variant: view_000", "not both")):
        with pytest.raises(ConfigError, match=message):
            parse_grid(text.replace("views: 1", bad))
    with pytest.raises(ConfigError, match="only the training entry"):
        parse_grid(
            text.replace(f"val: {{store: {stores / 'val.zarr'}}}", f"val: {{store: {stores / 'val.zarr'}, views: 1}}")
        )
