"""Paper mode: the layout check, the planner, and the whole run on a miniature copy of the real layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from conftest import TINY_CLIP, read_csv_rows, write_image
from pipeline.cli import main as cli
from pipeline.features import LAYOUTS
from pipeline.paper import (
    DIFFUSION_TEST_SETS,
    GAN_TEST_FOLDERS,
    SPLITS,
    SYNTHBUSTER_GENERATORS,
    TRAIN_CLASSES,
    PaperConfig,
    PaperError,
    check_data,
    plan_paper,
)
from pipeline.variants import VariantGroup, ten_crop_variants

REPO = Path(__file__).resolve().parents[1]
LARGE, BASE = "openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32"
CLASS_FOLDER_GENERATORS = ("progan", "stylegan", "stylegan2", "cyclegan")  # test sets with class subfolders
PAPER_TEST_SETS = [*("sitd" if g == "seeingdark" else g for g in GAN_TEST_FOLDERS), *DIFFUSION_TEST_SETS]
STRAY_TEST_FOLDER = "whichfaceisreal"
IMAGE_SIZE = (40, 36)


# ---------------------------------------------------------------- a miniature DATA_ROOT


def write_images(folder: Path, count: int, seed: int) -> None:
    for i in range(count):
        write_image(folder / f"{i:03d}.png", IMAGE_SIZE, seed * 100 + i)


def make_paper_layout(root: Path, *, per_folder: int = 2, synthbuster: bool = False, ldm: bool = False) -> Path:
    """Every folder of the real layout (4-class train/val, the 20 test sets), a stray test folder; optional sets."""
    seed = iter(range(10_000))
    for part in ("train", "val"):
        for name in TRAIN_CLASSES:
            for label in ("0_real", "1_fake"):
                write_images(root / part / name / label, per_folder, next(seed))
    for generator in (*GAN_TEST_FOLDERS, STRAY_TEST_FOLDER):
        classes = ("car", "horse") if generator in CLASS_FOLDER_GENERATORS else ("",)
        for name in classes:
            for label in ("0_real", "1_fake"):
                write_images(root / "test" / generator / name / label, per_folder, next(seed))
    diffusion = root / "test" / "diffusion_datasets"
    for name in DIFFUSION_TEST_SETS:
        write_images(diffusion / name / "1_fake", per_folder, next(seed))
    for real in ("imagenet", "laion"):
        write_images(diffusion / real / "0_real", per_folder, next(seed))
    if synthbuster:
        for generator in SYNTHBUSTER_GENERATORS:
            write_images(root / "synthbuster" / generator, per_folder, next(seed))
        write_images(root / "RAISEpng", per_folder, next(seed))
    if ldm:  # fakes per subfolder; reals listed by name, from train/<class>/0_real/ and COCO 2014
        for part in ("train", "valid"):
            folder = root / "latent_diffusion_trainingset" / part
            write_images(folder / "bedroom", per_folder, next(seed))
            (folder / "real_lsun.txt").write_text(
                "".join(f"{c}_{i:03d}.png\n" for c in ("car", "horse") for i in range(per_folder))
            )
            names = [f"{part}{i:09d}.png" for i in range(per_folder)]
            for i, name in enumerate(names):
                write_image(root / "coco" / "train2014" / f"COCO_train2014_{name}", IMAGE_SIZE, next(seed) * 100 + i)
            (folder / "real_coco.txt").write_text("".join(f"{name}\n" for name in names))
    return root


def make_layout_folders(root: Path) -> Path:
    """The required folders only, empty: enough for the layout check and the planner."""
    for source in SPLITS.values():
        if source.optional is None:
            for folder in source.folders:
                (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def write_grid(
    path: Path, *, model: str = LARGE, tap: str = "ln2", train: str = "train_4class", tests: list, epochs=(1,)
) -> Path:
    document = {
        "name": path.stem,
        "data": {"model": model, "tap": tap, "train": train, "val": "val_4class", "test": tests},
        "grid": {"epochs": list(epochs), "proj_dim": [8]},
    }
    path.write_text(yaml.safe_dump(document))
    return path


# ---------------------------------------------------------------- layout check


def test_missing_folders_are_listed_and_the_expected_layout_shown(tmp_path: Path) -> None:
    (tmp_path / "train" / "car" / "0_real").mkdir(parents=True)
    (tmp_path / "test" / "diffusion_datasets" / "laion" / "0_real").mkdir(parents=True)
    with pytest.raises(PaperError) as error:
        check_data(tmp_path)
    missing = str(error.value).split("missing:")[1].split("expected")[0].split()
    assert "train/car/0_real/" not in missing and "train/car/1_fake/" in missing
    assert "test/diffusion_datasets/laion/0_real/" not in missing
    assert {"val/horse/0_real/", "test/seeingdark/", "test/diffusion_datasets/dalle/1_fake/"} <= set(missing)
    # 2 x 4 classes x 2 labels, 12 GAN folders, 8 diffusion sets, 2 real folders; two exist
    assert len(missing) == len(set(missing)) == 16 + 12 + 8 + 2 - 2
    assert "synthbuster" not in " ".join(missing)  # optional data are never "missing"


def test_paper_command_exits_1_naming_the_missing_folders(tmp_path: Path) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["paper", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and result.output.startswith("Error: DATA_ROOT")
    result = CliRunner().invoke(cli, ["paper", str(tmp_path)])
    assert result.exit_code == 1 and "missing:" in result.output and "test/imle/" in result.output
    assert CliRunner().invoke(cli, ["paper", str(tmp_path), "--jobs", "0"]).exit_code == 2


def test_optional_data_are_absent_without_their_first_folder_and_incomplete_when_partial(tmp_path: Path) -> None:
    root = make_layout_folders(tmp_path)
    data = check_data(root)
    assert data.present == {"train_4class", "val_4class", "test_gan", "test_diffusion"}
    assert "Synthbuster" in data.absent["synthbuster"] and "absent" in data.absent["synthbuster"]
    (root / "synthbuster" / "dalle2").mkdir(parents=True)
    with pytest.raises(PaperError, match=r"(?s)RAISEpng/.*synthbuster/firefly/"):
        check_data(root)


# ---------------------------------------------------------------- planning


def plan(tmp_path: Path, grids: list[Path], backbones=(LARGE, BASE), synthbuster: bool = False):
    root = make_layout_folders(tmp_path / "data")
    if synthbuster:
        for folder in SPLITS["synthbuster"].folders:
            (root / folder).mkdir(parents=True, exist_ok=True)
    config = PaperConfig(data_root=root, backbones=tuple(backbones), grid_files=tuple(grids))
    return plan_paper(config, check_data(root))


def test_a_grid_naming_the_ten_crop_group_plans_a_ten_crop_extraction(tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "sb.yaml", tests=[{"split": "synthbuster", "variant": "tencrop"}])
    result = plan(tmp_path, [grid], synthbuster=True)
    ten_crops = [job for job in result.extractions if job.group == VariantGroup.ten_crop()]
    assert [(job.split, job.model, job.taps) for job in ten_crops] == [("synthbuster", LARGE, ("ln2",))]
    config = PaperConfig(data_root=tmp_path / "data")
    assert ten_crops[0].extract_config(config).variants() == ten_crop_variants()
    assert "synthbuster" in {source.split for source in result.manifests}
    assert result.fits and not [g for g in result.grids if g.skip_reason]


def test_optional_and_unselected_grids_are_skipped_with_the_reason(tmp_path: Path) -> None:
    sb = write_grid(tmp_path / "sb.yaml", tests=[{"split": "synthbuster", "variant": "tencrop"}])
    base = write_grid(tmp_path / "b32.yaml", model=BASE, tests=["test_gan"])
    own = write_grid(tmp_path / "own.yaml", tests=["my_benchmark"])
    result = plan(tmp_path, [sb, base, own], backbones=(LARGE,))
    reasons = {g.path.name: g.skip_reason for g in result.grids}
    assert "Synthbuster" in reasons["sb.yaml"] and "absent" in reasons["sb.yaml"]
    assert BASE in reasons["b32.yaml"] and "not among the selected backbones" in reasons["b32.yaml"]
    assert "'my_benchmark'" in reasons["own.yaml"]
    assert result.fits == () and result.extractions == () and result.manifests == ()
    assert "skip" in result.describe() and "not among the selected backbones" in result.describe()


def test_training_views_are_the_largest_epochs_and_taps_share_forward_passes(tmp_path: Path) -> None:
    grids = [
        write_grid(tmp_path / "short.yaml", tests=["test_gan"], epochs=(1, 3)),
        write_grid(
            tmp_path / "long.yaml", tests=["test_gan", {"split": "test_gan", "variant": "jpeg-official"}], epochs=(15,)
        ),
        write_grid(tmp_path / "hidden.yaml", tap="hidden", tests=["test_gan"], epochs=(2,)),
    ]
    result = plan(tmp_path, grids)
    train = [(job.views, job.taps) for job in result.extractions if job.split == "train_4class"]
    # view_000/001 for both taps in one pass, then ln2 alone up to 15: no tap stores views its grids never read
    assert train == [(2, ("ln2", "hidden")), (15, ("ln2",))]
    assert all(job.group.is_training for job in result.extractions if job.split == "train_4class")
    evaluation = {(job.split, job.group.name, job.taps) for job in result.extractions if not job.group.is_training}
    assert evaluation == {
        ("val_4class", "center", ("ln2", "hidden")),
        ("test_gan", "center", ("ln2", "hidden")),
        ("test_gan", "jpeg-official", ("ln2",)),
    }
    assert any("15 augmented view(s)" in note and "long.yaml" in note for note in result.notes)
    assert [source.split for source in result.manifests] == ["train_4class", "val_4class", "test_gan"]


def test_test_manifests_keep_exactly_the_paper_test_sets() -> None:
    assert SPLITS["test_gan"].generators == tuple(PAPER_TEST_SETS[:12])
    assert SPLITS["test_diffusion"].generators == tuple(PAPER_TEST_SETS[12:])
    from pipeline.results import reference

    assert tuple(PAPER_TEST_SETS) == reference.PAPER_DATASETS


def test_every_shipped_grid_is_planned_or_skipped_for_a_reason(tmp_path: Path) -> None:
    shipped = [REPO / "grid.yaml", *sorted(p for p in (REPO / "grids").glob("*.yaml") if p.name != "demo.yaml")]
    result = plan(tmp_path, shipped, synthbuster=True)
    skipped = {g.path.name: g.skip_reason for g in result.grids if g.skip_reason}
    assert set(skipped) <= {"ldm_vitl14.yaml"}  # the LDM grid only where its layout exists
    train_views = {job.views for job in result.extractions if job.split == "train_4class" and job.model == LARGE}
    assert max(train_views) == 15  # the epochs study


# ---------------------------------------------------------------- the whole paper mode, end to end


def shrink_grid(source: Path, target: Path) -> Path:
    """A shipped grid with the same data and study axes, and fewer, smaller heads (first and last xi, q, d')."""
    document = yaml.safe_load(source.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    small_dim = {128: 4, 256: 6, 512: 8, 1024: 8}
    if "proj_dim" in (document.get("base") or {}):
        document["base"]["proj_dim"] = small_dim[document["base"]["proj_dim"]]
    blocks = document.get("grid") or []
    for block in blocks if isinstance(blocks, list) else [blocks]:
        for key in ("contrastive_factor", "proj_layers", "proj_dim"):
            if key in block:
                values = sorted({block[key][0], block[key][-1]})
                block[key] = sorted({small_dim[v] for v in values}) if key == "proj_dim" else values
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


def save_hub_model(hub: Path, model_id: str, config: dict, seed: int) -> None:
    """A tiny random CLIP saved where the hub cache keeps `model_id` (snapshots/<commit>, refs/main), with its
    visual projection as the real checkpoints have it (the image embedding of grids/baselines_vitl14.yaml)."""
    commit = f"{seed:040x}"
    snapshot = hub / f"models--{model_id.replace('/', '--')}" / "snapshots" / commit
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**config, projection_dim=8)).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_paper_mode_runs_every_grid_on_a_miniature_layout_from_the_hub_cache(tmp_path: Path) -> None:
    data = make_paper_layout(tmp_path / "data", synthbuster=True, ldm=True)
    hub = tmp_path / "hf" / "hub"
    save_hub_model(hub, LARGE, {**TINY_CLIP, "num_hidden_layers": 24}, seed=1)  # 24 blocks, as ViT-L/14's
    save_hub_model(hub, BASE, {**TINY_CLIP, "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}, seed=2)
    work = tmp_path / "work"
    grids = [shrink_grid(REPO / "grid.yaml", work / "grid.yaml")]
    grids += [
        shrink_grid(p, work / "grids" / p.name)
        for p in sorted((REPO / "grids").glob("*.yaml"))
        if p.name != "demo.yaml"
    ]
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "pipeline", "paper", str(data), "--no-progress", "--no-plots", "--device", "cpu"]
    # The default grids are the working directory's grid.yaml and grids/*.yaml: here, the shrunk copies.
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr

    tables = ["acc.csv", "ap.csv", "best.csv", "ablations.csv", "grid.csv", "metrics.csv", "robustness.csv"]
    tables += ["epochs.csv", "fractions.csv", "tie.csv", "detectors.csv", "blocks.csv"]
    planned = {p.name for p in grids}
    if SPLITS["train_ldm"].layout in LAYOUTS:
        tables.append("ldm.csv")
    else:  # the LDM grid waits for its manifest layout
        planned.remove("ldm_vitl14.yaml")
        assert "skip grids/ldm_vitl14.yaml: it reads split 'train_ldm': this version has no manifest layout" in log
    for name in planned:
        assert f"fit  {name}" in log.replace("grids/", "")
    assert "15 augmented view(s), the largest `epochs` of grids/epochs_vitl14.yaml" in log
    assert STRAY_TEST_FOLDER not in (work / "manifests" / "test_gan.csv").read_text()

    reports = work / "reports"
    assert result.stdout.strip() == "reports"
    for table in tables:
        assert (reports / table).is_file(), table
    for table in ("acc.csv", "ap.csv"):
        columns = list(read_csv_rows(reports / table)[0])
        sets = [c for c in columns if c in PAPER_TEST_SETS or c == "avg" or c == STRAY_TEST_FOLDER]
        assert sets == [*PAPER_TEST_SETS, "avg"], columns
    for grid in grids:
        out = work / yaml.safe_load(grid.read_text())["out"]
        if grid.name in planned:
            rows = read_csv_rows(out / "results.csv")
            assert rows and {row["status"] for row in rows} == {"ok"}, grid.name
    ten_crop = read_csv_rows(work / "runs" / "vitl14-synthbuster" / "results.csv")
    assert {row["dataset"] for row in ten_crop if row["split"] != "val"} == set(SYNTHBUSTER_GENERATORS)

    # resumable: a second run extracts and fits nothing new
    again = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    extractions = [line for line in again.stderr.splitlines() if line.startswith("==> extract")]
    assert extractions and all(line.endswith(": already complete") for line in extractions)
    fitted = re.findall(r"(\d+) runs \((\d+) already done, (\d+) failed\)", again.stderr)
    assert len(fitted) == len(planned) and all(n == skipped and failed == "0" for n, skipped, failed in fitted)


@pytest.mark.slow
def test_run_all_paper_is_a_thin_call_of_pipeline_paper(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "run_all.sh"), "paper", str(tmp_path), "--backbones", LARGE],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"+ pipeline paper {tmp_path} --backbones {LARGE}" in result.stdout
    assert f"Error: {tmp_path} does not have the expected layout; missing:" in result.stderr
