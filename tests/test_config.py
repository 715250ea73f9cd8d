"""Grid files: ParameterGrid expansion, validation, store references."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.heads import ConfigError, RunConfig, load_grid, make_run_config, parse_grid

REPO = Path(__file__).resolve().parents[1]

GRID = """
name: g
data:
  cache_dir: /c
  model: org/model
  tap: ln2
  train: train
  val: {split: val}
  test: [test, {store: /elsewhere/t.zarr, variant: jpeg-official, name: t_jpeg}]
base:
  epochs: 2
grid:
  proj_dim: [8, 16]
  contrastive_factor: [0.1, 0.2, 0.4]
"""


def test_grid_expands_like_parameter_grid_in_a_fixed_order():
    spec = parse_grid(GRID)
    # ParameterGrid sorts keys: contrastive_factor varies slowest, proj_dim fastest.
    assert [(r.contrastive_factor, r.proj_dim) for r in spec.runs] == [
        (0.1, 8),
        (0.1, 16),
        (0.2, 8),
        (0.2, 16),
        (0.4, 8),
        (0.4, 16),
    ]
    assert all(r.epochs == 2 and r.proj_layers == RunConfig().proj_layers for r in spec.runs)
    assert spec.out == Path("runs/g")


def test_store_references_resolve_in_the_cache_or_by_path():
    spec = parse_grid(GRID)
    assert spec.train.path == Path("/c/org--model/ln2/train.zarr")
    assert spec.val.path == Path("/c/org--model/ln2/val.zarr") and spec.val.name == "val"
    assert [t.name for t in spec.tests] == ["test", "t_jpeg"]
    assert spec.tests[1].path == Path("/elsewhere/t.zarr") and spec.tests[1].variant == "jpeg-official"


def test_a_list_of_grid_blocks_is_concatenated():
    text = GRID.replace(
        "grid:\n  proj_dim: [8, 16]\n  contrastive_factor: [0.1, 0.2, 0.4]\n",
        "grid:\n  - {proj_dim: [8]}\n  - {head_blocks: [last], aggregation: [tie, mean]}\n",
    )
    spec = parse_grid(text)
    assert [(r.proj_dim, r.head_blocks, r.aggregation) for r in spec.runs] == [
        (8, "all", "tie"),
        (1024, "last", "tie"),
        (1024, "last", "mean"),
    ]


@pytest.mark.parametrize(
    "replacement, message",
    [
        ("proj_dim: [8, 16]", "unknown key 'proj_dimm'"),
        ("epochs: 2", "base: unknown key(s) epoch"),
        ("proj_dim: [8, 16]", "grid.proj_dim: expected a non-empty list"),
        ("contrastive_factor: [0.1, 0.2, 0.4]", "grid.contrastive_factor: -0.1 is outside"),
        ("proj_dim: [8, 16]", "grid.proj_dim: expected an integer, got 8.5"),
        ("tap: ln2", "data.tap: 'ln3' is not one of ln2, hidden"),
        ("train: train", "data.train: give exactly one of split"),
        ("epochs: 2", "base.amp: 'fp8' is not one of none, bf16"),
        ("proj_dim: [8, 16]", "unknown key 'blocks'; known:"),
        ("epochs: 2", "base.lr_milestones: expected increasing epoch numbers"),
    ],
)
def test_bad_values_are_rejected_by_name(replacement, message):
    bad = {
        "unknown key 'proj_dimm'": "proj_dimm: [8, 16]",
        "base: unknown key(s) epoch": "epoch: 2",
        "grid.proj_dim: expected a non-empty list": "proj_dim: []",
        "grid.contrastive_factor: -0.1 is outside": "contrastive_factor: [-0.1]",
        "grid.proj_dim: expected an integer, got 8.5": "proj_dim: [8.5]",
        "data.tap: 'ln3' is not one of ln2, hidden": "tap: ln3",
        "data.train: give exactly one of split": "train: {split: a, store: b}",
        "base.amp: 'fp8' is not one of none, bf16": "amp: fp8",
        "unknown key 'blocks'; known:": "blocks: [last]",
        "base.lr_milestones: expected increasing epoch numbers": "lr_milestones: [11, 6]",
    }[message]
    with pytest.raises(ConfigError) as error:
        parse_grid(GRID.replace(replacement, bad))
    assert message in str(error.value)


def test_unknown_top_level_and_data_keys_are_named():
    with pytest.raises(ConfigError, match="unknown key\\(s\\) grids"):
        parse_grid(GRID + "grids: {}\n")
    with pytest.raises(ConfigError, match="data: unknown key\\(s\\) tests"):
        parse_grid(GRID.replace("  test: [", "  tests: ["))


def test_classes_are_normalised_and_validated():
    assert make_run_config({"classes": ["horse", "chair"]}).classes == ("chair", "horse")
    assert make_run_config({"classes": "all"}).classes is None
    with pytest.raises(ConfigError, match="repeated class"):
        make_run_config({"classes": ["horse", "horse"]})


def test_shipped_grids_parse_with_the_published_sizes():
    assert len(load_grid(REPO / "grid.yaml")) == 48
    assert len(load_grid(REPO / "grids" / "paper_settings_vitl14.yaml")) == 144
    ablations = load_grid(REPO / "grids" / "ablations_vitl14.yaml").runs
    assert {(r.head_blocks, r.aggregation, r.contrastive_factor > 0) for r in ablations} == {
        ("all", "tie", True),
        ("last", "tie", True),
        ("all", "mean", True),
        ("all", "tie", False),
    }
    shipped = sorted((REPO / "grids").glob("*.yaml"))
    assert len(shipped) >= 8
    for path in shipped:
        assert len(load_grid(path)) >= 1


def test_renamed_key_is_named_with_its_new_name():
    with pytest.raises(ConfigError, match=r"\(blocks is now called head_blocks\)"):
        make_run_config({"blocks": "last"})


def test_lr_of_each_epoch_follows_the_authors_milestones():
    # the authors: before training 0-based epoch e, if e + 1 in (6, 11): lr = lr0 / 10**k
    config = RunConfig(lr=1e-3)
    assert [config.lr_at_epoch(e) for e in range(12)] == [1e-3] * 5 + [1e-3 / 10] * 5 + [1e-3 / 100] * 2
    assert [RunConfig(lr=0.5, lr_milestones=(1, 3)).lr_at_epoch(e) for e in range(3)] == [0.05, 0.05, 0.005]
    assert [RunConfig(lr_milestones=()).lr_at_epoch(e) for e in (0, 20)] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("base:\n  epochs: 2\n  lr: .nan\n", "base.lr: nan is not a finite number"),
        ("base:\n  epochs: 2\n  contrastive_factor: .inf\n", "base.contrastive_factor: inf is not a finite number"),
        ("base:\n  epochs: 2\n  train_fraction: .nan\n", "base.train_fraction: nan is not a finite number"),
        ("grid:\n  lr: [0.001, -.inf]\n", "grid.lr: -inf is not a finite number"),
        ("grid: []\n", "grid: an empty list gives no config"),
        ("grid:\n  proj_dim: [16, 16]\n", "grid.proj_dim: 16 is listed more than once"),
        ("grid:\n  contrastive_factor: [0.1, 0.10, 0.2]\n", "grid.contrastive_factor: 0.1 is listed more than once"),
        ("grid:\n  - {proj_dim: [8]}\n  - {classes: [[a, b], [b, a]]}\n", "grid[1].classes: ['b', 'a'] is listed more"),
        (
            "grid:\n  - {proj_dim: [8, 16]}\n  - {proj_dim: [16]}\n",
            "configs 1 ({'proj_dim': 16}) and 2 ({'proj_dim': 16}) are the same",
        ),
        (
            "base:\n  proj_dim: 8\ngrid:\n  - {proj_dim: [8]}\n  - {}\n",
            "configs 0 ({'proj_dim': 8}) and 1 ({}) are the same",
        ),
    ],
)
def test_non_finite_values_empty_grids_and_repeated_configs_are_refused_by_key(bad, message):
    text = GRID[: GRID.index("base:")] + bad
    with pytest.raises(ConfigError) as error:
        parse_grid(text)
    assert message in str(error.value)


def test_amp_defaults_to_float32_and_auto_is_refused_saying_why():
    assert RunConfig().amp == "none"
    assert [make_run_config({"amp": amp}).amp for amp in ("none", "bf16")] == ["none", "bf16"]
    with pytest.raises(ConfigError, match=r"base.amp: 'auto' is no longer a choice.*float32 \('none'\) is the default"):
        parse_grid(GRID.replace("epochs: 2", "amp: auto"))
