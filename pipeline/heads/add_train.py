"""A new generator appears: :func:`run_add_train` refits a grid's selected configs with the rows of another split
added to their training rows, and writes ``delta.csv``: per selected config and test set, the change of ACC and AP
against the same config without it, with paired bootstrap intervals (``results.deltas``).

The grid itself runs first (its finished runs are skipped); the refits are a grid of their own in
``<grid out>/add_<split>/`` whose training entry is named ``<train>+<split>``. Docs: docs/training.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..names import CENTER, VAL_SPLIT
from ..results import OK, SELECTION_COLUMNS, read_result_rows, write_csv
from ..results.bootstrap import BootstrapConfig
from ..results.deltas import paired_delta_replicates
from ..results.rows import ResultRow, format_value, read_csv_records
from ..results.run_folder import RunFolder
from .config import GridConfig, RunConfig, StoreRef, make_run_config, with_added
from .grid import FitConfig, GridSummary, run_grid
from .stores import DataError

DELTA_FILE = "delta.csv"
DELTA_METRICS = ("acc", "ap")
DELTA_COLUMNS: tuple[str, ...] = (
    "selection",
    "run",
    "run_added",
    "protocol",
    "train_datasets",
    "split",
    "dataset",
    "n",
) + tuple(
    f"{metric}{suffix}" for metric in DELTA_METRICS for suffix in ("", "_added", "_delta", "_delta_low", "_delta_high")
)


@dataclass(frozen=True)
class AddTrainSummary:
    base: GridSummary  # the grid without the added split
    refit: GridSummary  # its selected configs with it
    delta: Path

    def report(self) -> str:
        return f"{self.refit.n_runs} selected config(s) refitted with the added split in {self.refit.out}; deltas in {self.delta}"


def added_store_ref(spec: GridConfig, value: str) -> StoreRef:
    """``--add-train``'s store: a store path (``*.zarr`` or an existing folder), else a split beside the training store."""
    path = Path(value)
    if value.endswith(".zarr") or path.is_dir():
        return StoreRef(name=path.stem, path=path)
    if "/" in value or not value:
        raise DataError(f"--add-train {value!r}: not a split name nor a store folder")
    return StoreRef(name=value, path=spec.train.path.parent / f"{value}.zarr")


def added_spec(spec: GridConfig, added: StoreRef, runs: tuple[RunConfig, ...]) -> GridConfig:
    """The grid of the refits: the selected configs, the added split, a folder of their own."""
    return dataclasses.replace(
        spec,
        name=f"{spec.name}_add_{added.name}",
        out=spec.out / f"add_{added.name}",
        train=with_added(spec.train, added),
        add_train=added,
        runs=runs,
        source=None,
    )


def selected_runs(out: Path) -> list[tuple[str, str]]:
    """(selection rule, run id) of every row of ``out/selection.csv``."""
    return [
        (record["selection"], record["run"]) for _, record in read_csv_records(out / "selection.csv", SELECTION_COLUMNS)
    ]


def run_add_train(
    spec: GridConfig, options: FitConfig, added: StoreRef, bootstrap: BootstrapConfig | None = None
) -> AddTrainSummary:
    """Run ``spec``, refit its selected configs with ``added``'s rows, write the delta table (see the module doc)."""
    bootstrap = bootstrap or BootstrapConfig()
    if spec.add_train is not None:
        raise DataError(f"grid {spec.name}: data.add_train is set already; --add-train adds a split to a plain grid")
    base = run_grid(spec, options)
    chosen = selected_runs(spec.out)
    if not chosen:
        raise DataError(f"{base.selection}: no selected config to refit (every config failed?)")
    configs = {rid: make_run_config(RunFolder.of(spec.out, rid).read_document().run, str(rid)) for _, rid in chosen}
    refit_spec = added_spec(spec, added, tuple(dict.fromkeys(configs.values())))
    refit = run_grid(refit_spec, options)
    refit_of = refitted_runs(refit_spec.out, refit.results)
    records = []
    for rule, rid in chosen:
        if configs[rid] not in refit_of:
            continue  # its refit failed: an error row of the refit's results.csv says why
        records += delta_records(
            rule, RunFolder.of(spec.out, rid), RunFolder.of(refit_spec.out, refit_of[configs[rid]]), bootstrap
        )
    delta = refit_spec.out / DELTA_FILE
    write_csv(delta, DELTA_COLUMNS, records)
    return AddTrainSummary(base, refit, delta)


def refitted_runs(out: Path, results: Path) -> dict[RunConfig, str]:
    """Config -> run id of the refits that finished."""
    ids = {row.run for _, row in read_result_rows(results) if row.status == OK}
    return {make_run_config(RunFolder.of(out, rid).read_document().run, rid): rid for rid in sorted(ids)}


def delta_records(rule: str, before: RunFolder, after: RunFolder, bootstrap: BootstrapConfig) -> list[dict[str, str]]:
    """One record per (test split, dataset) of the center crop: both runs' metrics, the delta and its interval."""
    rows_before = center_rows(before)
    rows_after = center_rows(after)
    records = []
    for key, row in rows_before.items():
        if key not in rows_after:
            continue
        split, dataset = key
        added = rows_after[key]
        scores_before, scores_after = before.read_scores(split), after.read_scores(split)
        mask_before, mask_after = scores_before.datasets == dataset, scores_after.datasets == dataset
        if list(scores_before.paths[mask_before]) != list(scores_after.paths[mask_after]):
            raise DataError(
                f"{before.path} and {after.path}: scores_{split}.csv do not hold the same rows of {dataset}"
            )
        replicates = None
        if bootstrap.enabled:
            labels = scores_before.labels[mask_before]
            replicates = paired_delta_replicates(
                labels, scores_before.scores[mask_before], scores_after.scores[mask_after], dataset, bootstrap
            )
        record = {
            "selection": rule,
            "run": before.run_id,
            "run_added": after.run_id,
            "protocol": row.setting.protocol,
            "train_datasets": row.setting.train_datasets,
            "split": split,
            "dataset": dataset,
            "n": format_value(row.n),
        }
        for metric in DELTA_METRICS:
            value, value_added = row.metric(metric), added.metric(metric)
            interval = None if replicates is None else replicates.interval(metric, bootstrap.confidence)
            record |= {
                metric: format_value(value),
                f"{metric}_added": format_value(value_added),
                f"{metric}_delta": format_value(value_added - value),
                f"{metric}_delta_low": "" if interval is None else format_value(interval.low),
                f"{metric}_delta_high": "" if interval is None else format_value(interval.high),
            }
        records.append(record)
    return records


def center_rows(folder: RunFolder) -> dict[tuple[str, str], ResultRow]:
    """(test split, dataset) -> the run's ok metrics row of the center crop."""
    return {
        (row.split or "", row.dataset or ""): row
        for row in folder.read_metrics()
        if row.status == OK and row.split != VAL_SPLIT and row.variant == CENTER
    }
