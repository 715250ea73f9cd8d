"""Shared fixtures: a tiny random CLIP saved to disk, loaded by path like a hub id."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

TINY_CLIP = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module, importing its ``_common`` by file name as when it is run directly."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    return path


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A random RGB image of (width, height) saved by extension."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_folder_dataset(root: Path, n_per_label: int = 6, size: tuple[int, int] = (40, 36), seed: int = 0) -> Path:
    """root/<dataset>/{0_real,1_fake}/*.png for datasets 'a' and 'b'."""
    for d, dataset in enumerate(("a", "b")):
        for label, folder in enumerate(("0_real", "1_fake")):
            for i in range(n_per_label):
                write_image(root / dataset / folder / f"img_{i:03d}.png", size, seed * 1000 + d * 100 + label * 10 + i)
    return root


def write_store(
    path: Path,
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    datasets: list[str],
    classes: list[str] | None = None,
    valid: np.ndarray | None = None,
    *,
    tap: str = "ln2",
    model: str = "synthetic",
    shard_rows: int = 64,
    chunk_rows: int = 16,
) -> Path:
    """A feature store written by ``cache.write_store``, without any backbone.

    ``features`` maps variant names ("center", "view_000", "tencrop_3",
    "jpeg-official") to (N, n_blocks, dim) arrays.
    """
    from pipeline import cache

    n_rows, n_blocks, dim = next(iter(features.values())).shape
    identity = cache.placeholder_identity(
        n_blocks, dim, model_id=model, model_revision="test", tap=tap, crop_size=32, max_pixels=10**8,
        shard_rows=shard_rows, chunk_rows=chunk_rows,
    )  # fmt: skip
    valid = np.ones(n_rows, dtype=bool) if valid is None else valid
    return cache.write_store(
        path,
        identity,
        split=path.stem,
        labels=labels.tolist(),
        paths=[f"{datasets[i]}/{'1_fake' if labels[i] else '0_real'}/{i:05d}.png" for i in range(n_rows)],
        datasets=datasets,
        classes=classes,
        features=features,
        valid=valid,
        errors=["" if ok else "synthetic failure" for ok in valid],
    )


def separable_features(
    n_rows: int, n_blocks: int = 4, dim: int = 16, seed: int = 0, shift: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Features whose fakes are shifted along a fixed direction in every block."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_rows) % 2).astype(np.int8)
    direction = np.random.default_rng(12345).standard_normal(dim)
    direction /= np.linalg.norm(direction)
    features = rng.standard_normal((n_rows, n_blocks, dim)) + shift * labels[:, None, None] * direction
    return features.astype(np.float32), labels


def make_two_tone_dataset(root: Path, n_per_label: int, size: tuple[int, int] = (45, 38)) -> Path:
    """root/<a|b>/{0_real,1_fake}/*.png: reals darker noise, fakes brighter (the tiny random CLIP tells them apart)."""
    rng = np.random.default_rng(7)
    width, height = size
    for dataset in ("a", "b"):
        for label, (low, high) in enumerate(((0, 170), (90, 256))):
            folder = root / dataset / ("0_real", "1_fake")[label]
            folder.mkdir(parents=True)
            for i in range(n_per_label):
                pixels = rng.integers(low, high, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def trained_predict_run(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished run of a one-config grid (temperature calibration), through the CLI, on the tiny CLIP.

    Train and val/test are the same 32 two-tone images (``make_two_tone_dataset``); the
    test entries are the center crop and the ten crops. Returns the run folder, the data
    root and the work folder.
    """
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.heads.grid import ViewReuseWarning

    def invoke(*args: str) -> None:
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 0, result.output

    root = tmp_path_factory.mktemp("predict")
    data = make_two_tone_dataset(root / "data", n_per_label=8)
    manifests = root / "manifests"
    for split in ("train", "test"):
        invoke("manifest", "--layout", "folder", "--root", str(data), "--split", split, "--manifests-dir",
               str(manifests))  # fmt: skip
    common = ["--model", str(tiny_clip_dir), "--cache-dir", str(root / "cache"), "--shard-rows", "16",
              "--chunk-rows", "8", "--no-progress", "--device", "cpu"]  # fmt: skip
    invoke("extract", "--split", "train", "--manifest", str(manifests / "train.csv"), *common)
    invoke("extract", "--split", "test", "--manifest", str(manifests / "test.csv"), *common)
    invoke("extract", "--split", "test", "--manifest", str(manifests / "test.csv"), "--crop", "tencrop", *common)
    grid = root / "grid.yaml"
    grid.write_text(
        f"name: p\nout: {root / 'runs'}\ndata:\n  cache_dir: {root / 'cache'}\n  model: {tiny_clip_dir}\n"
        "  train: train\n  val: test\n  test: [test, {split: test, variant: tencrop}]\n"
        "base: {proj_dim: 16, proj_layers: 1, batch_size: 16, epochs: 10, lr: 0.01, lr_milestones: [], "
        "calibration: temperature}\n"
    )
    with pytest.warns(ViewReuseWarning):  # ten epochs of the one view: plenty for these tests
        invoke("fit", "--grid", str(grid), "--no-progress", "--device", "cpu")
    (run_folder,) = (root / "runs" / "runs").iterdir()
    return {"run": run_folder, "data": data, "root": root}


THROTTLE = '''\
"""Test helper (a sitecustomize): slow every backbone call so that a test can kill a process mid-run; with
RINE_TEST_PIDS set, note this rank's pid there first."""
import os
import time
from pathlib import Path

import pipeline.features.backbone as _backbone

if "RINE_TEST_PIDS" in os.environ:
    Path(os.environ["RINE_TEST_PIDS"], "rank" + os.environ.get("RANK", "0") + "-" + str(os.getpid())).touch()
_DELAY = float(os.environ["RINE_TEST_FORWARD_DELAY"])
_forward_taps = _backbone.Backbone.forward_taps


def _slow_forward_taps(self, images, taps):
    time.sleep(_DELAY)
    return _forward_taps(self, images, taps)


_backbone.Backbone.forward_taps = _slow_forward_taps
'''


def throttled_environment(folder: Path, delay: float, pids: Path | None = None) -> dict[str, str]:
    """The environment of a ``python -m pipeline`` subprocess whose every backbone call sleeps ``delay`` seconds
    (a sitecustomize written to ``folder``), offline; with ``pids``, each process notes its pid there."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(THROTTLE)
    python_path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "RINE_TEST_FORWARD_DELAY": str(delay), "HF_HUB_OFFLINE": "1"}
    if pids is not None:
        pids.mkdir(exist_ok=True)
        env["RINE_TEST_PIDS"] = str(pids)
    return env


COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a hub commit of the test hub caches


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``folder`` as hub repo ``repo_id`` at ``commit`` (its main) in a hub cache at ``cache`` (the layout
    huggingface_hub reads), made the cache of this test."""
    import shutil

    import huggingface_hub.constants

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".cache"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def head_recording(run: Path, out: Path, **metadata: str) -> Path:
    """The run's head.safetensors with its metadata changed (what a head trained on that backbone records)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run / "head.safetensors"), framework="pt") as handle:
        recorded = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={**recorded, **metadata})
    return out


def copy_folder(source: Path, target: Path) -> Path:
    """A plain copy of a folder's files (new times, no hub metadata): what `cp -r` gives."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            (target / file.name).write_bytes(file.read_bytes())
    return target


def make_genimage_tree(
    root: Path, generators: tuple[str, ...], n_per_label: int = 3, size: tuple[int, int] = (40, 36), seed: int = 0
) -> Path:
    """A miniature GenImage: root/<generator>/{train,val}/{ai,nature}/*.png (random pixels per image)."""
    for g, generator in enumerate(generators):
        for p, part in enumerate(("train", "val")):
            for label, folder in enumerate(("nature", "ai")):
                for i in range(n_per_label):
                    image_seed = seed * 10000 + g * 1000 + p * 100 + label * 10 + i
                    write_image(root / generator / part / folder / f"{i:03d}.png", size, image_seed)
    return root


def write_image_parquet(
    path: Path, images: list[bytes | None], labels: list, generators: list[str] | None = None, row_group_size: int = 4
) -> Path:
    """A Parquet file in the Hugging Face `datasets` image layout: image {bytes, path}, label[, generator]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {
        "image": pa.array(
            [None if data is None else {"bytes": data, "path": f"{i}.png"} for i, data in enumerate(images)],
            type=image_type,
        ),
        "label": pa.array(labels),
    }
    if generators is not None:
        columns["generator"] = pa.array(generators)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


GENERATOR_DATASETS = ("a", "b", "c")


def generator_features(n_per_dataset: int, seed: int, datasets=GENERATOR_DATASETS, shift: float = 3.0, dim: int = 16):
    """(features (N, 2, dim), labels, datasets): each dataset's reals at -shift and fakes at +shift along a direction
    of its own (orthogonal to the others'), so that nothing but that direction tells them apart."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(np.random.default_rng(99).standard_normal((dim, dim)))[0][: len(GENERATOR_DATASETS) + 1]
    parts, labels, names = [], [], []
    for dataset in datasets:
        label = (np.arange(n_per_dataset) % 2).astype(np.int8)
        direction = directions[
            GENERATOR_DATASETS.index(dataset) if dataset in GENERATOR_DATASETS else len(GENERATOR_DATASETS)
        ]
        sign = (2.0 * label - 1.0)[:, None, None]
        parts.append(rng.standard_normal((n_per_dataset, 2, dim)) + shift * sign * direction)
        labels.append(label)
        names += [dataset] * n_per_dataset
    return np.concatenate(parts).astype(np.float32), np.concatenate(labels), names


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of text."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
