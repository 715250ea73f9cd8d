"""A run's folder as a type (pipeline.results.run_folder): what the grid writes is what every reader reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.results.run_folder import RunDocument, RunFolder, RunFolderError, ScoreFile


def test_a_run_document_and_a_score_file_round_trip_and_the_run_is_finished_only_with_its_metrics(tmp_path: Path):
    folder = RunFolder.of(tmp_path / "grid", "0123abcd4567")
    folder.path.mkdir(parents=True)
    document = RunDocument(
        grid="g",
        run={"proj_dim": 16, "lr_milestones": [6, 11]},
        data={"protocol": 6},
        train_store="/c/train.zarr",
        val_store="/c/val.zarr",
        test_stores={"test": "/c/test.zarr", "test_jpeg": "/c/test.zarr"},
    )
    folder.write_document(document)
    assert folder.read_document() == document
    assert document.store_of("val", "val") == "/c/val.zarr" and document.store_of("test_jpeg", "val") == "/c/test.zarr"
    scores = ScoreFile(
        np.array(["a/1.png", 'b,odd "name".png']), np.array([0, 1]), np.array(["a", "b"]), np.array([0.1, 1 / 3])
    )
    folder.write_scores("test", scores)
    back = folder.read_scores("test")
    assert back.paths.tolist() == scores.paths.tolist() and back.scores.tolist() == [0.1, 1 / 3]  # full precision
    assert not folder.is_finished() and folder.missing() == ["head.safetensors", "metrics.csv"]
    folder.write_metrics([])
    assert folder.is_finished() and folder.read_metrics() == []
    assert folder.read_fit() == {}


def test_a_bad_score_file_or_config_names_the_file_and_line(tmp_path: Path):
    folder = RunFolder(tmp_path)
    folder.scores_path("val").write_text("path,label,dataset,score\na.png,0,d,0.2\nb.png,2,d,0.5\n")
    with pytest.raises(RunFolderError, match=r"scores_val\.csv:3: label must be 0 or 1"):
        folder.read_scores("val")
    folder.config_path.write_text("grid: g\n")
    with pytest.raises(RunFolderError, match=r"config\.yaml: not a run's config\.yaml"):
        folder.read_document()
