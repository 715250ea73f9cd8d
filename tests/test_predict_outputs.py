"""`pipeline predict` outputs safe to open, and an answer for every input entry (issue 24, items 6 and 7)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_image
from pipeline.cli import main
from pipeline.detector.output import CsvPredictionWriter, PredictionRow

HOSTILE_NAMES = ["=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png", "'quoted.png", "a\rb.png", "\tx.png"]


def row(path: str, error: str = "") -> PredictionRow:
    return PredictionRow(path, 0.25, "real", 0.5, "val", "center", 8, 8, "PNG", "m@local", error)


def test_csv_cells_are_neutralised_quoted_and_read_back_as_written(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    writer = CsvPredictionWriter(out)
    rows = [row(name) for name in HOSTILE_NAMES] + [row("ok.png", error="-1 is not a size")]
    writer.write(rows)
    writer.close()
    with open(out, newline="", encoding="utf-8") as handle:
        records = list(csv.reader(handle))
    assert len(records) == len(rows) + 1  # a \r inside a name does not split its row
    cells = [record[0] for record in records[1:]]
    assert cells[:5] == ["'=HYPERLINK(1).png", "'+1.png", "'-1.png", "'@SUM(1).png", "''quoted.png"]
    assert cells[5:7] == ["a\rb.png", "'\tx.png"] and records[-1][-1] == "'-1 is not a size"
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for record in records for cell in record)
    assert list(CsvPredictionWriter(out).existing_rows()) == rows  # a resume sees the raw names


# ---------------------------------------------------------------- through the command


@pytest.fixture()
def hostile_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Images with names a spreadsheet would run, and entries that are no image files."""
    folder = tmp_path / "in"
    folder.mkdir()
    for seed, name in enumerate(["ok.png", "=HYPERLINK(1).png", "a\rb.png", "-1.png", "@x.png"]):
        write_image(folder / name, (40, 36), seed)
    write_image(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")), (40, 36), 9)  # Latin-1: not UTF-8
    os.mkfifo(folder / "pipe.png")
    (folder / "null.png").symlink_to("/dev/null")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "x.jpg").mkdir()
    monkeypatch.chdir(folder)
    return folder


def predict(run: Path, out: str, code: int) -> str:
    args = ["predict", ".", "--head", str(run), "--out", out, "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


REASONS = {
    "pipe.png": "not a regular file",
    "null.png": "not a regular file",
    "zero.jpg": "not a regular file",
    "loop.jpg": "Too many levels of symbolic links",
    "gone.png": "broken symbolic link",
    "x.jpg": "directory",
}


@pytest.mark.slow
def test_every_entry_gets_a_row_and_hostile_names_round_trip_in_csv(trained_predict_run, hostile_folder) -> None:
    predict(trained_predict_run["run"], "../s.csv", code=3)
    text = (hostile_folder.parent / "s.csv").read_bytes()
    with open(hostile_folder.parent / "s.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = {r["path"]: r for r in csv.DictReader(handle)}
    assert len(rows) == 12
    for name, reason in REASONS.items():
        assert reason in rows[name]["error"] and rows[name]["score"] == "", (name, rows[name])
    assert rows["'=HYPERLINK(1).png"]["score"] and rows["'-1.png"]["label"] in ("real", "fake")
    assert rows["'@x.png"]["score"] and rows["a\rb.png"]["score"] and rows["caf\udce9.png"]["score"]
    output = predict(trained_predict_run["run"], "../s.csv", code=3)  # the resume has nothing left to do
    assert "12 were already in" in output and (hostile_folder.parent / "s.csv").read_bytes() == text


@pytest.mark.slow
def test_jsonl_keeps_raw_names_and_parquet_resumes_a_non_utf8_name_once(trained_predict_run, hostile_folder) -> None:
    import pyarrow.parquet as pq

    predict(trained_predict_run["run"], "../s.jsonl", code=3)
    paths = [json.loads(line)["path"] for line in (hostile_folder.parent / "s.jsonl").read_text().splitlines()]
    assert "=HYPERLINK(1).png" in paths and "a\rb.png" in paths and len(paths) == 12
    for _ in range(3):
        predict(trained_predict_run["run"], "../s.parquet", code=3)
        table = pq.read_table(hostile_folder.parent / "s.parquet").to_pylist()
        assert len(table) == 12  # never the Latin-1 name again
    assert "caf\\xe9.png" in [record["path"] for record in table] and "=HYPERLINK(1).png" in str(table)
