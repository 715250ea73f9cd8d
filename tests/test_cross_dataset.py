"""Tests of the cross-dataset matrix (pipeline.report.cross_dataset), end to end: a miniature GenImage tree and a
Parquet file go through manifest, audit, extract, fit (one-vs-rest and leave-one-out) and report; every cell of
cross_dataset_{acc,ap}.csv is the metric of its run in results.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import make_genimage_tree, read_csv_rows, write_image_parquet
from pipeline.features import AuditConfig, ExtractConfig, build_manifest, run_audit, run_extract, write_manifest
from pipeline.features.backbone import BackboneConfig
from pipeline.heads import FitConfig, run_grid
from pipeline.heads.config import parse_grid
from pipeline.report import ReportConfig, run_report
from pipeline.results.bootstrap import BootstrapConfig

GENERATORS = ("adm", "biggan", "sdv14")


@pytest.fixture(scope="module")
def matrix_run(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("genimage")
    make_genimage_tree(base / "GenImage", GENERATORS, n_per_label=4)
    # a wild test set shipped as Parquet: two generators' images as bytes, one row group per 4 rows
    wild = sorted((base / "GenImage").glob("*/val/*/00[01].png"))
    write_image_parquet(
        base / "wild" / "data" / "test-0.parquet",
        [path.read_bytes() for path in wild],
        ["fake" if "/ai/" in str(path) else "real" for path in wild],
        ["wild_" + ("gan" if "biggan" in str(path) else "diffusion") for path in wild],
    )
    manifests = base / "manifests"
    splits = {
        "train_genimage": build_manifest("genimage-train", base / "GenImage", "train_genimage"),
        "val_genimage": build_manifest("genimage-val", base / "GenImage", "val_genimage"),
        "wild": build_manifest("parquet", base / "wild", "wild", generator_column="generator"),
    }
    stores = {}
    for split, manifest in splits.items():
        write_manifest(manifest, manifests / f"{split}.csv")
        config = ExtractConfig(
            split=split,
            manifest=manifests / f"{split}.csv",
            backbone=BackboneConfig(model=str(tiny_clip_dir), device="cpu", dtype="float32"),
            cache_dir=base / "cache",
            batch_size=8,
            shard_rows=16,
            chunk_rows=8,
            progress=False,
        )
        stores[split] = run_extract(config).stores["ln2"]
    audits = {
        split: run_audit(
            AuditConfig(split=split, manifest=manifests / f"{split}.csv", out=base / "report", progress=False, folds=2)
        )
        for split in ("train_genimage", "wild")
    }
    grid = f"""
name: genimage_matrix
out: {base / "runs" / "genimage_matrix"}
data:
  train: {{store: {stores["train_genimage"]}}}
  val: {{store: {stores["val_genimage"]}}}
  test:
    - {{store: {stores["val_genimage"]}, name: genimage}}
    - {{store: {stores["wild"]}, name: wild}}
base: {{proj_layers: 1, proj_dim: 8, batch_size: 8, epochs: 1}}
grid:
  protocol: [one-vs-rest, leave-one-out]
"""
    fit = run_grid(parse_grid(grid), FitConfig(device="cpu", progress=False))
    report = run_report(
        ReportConfig(
            grid_dirs=(fit.out,),
            out=base / "report",
            plots=True,
            bootstrap=BootstrapConfig(resamples=50),
            progress=False,
        )
    )
    return {"base": base, "fit": fit, "report": report, "audits": audits, "manifests": splits}


@pytest.mark.slow
def test_sources_go_through_manifest_audit_and_extract(matrix_run: dict) -> None:
    manifests = matrix_run["manifests"]
    assert {row.dataset for row in manifests["train_genimage"].rows} == set(GENERATORS)
    assert len(manifests["train_genimage"]) == 3 * 8
    assert {row.dataset for row in manifests["wild"].rows} == {"wild_gan", "wild_diffusion"}
    assert all(row.sha256 is not None for row in manifests["wild"].rows)
    for summary in matrix_run["audits"].values():
        assert summary.result.n_errors == 0
    assert matrix_run["fit"].n_errors == 0 and matrix_run["fit"].n_runs == 6


@pytest.mark.slow
def test_the_matrix_has_a_row_per_cell_a_column_per_test_set_and_the_results_values(matrix_run: dict) -> None:
    out = matrix_run["base"] / "report"
    results = read_csv_rows(matrix_run["fit"].results)
    metric_of = {
        (r["run"], r["dataset"], metric): r[metric]
        for r in results
        if r["split"] in ("genimage", "wild") and r["variant"] == "center"
        for metric in ("acc", "ap")
    }
    test_sets = sorted({key[1] for key in metric_of})
    assert test_sets == ["adm", "biggan", "sdv14", "wild_diffusion", "wild_gan"]
    for metric in ("acc", "ap"):
        rows = read_csv_rows(out / f"cross_dataset_{metric}.csv")
        assert [(r["protocol"], r["train_datasets"]) for r in rows] == [
            ("leave-one-out", "adm+biggan"),
            ("leave-one-out", "adm+sdv14"),
            ("leave-one-out", "biggan+sdv14"),
            ("one-vs-rest", "adm"),
            ("one-vs-rest", "biggan"),
            ("one-vs-rest", "sdv14"),
        ]
        value_columns = [c for c in rows[0] if c not in ("grid", "protocol", "train_datasets", "run")]
        assert value_columns[::3] == [*test_sets, "mean_off_diagonal"]
        for row in rows:
            trained = row["train_datasets"].split("+")
            for dataset in test_sets:
                assert float(row[dataset]) == round(100 * float(metric_of[(row["run"], dataset, metric)]), 1)  # percent
                assert float(row[f"{dataset}_low"]) <= float(row[f"{dataset}_high"])
            off = [float(row[d]) for d in test_sets if d not in trained]
            assert float(row["mean_off_diagonal"]) == pytest.approx(sum(off) / len(off), abs=0.1)
            assert not math.isnan(float(row["mean_off_diagonal_low"]))
    assert (out / "cross_dataset_acc.png").is_file()
    page = (out / "index.html").read_text()
    assert "cross_dataset_acc.csv" in page and "cross_dataset_acc.png" in page
