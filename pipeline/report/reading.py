"""Tables for reading: metric columns first, the long setting as a short stable id with its legend (``settings.csv``).

Applied to every table the report writes, CSV and page alike (``build_tables``): a column is *identifying* when it
names the model, its config or the row (``IDENTIFYING``); every other column (a test set, ``avg``, a ``_pct`` /
``_pts`` metric, a threshold, a weight) is a metric column and comes first, each group in its builder's order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..results import RESULT_COLUMNS
from ..results.metrics import METRIC_NAMES
from .studies import RobustnessKey
from .table import ScoreKey, SkippedOutput, StudyKey, Table

SETTING, SETTING_ID = "setting", "setting_id"
SETTINGS_NAME = "settings.csv"
IDENTIFYING = frozenset(
    (
        *(column for column in RESULT_COLUMNS if column not in METRIC_NAMES),
        *ScoreKey.header(),
        *StudyKey.header(),
        *RobustnessKey.header(),
        SETTING_ID,
        "grid_dir",
        "metric",
        "excluded_from_avg",
        "excluded_from_mean",
        "n_mean_sets",
        "n_seeds",
        "runs",
        "note",
        "facet",
        "bucket",
        "n_errors",
        "block",
        "same_hyper_as_full",
        "published_contrastive_factor",
        "published_proj_layers",
        "published_proj_dim",
    )
)


def without_seed(label: str) -> str:
    """A setting label without its ``seed=`` field: the seeds of one config share an id (tables name the run)."""
    return " ".join(token for token in label.split() if not token.startswith("seed="))


def setting_id(label: str) -> str:
    """A short id of a setting label (its seed left out), the same in every report ('s-3f2a9c'); '' for none."""
    return "s-" + hashlib.sha1(without_seed(label).encode("utf-8")).hexdigest()[:6] if label else ""


def metrics_first(table: Table) -> Table:
    """The same table with its metric columns first, then its identifying columns (each group in order)."""
    order = [i for i, name in enumerate(table.header) if name not in IDENTIFYING]
    order += [i for i, name in enumerate(table.header) if name in IDENTIFYING]
    return Table(
        table.name, tuple(table.header[i] for i in order), tuple(tuple(r[i] for i in order) for r in table.rows)
    )


def with_setting_id(table: Table, legend: dict[str, str]) -> Table:
    """``setting`` replaced by ``setting_id``; each label recorded in ``legend`` (id -> label)."""
    if SETTING not in table.header:
        return table
    index = table.header.index(SETTING)
    rows = []
    for row in table.rows:
        short = setting_id(row[index])
        if short:
            legend[short] = without_seed(row[index])
        rows.append((*row[:index], short, *row[index + 1 :]))
    return Table(table.name, (*table.header[:index], SETTING_ID, *table.header[index + 1 :]), tuple(rows))


def for_reading(outcomes: Sequence[Table | SkippedOutput]) -> list[Table | SkippedOutput]:
    """Every table with setting ids and metric columns first, then ``settings.csv`` (the ids' legend)."""
    legend: dict[str, str] = {}
    out: list[Table | SkippedOutput] = [
        metrics_first(with_setting_id(item, legend)) if isinstance(item, Table) else item for item in outcomes
    ]
    if legend:
        rows = tuple((key, legend[key]) for key in sorted(legend))
        out.append(Table(SETTINGS_NAME, (SETTING_ID, SETTING), rows))
    else:
        out.append(SkippedOutput(SETTINGS_NAME, "no table names a setting"))
    return out
