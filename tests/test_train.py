"""Fitting heads from cached tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from conftest import separable_features, write_store
from pipeline.config import RunConfig, StoreRef
from pipeline.train import DataError, fit_head, load_store, score_rows, training_rows, train_variants
from pipeline import cache

CPU = torch.device("cpu")
SMALL = dict(proj_dim=16, proj_layers=1, batch_size=32)


def load(path, variants=None):
    return load_store(StoreRef(path.stem, path), variants, CPU)


def test_a_head_learns_a_separable_store_and_generalises(tmp_path):
    features, labels = separable_features(600, seed=0, shift=3.0)
    path = write_store(tmp_path / "train.zarr", {"center": features[:400]}, labels[:400], ["d"] * 400)
    held_out = write_store(tmp_path / "test.zarr", {"center": features[400:]}, labels[400:], ["d"] * 200)
    config = RunConfig(epochs=3, proj_dim=64, proj_layers=1, batch_size=32)
    fit = fit_head(load(path), config, device=CPU)
    test = load(held_out)
    scores = score_rows(fit.head, test.features["center"], np.arange(200), config)
    assert average_precision_score(labels[400:], scores) > 0.95
    assert fit.n_train == 400 and len(fit.epoch_losses) == 3


def test_same_seed_same_head_and_other_seed_differs(tmp_path):
    features, labels = separable_features(128)
    store = load(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 128))
    heads = [fit_head(store, RunConfig(seed=seed, **SMALL), device=CPU).head for seed in (3, 3, 4)]
    first, again, other = (torch.cat([p.flatten() for p in h.parameters()]) for h in heads)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_invalid_rows_classes_and_fraction_select_training_rows(tmp_path):
    features, labels = separable_features(40)
    classes = ["car", "cat", "chair", "horse"] * 10
    valid = np.ones(40, dtype=bool)
    valid[[3, 7]] = False  # two horses
    store = load(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["progan"] * 40, classes, valid))
    rows, n_invalid = training_rows(store, RunConfig(classes=("chair", "horse")))
    assert rows.tolist() == [i for i in range(40) if i % 4 in (2, 3) and i not in (3, 7)]
    assert n_invalid == 2
    half, _ = training_rows(store, RunConfig(classes=("chair", "horse"), train_fraction=0.5))
    assert len(half) == 9 and set(half) <= set(rows)
    with pytest.raises(DataError, match=r"classes \['dog'\] not in the store"):
        training_rows(store, RunConfig(classes=("dog",)))


def test_epoch_e_reads_view_e_mod_k(tmp_path, monkeypatch):
    features, labels = separable_features(64)
    views = {f"view_{v:03d}": features + v for v in range(3)}
    path = write_store(tmp_path / "train.zarr", views, labels, ["d"] * 64)
    info = cache.open_store_info(path)
    assert train_variants(info, StoreRef("t", path), max_epochs=2) == ("view_000", "view_001")
    store = load(path, train_variants(info, StoreRef("t", path), max_epochs=5))
    seen = []
    original = torch.Tensor.__getitem__

    def spy(tensor, index):
        for name, array in store.features.items():
            if tensor is array:
                seen.append(name)
        return original(tensor, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", spy)
    fit_head(store, RunConfig(epochs=5, batch_size=64, proj_dim=8, proj_layers=1), device=CPU)
    assert seen == ["view_000", "view_001", "view_002", "view_000", "view_001"]


def test_last_block_and_mean_ablations_train(tmp_path):
    features, labels = separable_features(64)
    store = load(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 64))
    last = fit_head(store, RunConfig(blocks="last", **SMALL), device=CPU).head
    assert last.n_blocks == 1
    mean = fit_head(store, RunConfig(aggregation="mean", contrastive_factor=0.0, **SMALL), device=CPU).head
    assert not hasattr(mean, "alpha")
    bf16 = fit_head(store, RunConfig(amp="bf16", **SMALL), device=CPU)
    assert np.isfinite(bf16.epoch_losses).all()
