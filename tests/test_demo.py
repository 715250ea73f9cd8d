"""The embedded demo: its data carry the traces they claim, and the whole chain runs on them."""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from pipeline import cache
from pipeline.cli import main as cli
from pipeline.demo import COMPLETE_MARKER, GENERATOR_TRACES, make_demo_backbone, make_demo_data
from pipeline.features import AuditConfig, build_manifest, run_audit, write_manifest
from pipeline.heads import load_grid
from pipeline.names import RANDOM_WEIGHTS_MARKER

REPO = Path(__file__).resolve().parents[1]
TEST_GENERATORS = ("dalle", "guided", "progan", "stylegan")


def read_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


def read_pairs(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(real, fake) pixels paired by file stem (guided's reals are .jpg, every fake .png)."""
    reals = {p.stem: p for p in (folder / "0_real").iterdir()}
    fakes = {p.stem: p for p in (folder / "1_fake").iterdir()}
    assert sorted(reals) == sorted(fakes)
    return [(read_pixels(reals[stem]), read_pixels(fakes[stem])) for stem in sorted(reals)]


def block_flatness(image: np.ndarray) -> float:
    """Energy of horizontal differences inside 2x2 blocks over that across block borders."""
    inside = image[:, 0::2] - image[:, 1::2]
    across = image[:, 1:-1:2] - image[:, 2::2]
    return float((inside**2).mean() / (across**2).mean())


def odd_over_even_phase(image: np.ndarray) -> float:
    """Mean of the (odd row, odd column) pixels over that of the (even, even) pixels."""
    return float(image[1::2, 1::2].mean() / image[0::2, 0::2].mean())


def laplacian_energy(image: np.ndarray) -> float:
    lap = 4 * image[1:-1, 1:-1] - image[:-2, 1:-1] - image[2:, 1:-1] - image[1:-1, :-2] - image[1:-1, 2:]
    return float((lap**2).mean())


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(root, n_train=12, n_test=6, seed=0)
    return root


def test_demo_data_has_the_folder_layout(demo_data: Path) -> None:
    files = sorted(p.relative_to(demo_data).as_posix() for p in demo_data.rglob("*.*") if not p.name.startswith("."))
    expected = []
    for part, generators, count in (("train", ["progan"], 12), ("val", ["progan"], 6), ("test", TEST_GENERATORS, 6)):
        for generator in generators:
            for label in ("0_real", "1_fake"):
                extension = "jpg" if (part, generator, label) == ("test", "guided", "0_real") else "png"
                expected += [f"{part}/{generator}/{label}/{i:05d}.{extension}" for i in range(count)]
    assert files == sorted(expected)
    assert set(GENERATOR_TRACES) == set(TEST_GENERATORS)
    image = Image.open(demo_data / "test" / "dalle" / "1_fake" / "00000.png")
    assert (image.mode, image.size) == ("RGB", (64, 64))
    jpeg = Image.open(demo_data / "test" / "guided" / "0_real" / "00000.jpg")
    assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", (64, 64))


def test_the_demo_audit_flags_its_format_shortcut_and_format_align_removes_it(demo_data: Path, tmp_path: Path) -> None:
    """guided: reals JPEG, fakes PNG: flagged by format; re-encoded as one JPEG, nothing is left to flag."""
    write_manifest(build_manifest("folder", demo_data / "test", "test"), tmp_path / "test.csv")
    original = run_audit(AuditConfig(split="test", manifest=tmp_path / "test.csv", out=tmp_path, progress=False))
    assert ("guided", "format") in [(flag.dataset, flag.feature) for flag in original.result.flags]
    aligned = run_audit(AuditConfig(split="test", manifest=tmp_path / "test.csv", out=tmp_path, progress=False,
                                    perturbation="format-align"))  # fmt: skip
    assert aligned.result.flags == ()
    assert (demo_data / COMPLETE_MARKER).is_file()


def test_demo_data_is_deterministic_for_a_seed(tmp_path: Path, demo_data: Path) -> None:
    make_demo_data(tmp_path / "again", n_train=12, n_test=6, seed=0)
    make_demo_data(tmp_path / "other", n_train=12, n_test=6, seed=1)
    first, again, other = tree_digest(demo_data), tree_digest(tmp_path / "again"), tree_digest(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys()
    images = [name for name in first if name.endswith((".png", ".jpg"))]
    assert all(first[name] != other[name] for name in images)


def test_nearest_fakes_are_flat_inside_2x2_blocks(demo_data: Path) -> None:
    for folder in (demo_data / "train" / "progan", demo_data / "test" / "progan"):
        pairs = read_pairs(folder)
        # a fake's 2x2 blocks differ only by the generator's faint noise
        assert max(block_flatness(fake) for _, fake in pairs) < 0.1
        # a real's pixel pairs differ alike inside and across blocks (ratio about 1)
        assert np.median([block_flatness(real) for real, _ in pairs]) > 0.5


def test_checkerboard_fakes_brighten_one_pixel_phase(demo_data: Path) -> None:
    pairs = read_pairs(demo_data / "test" / "dalle")
    real_ratio = np.mean([odd_over_even_phase(real) for real, _ in pairs])
    fake_ratio = np.mean([odd_over_even_phase(fake) for _, fake in pairs])
    # 3x3 stride-2 transposed convolution: 4 taps on (odd, odd) vs 1 on (even, even), strength 0.08
    expected = (1 + 0.08 * (4 / 2.25 - 1)) / (1 + 0.08 * (1 / 2.25 - 1))
    assert abs(real_ratio - 1.0) < 0.02
    assert abs(fake_ratio - expected) < 0.03


def test_smooth_fakes_lack_high_frequencies(demo_data: Path) -> None:
    for generator in ("stylegan", "guided"):
        for real, fake in read_pairs(demo_data / "test" / generator):
            assert laplacian_energy(fake) < 0.6 * laplacian_energy(real)


def test_fake_shows_the_scene_of_its_real(demo_data: Path) -> None:
    for generator in TEST_GENERATORS:
        pairs = read_pairs(demo_data / "test" / generator)
        for index, (real, fake) in enumerate(pairs):
            coarse = lambda image: image.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))  # noqa: E731
            own = np.abs(coarse(real) - coarse(fake)).mean()
            other = np.abs(coarse(real) - coarse(pairs[(index + 1) % len(pairs)][1])).mean()
            assert own < 6.0 < other


def test_demo_data_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a demo build"):
        make_demo_data(tmp_path, n_train=2, n_test=2, seed=0)
    assert (tmp_path / "mine.txt").read_text() == "user data"


# ---------------------------------------------------------------- backbone


def test_demo_backbone_is_a_seeded_tiny_clip_with_zero_mean_patch_kernels(tmp_path: Path, capfd) -> None:
    make_demo_backbone(tmp_path / "a", seed=3)
    assert "Writing model shards" not in capfd.readouterr().err  # no third-party bar for one tiny local file
    assert (tmp_path / "a" / RANDOM_WEIGHTS_MARKER).is_file()  # the report says the backbone is random
    make_demo_backbone(tmp_path / "b", seed=3)
    make_demo_backbone(tmp_path / "c", seed=4)
    model = CLIPVisionModel.from_pretrained(tmp_path / "a")
    config = model.config
    assert (config.image_size, config.patch_size, config.hidden_size) == (64, 8, 64)
    assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (4, 4, 128)
    assert not (tmp_path / "a" / "preprocessor_config.json").exists()
    kernels = model.get_input_embeddings().weight.detach()
    assert kernels.shape == (64, 3, 8, 8)
    assert kernels.mean(dim=(2, 3)).abs().max() < 1e-6
    assert kernels.std() > 0.01
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


# ---------------------------------------------------------------- the chain


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def reduced_demo_grid(tmp_path: Path, backbone: Path) -> Path:
    """grids/demo.yaml with this test's paths and a two-run grid."""
    document = yaml.safe_load((REPO / "grids" / "demo.yaml").read_text())
    document["out"] = str(tmp_path / "runs" / "demo")
    document["data"]["cache_dir"] = str(tmp_path / "cache")
    document["data"]["model"] = str(backbone)
    document["base"].update(epochs=2, batch_size=16)
    document["grid"] = {"contrastive_factor": [0.1], "proj_layers": [1], "proj_dim": [16, 32]}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow
def test_demo_chain_manifest_extract_fit_report(tmp_path: Path) -> None:
    data, backbone = tmp_path / "data", tmp_path / "tiny-random-clip"
    make_demo_data(data, n_train=16, n_test=4, seed=0)
    make_demo_backbone(backbone, seed=0)
    manifests, cache_dir = tmp_path / "manifests", tmp_path / "cache"
    for split in ("train", "val", "test"):
        invoke(
            "manifest",
            "--layout",
            "folder",
            "--root",
            str(data / split),
            "--split",
            split,
            "--manifests-dir",
            str(manifests),
        )
    common = ["--model", str(backbone), "--cache-dir", str(cache_dir), "--no-progress", "--workers", "1"]
    invoke("extract", "--split", "train", "--manifest", str(manifests / "train.csv"), "--views", "2", *common)
    for split in ("val", "test"):
        invoke("extract", "--split", split, "--manifest", str(manifests / f"{split}.csv"), *common)
    invoke(
        "extract", "--split", "test", "--manifest", str(manifests / "test.csv"), "--perturb", "format-align", *common
    )

    expected_rows = {"train": 32, "val": 8, "test": 32}
    expected_variants = {"train": {"view_000", "view_001"}, "val": {"center"}, "test": {"center", "format-align-q95"}}
    for split, n_rows in expected_rows.items():
        path = cache.default_store_path(cache_dir, str(backbone), "ln2", split)
        info = cache.open_store_info(path)
        assert set(info.complete_variants) == expected_variants[split]
        rows = cache.read_rows(path)
        assert len(rows.labels) == n_rows and rows.valid.all()
        assert rows.labels.sum() == n_rows // 2
        for variant in expected_variants[split]:
            assert cache.read_features(path, variant).shape == (n_rows, 4, 64)
    test_rows = cache.read_rows(cache.default_store_path(cache_dir, str(backbone), "ln2", "test"))
    assert sorted(set(test_rows.datasets)) == sorted(TEST_GENERATORS)

    grid = reduced_demo_grid(tmp_path, backbone)
    results = Path(invoke("fit", "--grid", str(grid), "--no-progress").strip().splitlines()[-1])
    with open(results, newline="") as handle:
        rows = list(csv.DictReader(handle))
    n_runs, n_datasets = 2, 1 + 2 * len(TEST_GENERATORS)  # val (progan) + the four test generators, center and aligned
    assert len(rows) == n_runs * n_datasets
    assert {row["status"] for row in rows} == {"ok"}
    aligned = "test_format-align-q95"
    assert sorted((row["split"], row["dataset"]) for row in rows if row["proj_dim"] == "16") == sorted(
        [("val", "progan")] + [(split, g) for g in TEST_GENERATORS for split in ("test", aligned)]
    )
    assert {row["n"] for row in rows if row["split"] in ("test", aligned)} == {"8"}
    assert all(0.0 <= float(row["ap"]) <= 1.0 for row in rows)

    reports = tmp_path / "reports"
    output = invoke("report", "--no-plots", "--out", str(reports), str(results.parent))
    lines = output.strip().splitlines()  # the result comes last: the summary card's lines
    assert "== result ==" in lines and lines[-1].startswith("details: ")
    assert f"{backbone} is a random-weight backbone (the demo's)" in output
    with open(reports / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == n_runs * n_datasets
    with open(reports / "format_align.csv", newline="") as handle:
        assert {row["dataset"] for row in csv.DictReader(handle)} == {*TEST_GENERATORS, "avg"}


def test_demo_grid_file_matches_what_run_all_builds() -> None:
    spec = load_grid(REPO / "grids" / "demo.yaml")
    assert spec.model == "demo/tiny-random-clip"
    assert [spec.train.name, spec.val.name, [t.name for t in spec.tests]] == [
        "train", "val", ["test", "test_format-align-q95"]
    ]  # fmt: skip
    searched = [r for r in spec.runs if r.head_blocks == "all" and r.aggregation == "tie" and r.contrastive_factor > 0]
    assert len(searched) == 8
    assert {(r.contrastive_factor, r.proj_layers, r.proj_dim) for r in searched} == {
        (xi, q, d) for xi in (0.1, 0.8) for q in (1, 2) for d in (32, 64)
    }
    assert sorted((r.head_blocks, r.aggregation, r.contrastive_factor) for r in spec.runs if r not in searched) == [
        ("all", "mean", 0.1),
        ("all", "tie", 0.0),
        ("last", "tie", 0.1),
    ]


# ---------------------------------------------------------------- run_all.sh


def run_all_demo_lines() -> list[str]:
    """The body of run_all.sh's run_demo function, one command per line (continuations joined)."""
    script = (REPO / "run_all.sh").read_text().replace("\\\n", " ")
    body = script.split("run_demo() {", 1)[1].split("\n}\n", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_run_all_demo_shows_progress_and_ends_with_the_result() -> None:
    script = (REPO / "run_all.sh").read_text()
    assert re.search(r"^DEMO_VIEWS=\d+$", script, re.MULTILINE)
    lines = run_all_demo_lines()
    extracts = [line for line in lines if line.startswith("run_pipeline extract")]
    assert len(extracts) == 3 and not any("--no-progress" in line for line in extracts)  # progress is shown
    assert '--views "$DEMO_VIEWS"' in extracts[0]
    assert lines[-1].startswith("run_pipeline report")  # its last lines are the summary card's
    assert "installing dependencies (~3 min" in script


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "run_all.sh"), *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_run_all_unknown_mode_prints_usage_and_exits_2() -> None:
    for args in ((), ("bogus",), ("demo", "extra")):
        result = run_script(*args)
        assert result.returncode == 2
        assert "usage: ./run_all.sh demo" in result.stderr
