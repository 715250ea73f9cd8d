"""Tests of pipeline.features.manifest: CSV round trip, identity, validation, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.features import Manifest, ManifestError, ManifestRow, manifest_path, read_manifest, write_manifest


def rows_of(manifest: Manifest) -> list[tuple[str, int, str, str | None]]:
    return [(r.path, r.label, r.dataset, r.class_name) for r in manifest.rows]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


# ------------------------------------------------------------------ write / read / identity


def save_tiny_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


def test_round_trip_with_sidecar_unicode_and_spaces(tmp_path: Path) -> None:
    data = tmp_path / "dätä root"
    names = ["real/été photo.png", 'fake/a, "quoted" name.png', "fake/日本 画像.png"]
    for value, name in enumerate(names):
        save_tiny_png(data / name, 10 * value)
    manifest = Manifest(
        split="mixed",
        rows=(
            ManifestRow(names[0], 0, "set one", "chat noir"),
            ManifestRow(names[1], 1, "set one", None),
            ManifestRow(names[2], 1, "セット", "猫"),
        ),
        data_root=data,
        layout="folder",
        options={"classes": ["a", "b"]},
    )
    csv_path = manifest_path(tmp_path / "manifests", "mixed")
    assert csv_path == tmp_path / "manifests" / "mixed.csv"
    write_manifest(manifest, csv_path)
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["mixed.csv", "mixed.json"]
    assert json.loads((tmp_path / "manifests/mixed.json").read_text(encoding="utf-8")) == {
        "data_root": str(data),
        "layout": "folder",
        "options": {"classes": ["a", "b"]},
    }
    back = read_manifest(csv_path)
    assert back == manifest
    assert back.rows[1].class_name is None
    assert back.resolve(2) == data / "fake" / "日本 画像.png"
    with Image.open(back.resolve(2)) as image:
        assert np.asarray(image)[0, 0, 0] == 20
    moved = tmp_path / "moved"
    assert back.resolve(0, data_root=moved) == moved / "real" / "été photo.png"
    assert back.resolve(-1, moved) == moved / "fake" / "日本 画像.png"


def test_resolve_without_any_root_is_an_error(tmp_path: Path) -> None:
    csv_path = write_text(tmp_path / "bare.csv", "path,label,dataset\na/b.png,1,x\n")
    manifest = read_manifest(csv_path)
    assert manifest.data_root is None and manifest.layout is None
    with pytest.raises(ManifestError, match="no data root given"):
        manifest.resolve(0)
    assert manifest.resolve(0, tmp_path) == tmp_path / "a" / "b.png"


def test_sha256_is_the_hash_of_the_canonical_csv(tmp_path: Path) -> None:
    rows = (ManifestRow("x/a.png", 0, "d"), ManifestRow("x/b c.png", 1, "d"))
    manifest = Manifest("ident", rows, data_root=tmp_path / "one")
    expected_text = "path,label,dataset\nx/a.png,0,d\nx/b c.png,1,d\n"
    assert manifest.sha256() == hashlib.sha256(expected_text.encode("utf-8")).hexdigest()
    assert replace(manifest, data_root=tmp_path / "two").sha256() == manifest.sha256()
    assert replace(manifest, data_root=None, layout="folder").sha256() == manifest.sha256()
    flipped = replace(manifest, rows=(rows[0], replace(rows[1], label=0)))
    assert flipped.sha256() != manifest.sha256()
    csv_path = tmp_path / "ident.csv"
    write_manifest(manifest, csv_path)
    assert hashlib.sha256(csv_path.read_bytes()).hexdigest() == manifest.sha256()
    # A CSV written elsewhere (CRLF line ends, BOM) reads back with the same identity.
    windows_text = "\ufeff" + expected_text.replace("\n", "\r\n")
    foreign = write_text(tmp_path / "other" / "ident.csv", windows_text)
    assert read_manifest(foreign).sha256() == manifest.sha256()


def test_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    csv_path = tmp_path / "s.csv"
    first = Manifest("s", (ManifestRow("a.png", 0, "d"), ManifestRow("b.png", 1, "d")), tmp_path)
    write_manifest(first, csv_path)
    second = Manifest("s", (ManifestRow("c.png", 1, "e"),), None)
    write_manifest(second, csv_path)
    assert csv_path.read_text(encoding="utf-8") == "path,label,dataset\nc.png,1,e\n"
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["data_root"] is None
    assert sorted(os.listdir(tmp_path)) == ["s.csv", "s.json"]
    assert read_manifest(csv_path) == second


@pytest.mark.parametrize(
    "row,reason",
    [
        (ManifestRow("/abs/a.png", 0, "d"), "line 3: path must be relative to the data root"),
        (ManifestRow("x/../a.png", 0, "d"), "line 3: path must not contain '..'"),
        (ManifestRow("a.png", 2, "d"), "line 3: label must be 0 or 1, got '2'"),
        (ManifestRow("a.png", True, "d"), "line 3: label must be 0 or 1, got 'True'"),
        (ManifestRow("b.png", 0, ""), "line 3: empty dataset"),
        (ManifestRow("b.png", 0, "d", ""), "line 3: class must be None or a non-empty name"),
        (ManifestRow("a.png", 1, "d"), "line 3: duplicate of line 2 (path 'a.png', dataset 'd')"),
    ],
)
def test_write_refuses_rows_that_would_not_read_back(tmp_path: Path, row: ManifestRow, reason: str) -> None:
    csv_path = tmp_path / "s.csv"
    good = Manifest("s", (ManifestRow("a.png", 0, "d"),), tmp_path)
    write_manifest(good, csv_path)
    before = csv_path.read_bytes()
    with pytest.raises(ManifestError) as error:
        write_manifest(replace(good, rows=(good.rows[0], row)), csv_path)
    assert str(csv_path) in str(error.value)
    assert reason in str(error.value)
    assert csv_path.read_bytes() == before


def test_write_checks_the_file_name_and_split_name(tmp_path: Path) -> None:
    manifest = Manifest("s", (ManifestRow("a.png", 0, "d"),), None)
    with pytest.raises(ManifestError, match="must be written to a file named s.csv"):
        write_manifest(manifest, tmp_path / "t.csv")
    with pytest.raises(ValueError, match="plain file stem"):
        manifest_path(tmp_path, "../escape")
    with pytest.raises(ValueError, match="plain file stem"):
        manifest_path(tmp_path, "")


# ------------------------------------------------------------------ read validation


@pytest.mark.parametrize(
    "text,line,reason",
    [
        ("path,dataset\na.png,d\n", 1, "missing required column 'label'"),
        ("path,label,dataset,extra\na.png,0,d,e\n", 1, "unknown column 'extra'"),
        ("path,label,dataset,class,class\na.png,0,d,c,c\n", 1, "column 'class' appears twice"),
        ("label,path,dataset\n0,a.png,d\n", 1, "columns must be in the order path,label,dataset"),
        (
            "path,label,dataset\na.png,0,d\nb.png,1\n",
            3,
            "expected 3 fields (path,label,dataset), got 2",
        ),
        ("path,label,dataset,class\na.png,0,d,c,x\n", 2, "expected 4 fields"),
        ("path,label,dataset\na.png,0,d\n\n", 3, "expected 3 fields (path,label,dataset), got 0"),
        ("path,label,dataset\n,0,d\n", 2, "empty path"),
        ("path,label,dataset\na.png,0,d\n/data/b.png,1,d\n", 3, "absolute path '/data/b.png'"),
        ("path,label,dataset\nC:/data/b.png,1,d\n", 2, "absolute path 'C:/data/b.png'"),
        ("path,label,dataset\na/../../b.png,1,d\n", 2, "must not contain '..' components"),
        ("path,label,dataset\na//b.png,1,d\n", 2, "must be normalised"),
        ("path,label,dataset\n./b.png,1,d\n", 2, "must be normalised"),
        ("path,label,dataset\na\\b.png,1,d\n", 2, "must use '/' separators"),
        ("path,label,dataset\na.png,0,d\nb.png,2,d\n", 3, "label must be 0 or 1, got '2'"),
        ("path,label,dataset\na.png, 1,d\n", 2, "label must be 0 or 1, got ' 1'"),
        ("path,label,dataset\na.png,0,\n", 2, "empty dataset"),
        ('path,label,dataset\n"a\nb.png",0,d\n', 2, "path contains a control character"),
        ("path,label,dataset\na\x00b.png,0,d\n", 2, "path contains a control character"),
        ("path,label,dataset\na.png,0,d\tx\n", 2, "dataset contains a control character"),
        (
            "path,label,dataset\na.png,0,d\nb.png,1,d\nx.png,0,e\na.png,1,d\n",
            5,
            "duplicate of line 2 (path 'a.png', dataset 'd')",
        ),
    ],
)
def test_read_validation_errors_name_file_line_and_reason(tmp_path: Path, text: str, line: int, reason: str) -> None:
    csv_path = write_text(tmp_path / "manifests" / "x.csv", text)
    with pytest.raises(ManifestError) as error:
        read_manifest(csv_path)
    message = str(error.value)
    assert message.startswith(f"{csv_path} line {line}: "), message
    assert reason in message


def test_same_path_under_two_datasets_is_allowed(tmp_path: Path) -> None:
    text = "path,label,dataset\nr.png,0,ldm_200\nr.png,0,dalle\n"
    csv_path = write_text(tmp_path / "x.csv", text)
    assert rows_of(read_manifest(csv_path)) == [
        ("r.png", 0, "ldm_200", None),
        ("r.png", 0, "dalle", None),
    ]


@pytest.mark.parametrize(
    "text,reason",
    [
        (None, "no such file"),
        ("path,label,dataset\n", "no rows (header only)"),
        ("", "line 1: empty file"),
    ],
)
def test_read_file_level_errors(tmp_path: Path, text: str | None, reason: str) -> None:
    csv_path = tmp_path / "manifests" / "x.csv"
    if text is not None:
        write_text(csv_path, text)
    with pytest.raises(ManifestError) as error:
        read_manifest(csv_path)
    assert str(error.value).startswith(str(csv_path))
    assert reason in str(error.value)


@pytest.mark.parametrize(
    "sidecar,reason",
    [
        ("{not json", "line 1: invalid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"data_root": "/d", "colour": 1}', "unknown key 'colour'"),
        ('{"layout": "folder"}', "missing key 'data_root'"),
        ('{"data_root": "relative/dir"}', "data_root must be an absolute path"),
        ('{"data_root": "/d", "layout": 3}', "layout must be a string"),
        ('{"data_root": "/d", "options": []}', "options must be a JSON object"),
    ],
)
def test_sidecar_errors_name_the_json_file(tmp_path: Path, sidecar: str, reason: str) -> None:
    csv_path = write_text(tmp_path / "x.csv", "path,label,dataset\na.png,0,d\n")
    json_path = write_text(tmp_path / "x.json", sidecar)
    with pytest.raises(ManifestError) as error:
        read_manifest(csv_path)
    assert str(error.value).startswith(str(json_path))
    assert reason in str(error.value)
