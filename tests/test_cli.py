"""The command line as a whole: one error base, exit statuses, `pipeline demo`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipeline
from pipeline.cli import main as cli
from pipeline.errors import PipelineError


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def library_error_types() -> list[type[Exception]]:
    """Every exception class (not warnings) defined in a pipeline module or subpackage (the CLI itself aside)."""
    found = []
    for module_info in pkgutil.walk_packages(pipeline.__path__, prefix="pipeline."):
        if module_info.name in ("pipeline.cli", "pipeline.__main__"):
            continue
        module = importlib.import_module(module_info.name)
        found += [
            value
            for value in vars(module).values()
            if inspect.isclass(value)
            and issubclass(value, Exception)
            and not issubclass(value, Warning)
            and value.__module__ == module.__name__
        ]
    return found


def test_every_library_error_derives_from_the_one_base() -> None:
    errors = {error.__name__: error for error in library_error_types()}
    assert {"StoreError", "ExtractError", "ManifestError", "ConfigError", "DataError", "ReportError", "PredictError",
            "CheckpointError", "PaperError", "ExportError", "HDF5Error", "DemoError"} <= set(errors)  # fmt: skip
    # Not errors of a command: extraction records an ImageDecodeError per row (valid=false) and goes on;
    # the private shard reader's ShardFileError becomes a StoreError in cache.read_features.
    not_derived = sorted(name for name, error in errors.items() if not issubclass(error, PipelineError))
    assert not_derived == ["ImageDecodeError", "ShardFileError"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "{tmp}"], "Error: {tmp}"),  # ReportError: not a grid folder
        (["fit", "--grid", "{tmp}/grid.yaml"], "Error: {tmp}/grid.yaml: missing key"),  # ConfigError
        (["cache", "info", "{tmp}"], "Error: {tmp}: not a feature store"),  # StoreError
        (["predict", "--head", "{tmp}/grid.yaml", "{tmp}/grid.yaml"], "Error: {tmp}/grid.yaml"),  # CheckpointError
        (["cache", "import", "{tmp}/grid.yaml", "{tmp}/store.zarr"], "Error: {tmp}/grid.yaml: cannot be read as HDF5"),
        (["paper", "{tmp}/absent"], "Error: DATA_ROOT {tmp}/absent is not a folder"),  # PaperError
    ],
)
def test_library_errors_print_one_clean_line_and_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "grid.yaml").write_text("name: g\n")
    result = invoke(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a traceback
    assert result.output.startswith(message.format(tmp=tmp_path)), result.output
    assert "Traceback" not in result.output


def test_library_warnings_print_one_line_and_others_keep_pythons_format(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import warnings

    import pipeline.report
    from pipeline.errors import PipelineWarning

    python_format = warnings.formatwarning

    def formats(config):  # what a warning raised while the command runs prints as
        ours = warnings.formatwarning("views are reused", PipelineWarning, "grid.py", 321, "warn_view_reuse(...)")
        other = warnings.formatwarning("a library's note", DeprecationWarning, "lib.py", 7, "old()")
        raise PipelineError(ours + other)

    monkeypatch.setattr(pipeline.report, "run_report", formats)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1
    ours, other = result.output.removeprefix("Error: ").split("\n", 1)
    assert ours == "Warning: views are reused"  # one line: no file, line or source line
    assert other.startswith("lib.py:7: DeprecationWarning: a library's note\n  old()")  # as Python prints it
    assert warnings.formatwarning is python_format  # restored after the command


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pipeline.report

    def broken(config):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(pipeline.report, "run_report", broken)
    result = invoke("report", str(tmp_path))
    assert isinstance(result.exception, KeyError)


@pytest.mark.parametrize(
    "args",
    [
        ["manifest", "--layout", "cnndetection-test", "--root", "{tmp}", "--split", "x", "--classes", "car"],
        ["manifest", "--layout", "folder", "--root", "{tmp}", "--split", "../x"],
        ["fit", "--grid", "{tmp}/grid.yaml", "--jobs", "0"],
        ["fit", "--grid", "{tmp}/grid.yaml", "--device", "tpu"],
        ["paper", "{tmp}", "--batch-size", "0"],
        ["demo", "--n-train", "0"],
        ["cache", "export", "{tmp}", "{tmp}/out.h5", "--format", "csv"],
        ["bogus-command"],
    ],
)
def test_bad_options_exit_2(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "grid.yaml").write_text("name: g\n")
    result = invoke(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "Usage:" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a machine without one")
def test_cuda_without_a_gpu_is_a_bad_option(tmp_path: Path) -> None:
    (tmp_path / "grid.yaml").write_text("name: g\n")
    result = invoke("fit", "--grid", str(tmp_path / "grid.yaml"), "--device", "cuda")
    assert result.exit_code == 2 and "torch sees no CUDA device" in result.output


def test_demo_command_builds_once_and_rebuilds_for_other_sizes(tmp_path: Path) -> None:
    args = [
        "demo",
        "--root",
        str(tmp_path / "data"),
        "--backbone",
        str(tmp_path / "clip"),
        "--n-train",
        "2",
        "--n-test",
        "1",
    ]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "demo data: 14 images written to" in first.output  # 2 x (2 train + 1 val + 4 generators x 1 test)
    assert "random-weight CLIP saved to" in first.output
    image = tmp_path / "data" / "train" / "progan" / "1_fake" / "00001.png"
    weights = tmp_path / "clip" / "model.safetensors"
    stamps = (image.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    again = invoke(*args)
    assert "demo data: already built" in again.output and "demo backbone: already saved" in again.output
    assert (image.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps
    smaller = invoke(*args[:5], "--n-train", "1", "--n-test", "1")  # other sizes rebuild the data in place
    assert smaller.exit_code == 0 and not image.exists()


def test_demo_command_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    result = invoke(
        "demo", "--root", str(tmp_path), "--backbone", str(tmp_path / "clip"), "--n-train", "1", "--n-test", "1"
    )
    assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path}: not empty and not a demo build")
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_python_m_pipeline_runs_the_cli_only_as_the_main_module() -> None:
    # A worker process started by spawn (a local Dask cluster of `python -m pipeline fit --scheduler local:2`)
    # re-imports the parent's main module as __mp_main__: that must not run the command line again.
    code = "import runpy; runpy.run_module('pipeline', run_name='__mp_main__'); print('imported')"
    child = subprocess.run([sys.executable, "-c", code, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout == "imported\n", child.stdout + child.stderr
    child = subprocess.run(
        [sys.executable, "-m", "pipeline", "fit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0 and child.stdout.startswith("Usage: python -m pipeline fit")
