"""The report's comparison of detectors: detectors.csv against results.csv and the bootstrap, blocks.csv and the
"which block knows most" figure from the per-block probes and RINE's TIE weights, and both on the page in a
browser."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
from test_probe_fit import ZOO, grid_text
from test_probe_fit import stores as stores  # noqa: F401 - the module fixture, reused
from test_report_page import HARNESS, browse, chromium

from conftest import read_csv_rows
from pipeline.heads import FitConfig, parse_grid, run_grid
from pipeline.report import ReportConfig, run_report
from pipeline.report.studies import block_importance
from pipeline.results.bootstrap import BootstrapConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(stores, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("zoo-report")
    grid = run_grid(parse_grid(grid_text(stores, root / "g", ZOO)), FitConfig(device="cpu", progress=False)).out
    out = root / "reports"
    summary = run_report(ReportConfig(grid_dirs=(grid,), out=out, bootstrap=BootstrapConfig(100), progress=False))
    return {"grid": grid, "out": out, "summary": summary}


def test_detectors_table_has_every_selected_head_with_its_results_and_intervals(report):
    rows = read_csv_rows(report["out"] / "detectors.csv")
    selection = read_csv_rows(report["grid"] / "selection.csv")
    assert sorted((r["run"], r["selection"]) for r in rows) == sorted((s["run"], s["selection"]) for s in selection)
    assert {r["head"] for r in rows} == {"rine", "linear", "knn", "logreg"}
    results = read_csv_rows(report["grid"] / "results.csv")
    for row in rows:
        tests = [r for r in results if r["run"] == row["run"] and r["split"] == "test"]
        for result in tests:
            assert row[f"{result['dataset']}_acc_pct"] == f"{100 * float(result['acc']):.1f}"
            low, high = (float(row[f"{result['dataset']}_ap_ci_{side}_pct"]) for side in ("low", "high"))
            assert low - 0.05 <= 100 * float(result["ap"]) <= high + 0.05
        assert row["mean_ap_pct"] == f"{100 * np.mean([float(r['ap']) for r in tests]):.1f}"
        assert float(row["mean_acc_ci_low_pct"]) <= float(row["mean_acc_pct"]) <= float(row["mean_acc_ci_high_pct"])
    knn = [r for r in rows if r["head"] == "knn"]
    assert {r["hyper"] for r in knn} <= {"k=1", "k=5"} and all(r["features"] == "embedding" for r in knn)


def test_blocks_table_puts_each_blocks_probe_beside_rines_tie_weight(report):
    rows = read_csv_rows(report["out"] / "blocks.csv")
    assert [r["block"] for r in rows] == ["0", "1", "2", "3"]
    selection = {
        s["run"]: s for s in read_csv_rows(report["grid"] / "selection.csv") if s["selection"] == "best_by_val"
    }
    rine = next(s["run"] for s in read_csv_rows(report["grid"] / "selection.csv")
                if s["head"] == "rine" and s["selection"] == "best_by_test_mean_acc_ap")  # fmt: skip
    _, weights = block_importance(report["grid"] / "runs" / rine / "head.safetensors")
    for row, weight in zip(rows, weights):
        probe = selection[row["probe_run"]]
        assert probe["head"] == "logreg" and probe["features"] == f"block:{row['block']}"
        assert float(row["probe_val_ap_pct"]) == pytest.approx(100 * float(probe["val_ap"]), abs=0.05)
        assert float(row["probe_mean_ap_pct"]) == pytest.approx(100 * float(probe["mean_ap"]), abs=0.05)
        assert float(row["tie_weight"]) == pytest.approx(weight, rel=1e-3) and row["rine_run"] == rine


def test_the_page_shows_the_detectors_table_and_the_block_figure_in_a_browser(report, tmp_path):
    out, summary = report["out"], report["summary"]
    assert {"detectors.csv", "blocks.csv", "which_block.png"} <= {path.name for path in summary.written}
    browser = chromium()
    (out / "harness.html").write_text(HARNESS, encoding="utf-8")
    page = browse(browser, (out / "harness.html").as_uri(), tmp_path / "profile", "--dump-dom",
                  "--allow-file-access-from-files")  # fmt: skip
    (out / "harness.html").unlink()
    result = json.loads(html.unescape(page.stdout.split('<pre id="result">')[1].split("</pre>")[0]))
    assert "exception" not in result and result["errors"] == []
    assert {"detectors.csv", "blocks.csv"} <= set(result["tables"])
    assert "which_block.png" in result["figures"]  # drawn: loaded with a width
