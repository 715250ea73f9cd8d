"""A feature store as one HDF5 file, and back: for the many tools that read HDF5.

:func:`export_hdf5` writes every row array, every complete variant's features and the store's attributes to
one file (written under a temporary name, renamed when whole, never over an existing path unless told), each
dataset with a CRC32C of its contents in its attributes (numeric ones also HDF5's fletcher32 filter);
:func:`import_hdf5` checks them and reads such a file back into an equal store, complete or absent. File
layout: docs/cache-format.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import crc32c
import h5py
import numpy as np
from tqdm.auto import tqdm

from ..errors import PipelineError
from ..files import atomic_path
from .reading import open_store_info, read_features, read_rows
from .schema import EMBEDDING_ARRAY, SCHEMA, RowTable, StoreIdentity
from .writing import delete_store, write_store

JSON_ATTRIBUTES = "json_attributes"  # root attribute: names of the attributes stored as JSON text
CHECKSUM = "crc32c"  # each dataset's attribute: the CRC32C of its contents (see _checksum)
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


def export_hdf5(store: Path, out: Path, *, overwrite: bool = False, progress: bool = True) -> TransferSummary:
    """Write ``store`` to the HDF5 file ``out`` (see the module docstring); an existing ``out`` only with ``overwrite``.

    With ``overwrite``, a symbolic link at ``out`` is replaced by the file (its target is left alone), and
    a folder is refused.
    """
    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        raise HDF5Error(f"{out} is a folder; choose a file name for the export")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise HDF5Error(f"{out} exists; pass --overwrite to replace it, or choose another path")
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
            strings = values.dtype == object
            dataset = handle.create_dataset(
                name, data=values, dtype=_STRING if strings else values.dtype, fletcher32=not strings
            )
            dataset.attrs[CHECKSUM] = _checksum(values)
        arrays = ("features", EMBEDDING_ARRAY) if info.identity.embedding_dim else ("features",)
        for array_name in arrays:
            group = handle.create_group(array_name)
            for variant in info.variants:
                crc = 0
                for start in range(0, info.n_rows, info.identity.shard_rows):
                    stop = min(start + info.identity.shard_rows, info.n_rows)
                    block = read_features(store, variant, slice(start, stop), array_name=array_name)
                    if start == 0:
                        shape = (info.n_rows, *block.shape[1:])
                        dataset = group.create_dataset(
                            variant, shape=shape, dtype=block.dtype, chunks=(chunk_rows, *shape[1:]), fletcher32=True
                        )
                    dataset[start:stop] = block
                    crc = crc32c.crc32c(np.ascontiguousarray(block), crc)
                    if array_name == "features":
                        bar.update(stop - start)
                dataset.attrs[CHECKSUM] = crc
    return TransferSummary(Path(store), Path(out), info.n_rows, tuple(info.variants))


def _checksum(values: np.ndarray) -> int:
    """CRC32C of an array's contents: its raw bytes, or for strings each one's UTF-8 bytes ended by a NUL."""
    if values.dtype == object:
        return crc32c.crc32c(b"".join(str(value).encode("utf-8") + b"\0" for value in values))
    return crc32c.crc32c(np.ascontiguousarray(values))


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
        try:
            n_rows, variants = write_store_from(handle, source, tmp, progress)
        except (OSError, KeyError, TypeError) as error:  # h5py's own errors: a damaged or foreign file
            raise HDF5Error(
                f"{source}: cannot be read as an exported store ({type(error).__name__}: {error})"
            ) from None
        delete_store(store)  # --overwrite: the old store goes only once the new one is whole
    return TransferSummary(source, store, n_rows, variants)


class _CountedRows:
    """An HDF5 dataset read by row ranges in order, counting the rows on a progress bar and checksumming them."""

    def __init__(self, dataset: h5py.Dataset, bar: tqdm | None) -> None:
        self.dataset, self.bar, self.shape = dataset, bar, dataset.shape
        self.crc, self.next_row = 0, 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        values = self.dataset[rows]
        if rows.start != self.next_row:
            raise RuntimeError("rows of an export must be read in order, once")  # write_store reads them so
        self.crc = crc32c.crc32c(np.ascontiguousarray(values), self.crc)
        self.next_row = rows.start + len(values)
        if self.bar is not None:
            self.bar.update(len(values))
        return values


def _checked(handle: h5py.File, name: str, source: Path, values: np.ndarray, n_rows: int) -> np.ndarray:
    """A row array read from an export, refused when its length or its checksum is wrong."""
    if len(values) != n_rows:
        raise HDF5Error(f"{source}: dataset /{name} has {len(values)} rows, the store {n_rows}")
    _check_sum(handle[name], name, source, _checksum(values))
    return values


def _check_sum(dataset: h5py.Dataset, name: str, source: Path, computed: int) -> None:
    if CHECKSUM not in dataset.attrs:
        raise HDF5Error(
            f"{source}: dataset /{name} has no {CHECKSUM} attribute (exported by an earlier version, or "
            "rewritten by another tool); export the store again"
        )
    if int(dataset.attrs[CHECKSUM]) != computed:
        raise HDF5Error(f"{source}: dataset /{name} fails its CRC32C checksum (the file is damaged); nothing imported")


def write_store_from(handle: h5py.File, source: Path, path: Path, progress: bool) -> tuple[int, tuple[str, ...]]:
    """Write the store held by an open export to ``path``; (rows, variants)."""
    attrs = read_attributes(handle.attrs, source)
    if attrs.get("schema") != SCHEMA:
        raise HDF5Error(f"{source}: schema {attrs.get('schema')!r}, expected {SCHEMA!r}")
    n_rows = int(attrs["n_rows"])
    missing = [name for name in ("labels", "paths", "dataset", "valid", "error") if name not in handle]
    if missing:
        raise HDF5Error(f"{source}: dataset(s) {', '.join('/' + name for name in missing)} missing")
    strings = {
        name: _checked(handle, name, source, np.asarray(handle[name].asstr()[:], dtype=object), n_rows).tolist()
        for name in ("paths", "dataset", "class", "error")
        if name in handle
    }
    labels = _checked(handle, "labels", source, handle["labels"][:], n_rows)
    valid = _checked(handle, "valid", source, handle["valid"][:], n_rows)
    variants = tuple(attrs["variants"])
    identity = StoreIdentity.from_attrs(attrs)
    expected = (n_rows, len(identity.block_indices), identity.dim)
    for name in variants:
        if f"features/{name}" not in handle or handle["features"][name].shape != expected:
            found = handle["features"][name].shape if f"features/{name}" in handle else "missing"
            raise HDF5Error(f"{source}: dataset /features/{name} is {found}, the store needs {expected}")
    total = n_rows * len(variants)
    with tqdm(total=total, unit="row", desc=f"import {attrs['split']}", disable=not progress) as bar:
        features = {name: _CountedRows(handle["features"][name], bar) for name in variants}
        embeddings = (
            {name: _CountedRows(handle[EMBEDDING_ARRAY][name], None) for name in variants}
            if EMBEDDING_ARRAY in handle
            else None
        )
        write_store(
            path,
            identity,
            split=attrs["split"],
            labels=labels.tolist(),
            paths=strings["paths"],
            datasets=strings["dataset"],
            features=features,
            classes=strings.get("class"),
            valid=valid,
            errors=strings["error"],
            extra_attrs={key: value for key, value in attrs.items() if key not in _STORE_OWN_ATTRIBUTES},
            embeddings=embeddings,
        )
    checked = {"features": features, EMBEDDING_ARRAY: embeddings or {}}
    for array_name, arrays in checked.items():  # checked before the store gets its name: a bad file imports nothing
        for name, rows in arrays.items():
            _check_sum(handle[array_name][name], f"{array_name}/{name}", source, rows.crc)
    return n_rows, variants
