"""Fitting heads from cached tensors: rows, lr schedule, streamed views, scoring."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from conftest import separable_features, write_store
from pipeline.heads import RunConfig, StoreRef
from pipeline.heads import train as train_module
from pipeline.heads.scoring import forward_rows, group_logits
from pipeline.heads.stores import (
    DataError,
    InMemoryFeatures,
    OneLabelError,
    StreamedFeatures,
    TrainStore,
    ViewCache,
    load_store,
    open_train_store,
    training_rows,
)
from pipeline.heads.train import build_head, build_stack, fit_group, fit_head, fusable_groups

CPU = torch.device("cpu")
SMALL = dict(proj_dim=16, proj_layers=1, batch_size=32)


def open_train(path) -> TrainStore:
    return open_train_store(StoreRef(path.stem, path), CPU)


def in_memory(store: TrainStore, tensors: dict[str, torch.Tensor]) -> TrainStore:
    """The same store with every view already in memory (no loading at all)."""
    sources = {name: InMemoryFeatures(tensor) for name, tensor in tensors.items()}
    return TrainStore(store.ref, store.info, store.rows, store.views, ViewCache(sources.__getitem__, len(tensors)))


def parameters(head) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in head.parameters()])


def test_a_head_learns_a_separable_store_and_generalises(tmp_path):
    features, labels = separable_features(600, seed=0, shift=3.0)
    path = write_store(tmp_path / "train.zarr", {"center": features[:400]}, labels[:400], ["d"] * 400)
    held_out = write_store(tmp_path / "test.zarr", {"center": features[400:]}, labels[400:], ["d"] * 200)
    config = RunConfig(epochs=3, proj_dim=64, proj_layers=1, batch_size=32)
    fit = fit_head(open_train(path), config, device=CPU)
    test = load_store(StoreRef("test", held_out), CPU)
    logits, _ = forward_rows(fit.head, test.features["center"], np.arange(200), config)
    assert average_precision_score(labels[400:], logits.numpy()) > 0.95
    assert fit.n_train == 400 and len(fit.epoch_losses) == 3


def test_same_seed_same_head_and_other_seed_differs(tmp_path):
    features, labels = separable_features(128)
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 128))
    heads = [fit_head(store, RunConfig(seed=seed, **SMALL), device=CPU).head for seed in (3, 3, 4)]
    first, again, other = (parameters(h) for h in heads)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_invalid_rows_classes_and_fraction_select_training_rows(tmp_path):
    features, labels = separable_features(40)
    classes = ["car", "cat", "chair", "horse"] * 10
    valid = np.ones(40, dtype=bool)
    valid[[3, 7]] = False  # two horses
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["progan"] * 40, classes, valid))
    rows, n_invalid = training_rows(store, RunConfig(classes=("chair", "horse")))
    assert rows.tolist() == [i for i in range(40) if i % 4 in (2, 3) and i not in (3, 7)]
    assert n_invalid == 2
    half, _ = training_rows(store, RunConfig(classes=("chair", "horse"), train_fraction=0.5))
    assert len(half) == 9 and set(half) <= set(rows)
    with pytest.raises(DataError, match=r"classes \['dog'\] not in the store"):
        training_rows(store, RunConfig(classes=("dog",)))


def test_the_lr_of_every_epoch_of_a_12_epoch_run(tmp_path, monkeypatch):
    """The authors set lr = lr0 / 10**k before 0-based epochs 5 and 10 (their `epoch + 1 in (6, 11)`)."""
    features, labels = separable_features(32)
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 32))
    used: list[float] = []
    make_adam = train_module.make_adam

    def recording_adam(head, lr, **kwargs):
        optimizer = make_adam(head, lr, **kwargs)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            used.append(optimizer.param_groups[0]["lr"])
            return step(*args, **kwargs)

        optimizer.step = recorded_step
        return optimizer

    monkeypatch.setattr(train_module, "make_adam", recording_adam)
    fit = fit_head(store, RunConfig(epochs=12, batch_size=32, proj_dim=8, proj_layers=1, lr=1e-3), device=CPU)
    assert len(used) == 12  # one step per epoch
    assert used == [0.001] * 5 + [0.0001] * 5 + [1e-05] * 2
    assert list(fit.epoch_lrs) == used


def test_fused_adam_is_torchs_fused_update_bit_for_bit():
    from pipeline.heads.train import FusedAdam

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    theirs = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    theirs.load_state_dict(ours.state_dict())
    optimizers = (FusedAdam(list(ours.parameters()), 1e-2), torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True))
    x = torch.randn(32, 16)
    for step in range(4):
        for optimizer, module in zip(optimizers, (ours, theirs)):
            optimizer.param_groups[0]["lr"] = 1e-2 / 10**step
            optimizer.zero_grad(set_to_none=True)
            module(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_epoch_e_reads_view_e_mod_k_streamed_equals_in_memory_bit_for_bit(tmp_path):
    features, labels = separable_features(96)
    views = {f"view_{v:03d}": features + 0.5 * v for v in range(3)}
    path = write_store(tmp_path / "train.zarr", views, labels, ["d"] * 96, shard_rows=32, chunk_rows=16)
    config = RunConfig(epochs=5, batch_size=32, proj_dim=8, proj_layers=1)
    streamed = open_train(path)
    requested: list[str] = []
    acquire = streamed.view_cache.acquire
    streamed.view_cache.acquire = lambda name: requested.append(name) or acquire(name)  # type: ignore[method-assign]
    fit = fit_head(streamed, config, device=CPU)
    assert requested == ["view_000", "view_001", "view_002", "view_000", "view_001"]
    assert fit.epoch_views == tuple(requested) and (fit.views_used, fit.views_reused) == (3, 2)
    # memory: the view being trained and the one prefetched, never more
    assert streamed.view_cache.peak_resident == 2
    assert dict(streamed.view_cache.loads) == {"view_000": 2, "view_001": 2, "view_002": 1}

    # the reference: every view read up front (float16 as stored), nothing streamed
    tensors = {name: torch.from_numpy(array.astype(np.float16)) for name, array in views.items()}
    reference = fit_head(in_memory(streamed, tensors), config, device=CPU)
    assert torch.equal(parameters(fit.head), parameters(reference.head))
    assert fit.epoch_losses == reference.epoch_losses


def test_runs_sharing_a_view_load_it_once_and_threads_see_their_own_views(tmp_path):
    features, labels = separable_features(64)
    views = {f"view_{v:03d}": features * (1 + v) for v in range(2)}
    store = open_train(write_store(tmp_path / "train.zarr", views, labels, ["d"] * 64))
    one_epoch = [RunConfig(contrastive_factor=xi, **SMALL) for xi in (0.1, 0.2, 0.4, 0.8)]
    for config in one_epoch:
        fit_head(store, config, device=CPU)
    assert dict(store.view_cache.loads) == {"view_000": 1}

    two_epochs = [RunConfig(epochs=2, seed=seed, **SMALL) for seed in range(4)]
    alone = [parameters(fit_head(store, config, device=CPU).head) for config in two_epochs]
    together: dict[int, torch.Tensor] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: together.__setitem__(i, parameters(fit_head(store, two_epochs[i], device=CPU).head))
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(alone[i], together[i]) for i in range(4))


def test_view_cache_keeps_views_in_use_and_evicts_the_least_recent_idle_one():
    loads: list[str] = []
    cache = ViewCache(lambda name: loads.append(name) or torch.zeros(1), capacity=2)
    for name in ("a", "b"):
        cache.acquire(name).result()
    cache.release("a")
    cache.acquire("c").result()  # a is idle and least recent: evicted; b is held
    cache.acquire("b").result()
    assert loads == ["a", "b", "c"]
    cache.acquire("a").result()  # loaded again
    assert loads == ["a", "b", "c", "a"]
    cache.close()


def test_a_failed_load_is_an_error_and_is_retried():
    attempts = []

    def load(name):
        attempts.append(name)
        if len(attempts) == 1:
            raise DataError("disk on fire")
        return torch.ones(1)

    cache = ViewCache(load)
    with pytest.raises(DataError, match="disk on fire"):
        cache.acquire("v").result()
    cache.release("v")
    assert torch.equal(cache.acquire("v").result(), torch.ones(1))
    cache.close()


def test_last_block_and_mean_ablations_train(tmp_path):
    features, labels = separable_features(64)
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 64))
    last = fit_head(store, RunConfig(head_blocks="last", **SMALL), device=CPU).head
    assert last.n_blocks == 1
    mean = fit_head(store, RunConfig(aggregation="mean", contrastive_factor=0.0, **SMALL), device=CPU).head
    assert not hasattr(mean, "alpha")
    bf16 = fit_head(store, RunConfig(amp="bf16", **SMALL), device=CPU)
    assert np.isfinite(bf16.epoch_losses).all()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_a_fused_group_starts_from_and_trains_to_the_heads_of_its_configs_alone(tmp_path):
    features, labels = separable_features(200, n_blocks=4, dim=16, seed=2)
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 200))
    configs = [
        RunConfig(contrastive_factor=xi, proj_dim=32, proj_layers=2, batch_size=32) for xi in (0.1, 0.2, 0.4, 0.8)
    ]
    # initial weights: the stack holds exactly the heads each config would start from alone
    initial = build_stack(store, configs, CPU).to_heads()
    for config, head in zip(configs, initial):
        torch.manual_seed(config.seed)
        alone = build_head(store.info, config)
        assert torch.equal(parameters(head), parameters(alone))
    fused = fit_group(store, configs, device=CPU).results()
    for config, together in zip(configs, fused):
        alone = fit_head(store, config, device=CPU)
        assert relative_difference(parameters(together.head), parameters(alone.head)) < 1e-5
        assert together.epoch_losses == pytest.approx(alone.epoch_losses, rel=1e-5)
        assert not torch.equal(parameters(together.head), parameters(initial[0]))


def test_configs_group_by_everything_but_the_contrastive_factor():
    configs = [
        RunConfig(contrastive_factor=0.1, proj_dim=8),
        RunConfig(contrastive_factor=0.2, proj_dim=16),
        RunConfig(contrastive_factor=0.4, proj_dim=8),
        RunConfig(contrastive_factor=0.1, proj_dim=8, seed=1),
        RunConfig(contrastive_factor=0.8, proj_dim=8),
    ]
    assert fusable_groups(configs, max_size=8) == [[0, 2, 4], [1], [3]]
    assert fusable_groups(configs, max_size=2) == [[0, 2], [1], [3], [4]]
    assert fusable_groups(configs, max_size=1) == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="differ only in contrastive_factor and calibration"):
        fit_group(None, configs[:2], device=CPU)  # type: ignore[arg-type]


def test_scoring_a_group_equals_scoring_each_head(tmp_path):
    features, labels = separable_features(90, seed=4)
    path = write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 90)
    store = open_train(path)
    configs = [RunConfig(contrastive_factor=xi, **SMALL) for xi in (0.1, 0.8)]
    group = fit_group(store, configs, device=CPU)
    loaded = load_store(StoreRef("s", path), CPU)
    rows = np.arange(3, 90, 2)
    together = group_logits(group.stack, loaded, rows, configs[0])
    assert together.shape == (2, len(rows), 1)
    for index, result in enumerate(group.results()):
        logits, _ = forward_rows(result.head, loaded.features["center"], rows, configs[0])
        with torch.no_grad():  # the module itself, from the stored float16 features
            expected = result.head(torch.from_numpy(features[rows].astype(np.float16)).float())[0].squeeze(1)
        np.testing.assert_allclose(together[index, :, 0].numpy(), expected.numpy(), atol=1e-5)
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-5)


def test_streamed_training_and_scoring_equal_in_memory_bit_for_bit(tmp_path):
    features, labels = separable_features(150, seed=5)
    views = {f"view_{v:03d}": features + 0.25 * v for v in range(2)}
    variants = {**views, "center": features - 0.25}  # trained on the views, scored on the center crop
    path = write_store(tmp_path / "train.zarr", variants, labels, ["d"] * 150, shard_rows=32, chunk_rows=8)
    configs = [RunConfig(contrastive_factor=xi, epochs=3, **SMALL) for xi in (0.2, 0.4)]
    in_memory = fit_group(open_train_store(StoreRef("t", path), CPU, in_memory=True), configs, device=CPU)
    streamed_store = open_train_store(StoreRef("t", path), CPU, in_memory=False)
    streamed = fit_group(streamed_store, configs, device=CPU)
    assert isinstance(streamed_store.view_cache.acquire("view_000").result(), StreamedFeatures)
    for a, b in zip(in_memory.results(), streamed.results()):
        assert torch.equal(parameters(a.head), parameters(b.head))
        assert a.epoch_losses == b.epoch_losses
    rows = np.flatnonzero(labels >= 0)[::3]
    scored = [
        group_logits(in_memory.stack, load_store(StoreRef("t", path), CPU, in_memory=where), rows, configs[0])
        for where in (True, False)
    ]
    assert torch.equal(scored[0], scored[1])


def test_a_training_split_with_one_label_is_refused(tmp_path):
    features, labels = separable_features(40)
    classes = ["cat" if label else "dog" for label in labels]  # every cat is fake, every dog real
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 40, classes))
    with pytest.raises(
        OneLabelError, match=r"40 valid training rows|20 valid training rows of classes \['cat'\] are all fake"
    ):
        training_rows(store, RunConfig(classes=("cat",)))
    rows, _ = training_rows(store, RunConfig(classes=("cat", "dog")))
    assert len(rows) == 40


def test_a_config_without_amp_trains_in_float32_even_where_the_probe_says_bf16_is_fast(tmp_path, monkeypatch):
    from pipeline import devices

    features, labels = separable_features(64)
    store = open_train(write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 64))
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    on_a_cpu_without_bf16 = parameters(fit_group(store, [RunConfig(**SMALL)], device=CPU).stack.to_heads()[0])
    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")  # the capability probe forced on
    assert devices.bf16_is_fast(CPU)
    group = fit_group(store, [RunConfig(**SMALL)], device=CPU)
    assert group.configs[0].amp == "none"
    torch.testing.assert_close(parameters(group.stack.to_heads()[0]), on_a_cpu_without_bf16, rtol=0, atol=0)
    asked = fit_group(store, [RunConfig(**SMALL, amp="bf16")], device=CPU)  # bf16 only when asked for
    assert asked.configs[0].amp == "bf16" and np.isfinite(asked.epoch_losses).all()
    assert not torch.equal(parameters(asked.stack.to_heads()[0]), on_a_cpu_without_bf16)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_the_released_head_gives_float32_resolution_scores_under_every_precision(amp):
    """8,000 seeded rows: bf16 logits would take ~500 distinct values; float32 scoring keeps ~8,000."""
    from pathlib import Path

    from pipeline.heads import load_official_checkpoint

    head = load_official_checkpoint(Path(__file__).parent / "data" / "rine_2class_trainable.pth")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8000, head.n_blocks, head.in_dim, generator=generator).half()
    logits, _ = forward_rows(head, InMemoryFeatures(features), np.arange(8000), RunConfig(amp=amp))
    assert logits.dtype == torch.float32
    assert len(np.unique(logits.numpy())) >= 7900
    with torch.inference_mode():  # the head module itself, in float32
        expected = head(features[:1000].float())[0].squeeze(1)
    torch.testing.assert_close(logits[:1000], expected, rtol=1e-5, atol=1e-5)


def test_cpu_bf16_probes_read_the_kernel_flags_where_torch_has_no_probe(monkeypatch):
    from pipeline import devices

    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert devices.cpu_has_avx512_bf16() and not devices.cpu_has_amx()
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert devices.cpu_has_amx() and not devices.cpu_has_avx512_bf16()
