"""benchmarks/gpu_check.py: the prepared GPU check runs on the CPU at small sizes, and reports a broken path as FAIL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BENCHMARKS, load_benchmark_script

SCRIPT = BENCHMARKS / "gpu_check.py"
CHECK_LINE = re.compile(r"^(PASS|FAIL|SKIP) ([^:]+): (.*) \[[\d.]+ s\]$")
CUDA_ONLY = {"CUDA graphs", "fp16 extraction", "torchrun 2 ranks, one device"}


def load_gpu_check():
    return load_benchmark_script("gpu_check")


@pytest.mark.slow
def test_quick_cpu_run_passes_every_check_that_runs_on_a_cpu_and_skips_the_cuda_only_ones(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cpu", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [CHECK_LINE.match(line) for line in result.stdout.splitlines()]
    outcomes = {match[2]: (match[1], match[3]) for match in lines if match}
    assert set(outcomes) == set(load_gpu_check().TITLES.values())
    for title, (status, detail) in outcomes.items():
        assert status == ("SKIP" if title in CUDA_ONLY else "PASS"), (title, status, detail)
        assert detail.strip(), title  # a number for PASS, a reason for SKIP
    assert "12 groups" in outcomes["grid, 48 configs, 4-class"][1]  # the paper's 48 configs in fused groups of 4
    summary = result.stdout.split("SUMMARY\n", 1)[1].splitlines()
    assert summary[0].split("|")[0].strip() == "check"
    assert len([row for row in summary if row.startswith("  ") and "|" in row]) == 1 + len(outcomes)
    assert "0 of 10 checks failed" in result.stdout


def test_a_check_that_raises_is_a_fail_line_the_others_still_run_and_the_exit_status_is_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_check = load_gpu_check()

    def broken(ctx):
        raise RuntimeError("kernel not found")

    monkeypatch.setitem(gpu_check.CHECKS, "dropout", broken)
    status = gpu_check.main(["--quick", "--cpu", "--checks", "dropout,adam", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert re.search(r"^FAIL dropout generator: RuntimeError: kernel not found", out, re.MULTILINE)
    assert re.search(r"^PASS fused Adam: ", out, re.MULTILINE)
    assert "1 of 2 checks failed: dropout generator" in out


def test_unknown_check_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_gpu_check().parse_args(["--checks", "grid,warp"])
    assert exit_info.value.code == 2
    assert "unknown ['warp']" in capsys.readouterr().err
