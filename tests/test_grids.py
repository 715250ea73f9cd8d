"""The shipped grid files: each parses, and the studies run the authors' configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.heads import load_grid

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "grid.yaml", *sorted((REPO / "grids").rglob("*.yaml"))]  # grids/genimage/ too
SETTINGS = {1: ("horse",), 2: ("chair", "horse"), 4: ("car", "cat", "chair", "horse")}
# The authors' best 1-epoch config per setting as (xi, q, d') (paper Table 1; results/dataset_size/ file names).
BEST = {1: (0.1, 4, 1024), 2: (0.2, 4, 128), 4: (0.2, 2, 1024)}


def configs(path: Path) -> set[tuple]:
    """(n_classes, xi, q, d', epochs, train_fraction) of every run of a grid."""
    return {
        (len(r.classes or ()), r.contrastive_factor, r.proj_layers, r.proj_dim, r.epochs, r.train_fraction)
        for r in load_grid(path).runs
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_grid_parses_and_trains_in_float32_as_the_authors(path: Path) -> None:
    spec = load_grid(path)
    assert len(spec.runs) >= 1 and spec.name and spec.tests
    assert {run.amp for run in spec.runs} == {"none"}


def test_epochs_study_runs_the_authors_top_three_per_setting_for_each_length() -> None:
    # results/epochs/ViT-L-14_<classes>_<xi>_<q>_<d'>_128_0.001_<epochs>.pickle in mever-team/rine
    top3 = {
        1: [(0.1, 1, 1024), (0.1, 4, 1024), (0.2, 1, 1024)],
        2: [(0.2, 4, 128), (0.4, 4, 128), (0.8, 4, 128)],
        4: [(0.2, 2, 1024), (0.8, 2, 1024), (0.8, 4, 1024)],
    }
    expected = {(n, *c, e, 1.0) for n, cs in top3.items() for c in cs for e in (1, 3, 5, 10, 15)}
    assert configs(REPO / "grids" / "epochs_vitl14.yaml") == expected


def test_fractions_and_robustness_studies_cover_every_setting_with_its_best_config() -> None:
    fractions = {(n, *BEST[n], 1, f) for n in SETTINGS for f in (0.2, 0.5, 0.8, 1.0)}
    assert configs(REPO / "grids" / "fractions_vitl14.yaml") == fractions
    assert configs(REPO / "grids" / "robustness_vitl14.yaml") == {(n, *BEST[n], 1, 1.0) for n in SETTINGS}
    robustness = load_grid(REPO / "grids" / "robustness_vitl14.yaml")
    perturbed = {(t.path.stem, t.variant) for t in robustness.tests if t.variant}
    kinds = ("blur", "crop", "jpeg", "noise", "combined")
    assert perturbed == {(s, f"{k}-official") for s in ("test_gan", "test_diffusion") for k in kinds}
    for run in robustness.runs:
        assert run.classes == SETTINGS[len(run.classes)]


def test_ldm_setting_is_the_authors_grid_tested_on_synthbuster_by_ten_crops() -> None:
    spec = load_grid(REPO / "grids" / "ldm_vitl14.yaml")
    assert (spec.train.path.stem, spec.val.path.stem) == ("train_ldm", "val_ldm")
    assert [(t.path.stem, t.variant) for t in spec.tests] == [("synthbuster", "tencrop")]
    # results/diffusion/ViT-L-14_<xi>_<q>_<d'>_128_0.001_<epochs>.pickle
    assert configs(REPO / "grids" / "ldm_vitl14.yaml") == {
        (0, xi, q, d, e, 1.0) for xi in (0.2, 0.4) for q in (2, 4) for d in (512, 1024) for e in (1, 3, 5)
    }
    assert spec.select_across == ("epochs",)  # one best over all 24 runs, as the authors pick their LDM model
    synthbuster = load_grid(REPO / "grids" / "synthbuster_vitl14.yaml")
    assert [(t.path.stem, t.variant) for t in synthbuster.tests] == [("synthbuster", "tencrop")]


def test_genimage_grids_run_the_best_4_class_config_by_protocol() -> None:
    standard = load_grid(REPO / "grids" / "genimage" / "standard_vitl14.yaml")
    matrix = load_grid(REPO / "grids" / "genimage" / "matrix_vitl14.yaml")
    for spec in (standard, matrix):
        assert [(r.contrastive_factor, r.proj_layers, r.proj_dim) for r in spec.runs] == [BEST[4]]
        assert spec.model == "openai/clip-vit-large-patch14" and spec.train.name == "train_genimage"
        assert [t.name for t in spec.tests] == ["genimage"]
    assert [(r.protocol, r.train_datasets) for r in standard.runs] == [("standard", ("stable_diffusion_v_1_4",))]
    assert [(r.protocol, r.train_datasets) for r in matrix.runs] == [("one-vs-rest", None)]


def test_the_baselines_grid_runs_ufds_probes_and_a_probe_per_block_beside_one_rine_config() -> None:
    spec = load_grid(REPO / "grids" / "baselines_vitl14.yaml")
    heads = {(run.head, run.features) for run in spec.runs if run.head in ("rine", "linear", "knn")}
    assert heads == {("rine", "blocks"), ("linear", "embedding"), ("knn", "embedding")}
    probes = [run for run in spec.runs if run.head == "logreg"]
    assert {run.block for run in probes} == set(range(24)) and {run.C for run in probes} == {0.1, 1.0}
