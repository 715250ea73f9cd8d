"""The heads beside RINE: one grid of rine, linear, knn and logreg on blocks, block:K and embedding features of
the same stores; their numbers against scikit-learn and an independent k-NN; the run folder they write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import read_csv_rows, separable_features
from conftest import write_store as write_store_without_embedding
from pipeline import cache
from pipeline.heads import FitConfig, load_head, parse_grid, run_grid
from pipeline.heads.config import ConfigError, RunConfig, make_run_config, run_config_dict, run_identity_dict
from pipeline.heads.stores import DataError

EMBEDDING_DIM = 8


def write_store(path: Path, features: dict[str, np.ndarray], embeddings: dict[str, np.ndarray], labels, datasets):
    n_rows, n_blocks, dim = next(iter(features.values())).shape
    identity = cache.placeholder_identity(
        n_blocks, dim, model_id="synthetic", model_revision="test", crop_size=32, max_pixels=10**8,
        shard_rows=64, chunk_rows=16, embedding_dim=EMBEDDING_DIM,
    )  # fmt: skip
    return cache.write_store(
        path,
        identity,
        split=path.stem,
        labels=labels.tolist(),
        paths=[f"{datasets[i]}/{i:05d}.png" for i in range(n_rows)],
        datasets=datasets,
        features=features,
        embeddings=embeddings,
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    features, labels = separable_features(280, seed=3, shift=1.0)
    pooled, _ = separable_features(280, n_blocks=1, dim=EMBEDDING_DIM, seed=4, shift=1.0)
    pooled = pooled[:, 0]
    write_store(root / "train.zarr", {"view_000": features[:160]}, {"view_000": pooled[:160]}, labels[:160],
                ["progan"] * 160)  # fmt: skip
    write_store(root / "val.zarr", {"center": features[160:200]}, {"center": pooled[160:200]}, labels[160:200],
                ["progan"] * 40)  # fmt: skip
    write_store(root / "test.zarr", {"center": features[200:]}, {"center": pooled[200:]}, labels[200:],
                ["gan_a"] * 40 + ["diff_b"] * 40)  # fmt: skip
    return root


def grid_text(root: Path, out: Path, grid: str) -> str:
    return f"""
name: zoo
out: {out}
data:
  train: {{store: {root / "train.zarr"}}}
  val: {{store: {root / "val.zarr"}}}
  test: [{{store: {root / "test.zarr"}, name: test}}]
base: {{proj_layers: 1, proj_dim: 16, batch_size: 32, epochs: 1}}
grid:
{grid}"""


ZOO = """  - {head: [rine]}
  - {head: [linear], features: [embedding, "block:-1"]}
  - {head: [knn], features: [embedding], k: [1, 5]}
  - {head: [logreg], features: ["block:0", "block:1", "block:2", "block:3", embedding], C: [0.5]}
