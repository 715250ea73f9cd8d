"""A feature store as one HDF5 file, and back: for the many tools that read HDF5.

:func:`export_hdf5` writes every row array, every complete variant's features and the store's attributes to
one file (written under a temporary name, renamed when whole); :func:`import_hdf5` reads such a file back into
an equal store, complete or absent. File layout: docs/cache-format.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from ..errors import PipelineError
from ..files import atomic_path
from .reading import open_store_info, read_features, read_rows
from .schema import EMBEDDING_ARRAY, SCHEMA, RowTable, StoreIdentity
from .writing import delete_store, write_store

JSON_ATTRIBUTES = "json_attributes"  # root attribute: names of the attributes stored as JSON text
_STRING = h5py.string_dtype("utf-8")
# The attributes create_store writes itself; the rest of a store's attributes are "extra".
_STORE_OWN_ATTRIBUTES = {"schema", "split", "n_rows", "variants"} | {f.name for f in fields(StoreIdentity)}


class HDF5Error(PipelineError):
    """A store that cannot be exported, or a file that is not an exported store."""


@dataclass(frozen=True)
class TransferSummary:
    """What an export or an import wrote."""

    source: Path
    target: Path
    n_rows: int
    variants: tuple[str, ...]

    def report(self) -> str:
        return f"{self.n_rows} rows x {len(self.variants)} variant(s) ({', '.join(self.variants)}): {self.source} -> {self.target}"


# ---------------------------------------------------------------- export


def export_hdf5(store: Path, out: Path, *, progress: bool = True) -> TransferSummary:
    """Write ``store`` to the HDF5 file ``out`` (see the module docstring)."""
    info = open_store_info(store)
    incomplete = [name for name in info.variants if name not in info.complete_variants]
    if incomplete:
        raise HDF5Error(
            f"{store}: variant(s) {', '.join(incomplete)} are incomplete; finish the extraction "
            f"(re-run the same `pipeline extract`) before exporting"
        )
    rows = read_rows(store)
    chunk_rows = min(info.identity.chunk_rows, max(1, info.n_rows))
    total = info.n_rows * len(info.variants)
    with (
        tqdm(total=total, unit="row", desc=f"export {info.split}", disable=not progress) as bar,
        atomic_path(Path(out)) as tmp,
        h5py.File(tmp, "w") as handle,
    ):
        write_attributes(handle.attrs, info.attrs)
        for name, values in row_arrays(rows).items():
            handle.create_dataset(name, data=values, dtype=_STRING if values.dtype == object else values.dtype)
        arrays = ("features", EMBEDDING_ARRAY) if info.identity.embedding_dim else ("features",)
        for array_name in arrays:
            group = handle.create_group(array_name)
            for variant in info.variants:
                for start in range(0, info.n_rows, info.identity.shard_rows):
                    stop = min(start + info.identity.shard_rows, info.n_rows)
                    block = read_features(store, variant, slice(start, stop), array_name=array_name)
                    if start == 0:
                        shape = (info.n_rows, *block.shape[1:])
                        dataset = group.create_dataset(
                            variant, shape=shape, dtype=block.dtype, chunks=(chunk_rows, *shape[1:])
                        )
                    dataset[start:stop] = block
                    if array_name == "features":
                        bar.update(stop - start)
    return TransferSummary(Path(store), Path(out), info.n_rows, tuple(info.variants))


def row_arrays(rows: RowTable) -> dict[str, np.ndarray]:
    arrays = {
        "labels": rows.labels,
        "paths": rows.paths,
        "dataset": rows.datasets,
        "class": rows.classes,
        "valid": rows.valid,
        "error": rows.errors,
    }
    return {name: values for name, values in arrays.items() if values is not None}


def write_attributes(attrs: h5py.AttributeManager, values: dict[str, Any]) -> None:
    as_json = []
    for key, value in values.items():
        if isinstance(value, (str, bool, int, float)):
            attrs[key] = value
        else:
            attrs[key] = json.dumps(value)
            as_json.append(key)
    attrs[JSON_ATTRIBUTES] = json.dumps(as_json)


def read_attributes(attrs: h5py.AttributeManager, where: Path) -> dict[str, Any]:
    if JSON_ATTRIBUTES not in attrs:
        raise HDF5Error(
            f"{where}: not a feature store exported by `pipeline cache export` (no {JSON_ATTRIBUTES} attribute)"
        )
    as_json = set(json.loads(attrs[JSON_ATTRIBUTES]))
    values = {}
    for key, value in attrs.items():
        if key == JSON_ATTRIBUTES:
            continue
        values[key] = (
            json.loads(value) if key in as_json else (value.item() if isinstance(value, np.generic) else value)
        )
    return values


# ---------------------------------------------------------------- import


def import_hdf5(source: Path, store: Path, *, overwrite: bool = False, progress: bool = True) -> TransferSummary:
    """Read an exported HDF5 file back into a feature store at ``store`` (written whole, then renamed)."""
    source, store = Path(source), Path(store)
    if store.exists() and not overwrite:
        raise HDF5Error(f"{store} exists; choose another path or pass --overwrite")
    try:
        handle = h5py.File(source, "r")
    except OSError as error:
        raise HDF5Error(f"{source}: cannot be read as HDF5 ({error})") from None
    with handle, atomic_path(store) as tmp:
        n_rows, variants = write_store_from(handle, source, tmp, progress)
        delete_store(store)  # --overwrite: the old store goes only once the new one is whole
    return TransferSummary(source, store, n_rows, variants)


class _CountedRows:
    """An HDF5 dataset read by row ranges, counting the rows on a progress bar."""

    def __init__(self, dataset: h5py.Dataset, bar: tqdm) -> None:
        self.dataset, self.bar, self.shape = dataset, bar, dataset.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        values = self.dataset[rows]
        self.bar.update(len(values))
        return values


def write_store_from(handle: h5py.File, source: Path, path: Path, progress: bool) -> tuple[int, tuple[str, ...]]:
    """Write the store held by an open export to ``path``; (rows, variants)."""
    attrs = read_attributes(handle.attrs, source)
    if attrs.get("schema") != SCHEMA:
        raise HDF5Error(f"{source}: schema {attrs.get('schema')!r}, expected {SCHEMA!r}")
    strings = {
        name: handle[name].asstr()[:].tolist() for name in ("paths", "dataset", "class", "error") if name in handle
    }
    variants = tuple(attrs["variants"])
    total = attrs["n_rows"] * len(variants)
    with tqdm(total=total, unit="row", desc=f"import {attrs['split']}", disable=not progress) as bar:
        write_store(
            path,
            StoreIdentity.from_attrs(attrs),
            split=attrs["split"],
            labels=handle["labels"][:].tolist(),
            paths=strings["paths"],
            datasets=strings["dataset"],
            features={name: _CountedRows(handle["features"][name], bar) for name in variants},
            classes=strings.get("class"),
            valid=handle["valid"][:],
            errors=strings["error"],
            extra_attrs={key: value for key, value in attrs.items() if key not in _STORE_OWN_ATTRIBUTES},
            embeddings={name: handle[EMBEDDING_ARRAY][name] for name in variants}
            if EMBEDDING_ARRAY in handle
            else None,
        )
    return attrs["n_rows"], variants
