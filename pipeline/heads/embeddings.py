"""The selected runs' embeddings for the report's t-SNE: the head's z on a seeded sample of at most
``EMBEDDING_ROWS_PER_SET`` valid rows per test set of each center-crop test entry (``embeddings.npz``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..files import atomic_path
from ..names import CENTER, EMBEDDING_FEATURES
from ..results.run_folder import RunFolder
from .config import GridConfig, make_run_config
from .head import load_head
from .scoring import forward_rows
from .stores import GridData, LoadedStore, load_store

EMBEDDING_ROWS_PER_SET = 200


def embedding_sample(store: LoadedStore, per_set: int = EMBEDDING_ROWS_PER_SET, seed: int = 0) -> np.ndarray:
    """Sorted valid rows: at most ``per_set`` per dataset, drawn with a fixed seed (the same for every run)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for dataset in sorted(set(store.rows.datasets.tolist())):
        candidates = np.flatnonzero((store.rows.datasets == dataset) & store.rows.valid)
        if len(candidates) > per_set:
            candidates = rng.choice(candidates, size=per_set, replace=False)
        chosen.append(candidates)
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def write_embeddings(spec: GridConfig, data: GridData | None, folders: list[RunFolder], device: torch.device) -> None:
    """embeddings.npz for each selected run folder that has a head and no embeddings yet."""
    missing = [
        folder for folder in dict.fromkeys(folders) if folder.has_head() and not folder.embeddings_path.is_file()
    ]
    refs = [ref for ref in spec.tests if (ref.variant or CENTER) == CENTER]
    if not missing or not refs:
        return
    runs = {folder: make_run_config(folder.read_document().run, str(folder.config_path)) for folder in missing}
    embedding = any(run.features == EMBEDDING_FEATURES for run in runs.values())
    if data is not None and (not embedding or all(t.embeddings for t in data.tests)):
        tests = [t for t in data.tests if t.ref in refs]
    else:  # a finished grid: a few hundred rows per set, gathered from the shard files
        tests = [load_store(ref, device, in_memory=False, embedding=embedding) for ref in refs]
    samples = [(test, embedding_sample(test)) for test in tests]
    for folder in missing:
        head = load_head(folder.head_path)[0].to(device)
        run = runs[folder]
        parts: dict[str, list[np.ndarray]] = {"z": [], "label": [], "dataset": [], "split": [], "path": []}
        for test, rows in samples:
            source = (test.embeddings if run.features == EMBEDDING_FEATURES else test.features)[CENTER]
            _, z = forward_rows(head, source, rows, run)
            parts["z"].append(z.numpy())
            parts["label"].append(test.rows.labels[rows].astype(np.int8))
            parts["dataset"].append(test.rows.datasets[rows].astype(str))
            parts["split"].append(np.full(len(rows), test.ref.name))
            parts["path"].append(test.rows.paths[rows].astype(str))
        arrays = {key: np.concatenate(values) for key, values in parts.items()}
        with atomic_path(folder.embeddings_path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
