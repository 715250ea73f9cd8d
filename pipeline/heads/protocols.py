"""Generalization protocols: which datasets of the training split each run trains on.

:func:`expand_protocols` turns a run of protocol ``one-vs-rest`` into one run per dataset of the training store
(trained on that dataset alone) and a run of ``leave-one-out`` into one run per dataset (trained on all the others);
``standard`` runs train on their ``train_datasets`` (None: all). The subset is a row mask of the cached store
(``stores.dataset_mask``, applied by ``stores.training_rows``), so any head trained from those rows follows the
protocol and nothing is re-extracted. Docs: docs/training.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..errors import PipelineError
from ..names import STANDARD_PROTOCOL
from .config import RunConfig

ONE_VS_REST, LEAVE_ONE_OUT = "one-vs-rest", "leave-one-out"


class ProtocolError(PipelineError, ValueError):
    """A protocol that cannot be applied to the training store (too few datasets, an unknown dataset)."""


def protocol_cells(protocol: str, datasets: Sequence[str]) -> list[tuple[str, ...] | None]:
    """The ``train_datasets`` of each run a protocol makes of one config, over the training store's datasets."""
    datasets = sorted(set(datasets))
    if protocol == STANDARD_PROTOCOL:
        return [None]
    if protocol == ONE_VS_REST:
        return [(dataset,) for dataset in datasets]
    if protocol == LEAVE_ONE_OUT:
        if len(datasets) < 2:
            raise ProtocolError(f"leave-one-out needs at least two datasets in the training split, it has {datasets}")
        return [tuple(other for other in datasets if other != dataset) for dataset in datasets]
    raise ProtocolError(f"unknown protocol {protocol!r}")


def expand_protocols(runs: Sequence[RunConfig], datasets: Sequence[str]) -> tuple[RunConfig, ...]:
    """Every run with its protocol applied, in order: a config's cells by dataset name (duplicates dropped)."""
    expanded: dict[RunConfig, None] = {}
    for run in runs:
        if run.protocol == STANDARD_PROTOCOL or run.train_datasets is not None:  # all, or already a cell
            expanded[run] = None
            continue
        for cell in protocol_cells(run.protocol, datasets):
            expanded[dataclasses.replace(run, train_datasets=cell)] = None
    return tuple(expanded)