"""


def scores_of(folder: Path, split: str) -> np.ndarray:
    return np.array([float(row["score"]) for row in read_csv_rows(folder / f"scores_{split}.csv")])


@pytest.fixture(scope="module")
def zoo(stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo-out") / "g"
    summary = run_grid(parse_grid(grid_text(stores, out, ZOO)), FitConfig(device="cpu", progress=False))
    assert summary.n_errors == 0
    return out


def run_of(out: Path, head: str, features: str, **where: str) -> Path:
    rows = [r for r in read_csv_rows(out / "results.csv") if r["head"] == head and r["features"] == features]
    rows = [r for r in rows if all(r[key] == value for key, value in where.items())]
    assert len({r["run"] for r in rows}) == 1
    return out / "runs" / rows[0]["run"]


def test_one_grid_fits_every_head_and_labels_its_rows(zoo):
    rows = read_csv_rows(zoo / "results.csv")
    assert {(r["head"], r["features"]) for r in rows} == {
        ("rine", "blocks"),
        ("linear", "embedding"),
        ("linear", "block:-1"),
        ("knn", "embedding"),
        *(("logreg", f"block:{k}") for k in range(4)),
        ("logreg", "embedding"),
    }
    assert len({r["run"] for r in rows}) == 1 + 2 + 2 + 5
    assert all(r["status"] == "ok" for r in rows)
    assert {r["k"] for r in rows if r["head"] == "knn"} == {"1", "5"}
    selection = read_csv_rows(zoo / "selection.csv")
    # one setting per (head, features): each selected by both rules
    assert len(selection) == 2 * 9 and {s["head"] for s in selection} == {"rine", "linear", "knn", "logreg"}


def test_logreg_scores_equal_scikit_learns_fitted_on_the_same_cached_rows(stores, zoo):
    folder = run_of(zoo, "logreg", "block:2")
    train = cache.read_features(stores / "train.zarr", "view_000")[:, 2].astype(np.float64)
    labels = cache.read_rows(stores / "train.zarr").labels
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)).fit(train, labels)
    for split, store in (("val", "val.zarr"), ("test", "test.zarr")):
        rows = cache.read_features(stores / store, "center")[:, 2].astype(np.float64)
        expected = model.predict_proba(rows)[:, 1]
        np.testing.assert_allclose(scores_of(folder, split), expected, rtol=1e-6, atol=1e-7)


def test_knn_scores_are_the_smoothed_votes_of_the_cosine_nearest_training_rows(stores, zoo):
    folder = run_of(zoo, "knn", "embedding", k="5")
    bank = cache.read_features(stores / "train.zarr", "view_000", array_name="embedding")[:, 0].astype(np.float64)
    labels = cache.read_rows(stores / "train.zarr").labels
    queries = cache.read_features(stores / "test.zarr", "center", array_name="embedding")[:, 0].astype(np.float64)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    nearest = np.argsort(-(queries @ bank.T), axis=1, kind="stable")[:, :5]
    fake = labels[nearest].sum(axis=1)
    np.testing.assert_allclose(scores_of(folder, "test"), (fake + 0.5) / 6.0, rtol=1e-6)


def test_every_head_writes_a_run_folder_whose_head_reloads_and_gives_its_scores(stores, zoo):
    import torch

    from pipeline.heads.config import StoreRef
    from pipeline.heads.scoring import forward_rows
    from pipeline.heads.stores import open_variant

    for head_name, features in (("linear", "embedding"), ("knn", "embedding"), ("logreg", "block:1")):
        folder = run_of(zoo, head_name, features, **({"k": "1"} if head_name == "knn" else {}))
        assert {"config.yaml", "fit.json", "head.safetensors", "metrics.csv", "scores_val.csv"} <= {
            p.name for p in folder.iterdir()
        }
        head, metadata = load_head(folder / "head.safetensors")
        assert (metadata["head"], metadata["features"]) == (head_name, features)
        array = "embedding" if features == "embedding" else "features"
        source = open_variant(StoreRef("test", stores / "test.zarr"), "center", torch.device("cpu"), True, array)
        logits, _ = forward_rows(
            head, source, np.arange(80), make_run_config({"head": head_name, "features": features})
        )
        valid = scores_of(folder, "test")
        np.testing.assert_allclose(torch.sigmoid(logits).numpy(), valid, rtol=1e-6)


def test_the_embedding_on_a_store_without_it_says_how_to_add_it(tmp_path):
    features, labels = separable_features(64, seed=1)
    for name in ("train", "val", "test"):
        variant = "view_000" if name == "train" else "center"
        write_store_without_embedding(tmp_path / f"{name}.zarr", {variant: features}, labels, ["a"] * 64)
    grid = "  - {head: [linear], features: [embedding]}\n"
    with pytest.raises(DataError, match=r"no image embedding.*pipeline extract .*--overwrite"):
        run_grid(parse_grid(grid_text(tmp_path, tmp_path / "g", grid)), FitConfig(device="cpu", progress=False))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"head": "linear"}, "head linear reads features block:K or embedding"),
        ({"head": "rine", "features": "embedding"}, "head rine reads features blocks"),
        ({"head": "knn", "features": "block:x"}, "is not one of blocks, block:K or embedding"),
        ({"head": "svm", "features": "embedding"}, "is not one of rine, linear, knn, logreg"),
        ({"head": "knn", "features": "embedding", "k": 0}, "outside"),
    ],
)
def test_bad_head_and_features_values_are_refused_naming_them(values, message):
    with pytest.raises(ConfigError, match=message):
        make_run_config(values, "grid")


def test_a_rine_config_keeps_the_run_id_it_had_before_the_head_fields():
    unhashed = {"head", "features", "k", "C", "protocol", "train_datasets"}  # at their defaults
    assert set(run_config_dict(RunConfig())) - set(run_identity_dict(RunConfig())) == unhashed
    knn = make_run_config({"head": "knn", "features": "embedding"})
    assert {"head", "features"} <= set(run_identity_dict(knn))


def test_a_block_the_store_lacks_fails_its_config_alone(stores, tmp_path):
    grid = '  - {head: [logreg], features: ["block:1", "block:7"]}\n'
    summary = run_grid(parse_grid(grid_text(stores, tmp_path / "g", grid)), FitConfig(device="cpu", progress=False))
    rows = read_csv_rows(summary.results)
    assert summary.n_errors == 1
    (error,) = [r for r in rows if r["status"] == "error"]
    assert error["features"] == "block:7" and "the store holds blocks [0, 1, 2, 3]" in error["error"]
    assert {r["status"] for r in rows if r["features"] == "block:1"} == {"ok"}
