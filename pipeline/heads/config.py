"""Typed configs of stage two; the only place grid YAML is parsed.

A grid file names the data (train, val and test stores), a ``base`` run
config and a ``grid`` of lists (or a list of such blocks) expanded with
scikit-learn's ParameterGrid: deterministic order, every value validated,
unknown keys rejected by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from sklearn.model_selection import ParameterGrid

from ..cache import default_store_path
from ..errors import PipelineError
from ..names import (
    ALL_CLASSES,
    ALL_DATASETS,
    BLOCK_FEATURES_PREFIX,
    BLOCKS_FEATURES,
    CENTER,
    DEFAULT_HEAD,
    DEFAULT_KNN_K,
    DEFAULT_LOGREG_C,
    DEFAULT_MODEL,
    EMBEDDING_FEATURES,
    LIST_SEPARATOR,
    SELECT_ACROSS_FIELDS,
    STANDARD_PROTOCOL,
    TAPS,
)
from ..params import RUN_PARAMETERS, ParameterError
from ..variants import VariantGroup, VariantSpec


class ConfigError(PipelineError, ValueError):
    """A grid file or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Hyper-parameters of one head fit (defaults: the authors' protocol)."""

    contrastive_factor: float = 0.2  # xi, weight of SupCon
    proj_layers: int = 2  # q
    proj_dim: int = 1024  # d'
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    # 1-based epochs at whose start lr /= 10 (the authors' list: epochs 6 and 11, i.e. 0-based 5 and 10)
    lr_milestones: tuple[int, ...] = (6, 11)
    classes: tuple[str, ...] | None = None  # train (and val) classes; None = all in the store
    train_fraction: float = 1.0
    head_blocks: str = "all"  # one of HEAD_BLOCKS; "last": ablation without intermediate blocks
    aggregation: str = "tie"  # one of AGGREGATIONS; "mean": ablation without TIE
    seed: int = 0
    # training precision: "none" (float32, as the authors) or "bf16" (bfloat16 matmuls, float32 master weights,
    # an explicit opt-in for screening); scores are float32 either way
    amp: str = "none"
    calibration: str = "none"  # one of CALIBRATIONS; "temperature": fitted on val (pipeline.heads.calibration)
    # which datasets of the training split a run trains on (pipeline.heads.protocols): "standard" with
    # train_datasets None = all of them; one-vs-rest / leave-one-out expand into one run per dataset
    protocol: str = STANDARD_PROTOCOL
    train_datasets: tuple[str, ...] | None = None
    head: str = DEFAULT_HEAD  # one of HEADS (docs/training.md, "Heads")
    features: str = BLOCKS_FEATURES  # blocks (RINE only), block:K or embedding
    k: int = DEFAULT_KNN_K  # knn: neighbours
    C: float = DEFAULT_LOGREG_C  # logreg: inverse regularisation strength (scikit-learn's name)

    @property
    def block(self) -> int | None:
        """K of ``features: block:K`` (None for blocks and embedding)."""
        if self.features.startswith(BLOCK_FEATURES_PREFIX):
            return int(self.features.removeprefix(BLOCK_FEATURES_PREFIX))
        return None

    def lr_at_epoch(self, epoch: int) -> float:
        """The lr of 0-based ``epoch``: ``lr / 10**k``, k = milestones reached (epoch + 1 >= m), as the authors compute it."""
        return self.lr / 10 ** sum(1 for milestone in self.lr_milestones if epoch + 1 >= milestone)


def classes_label(classes: tuple[str, ...] | None) -> str:
    return ALL_CLASSES if classes is None else LIST_SEPARATOR.join(classes)


def datasets_label(datasets: tuple[str, ...] | None) -> str:
    return ALL_DATASETS if datasets is None else LIST_SEPARATOR.join(datasets)


RUN_KEYS = tuple(f.name for f in fields(RunConfig))
_RENAMED_KEYS = {"blocks": "head_blocks"}


def _renamed_hint(keys: list[str]) -> str:
    return "".join(f" ({key} is now called {_RENAMED_KEYS[key]})" for key in keys if key in _RENAMED_KEYS)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def make_run_config(values: Mapping[str, Any], where: str = "config", whole: bool = True) -> RunConfig:
    """Validate a mapping of hyper-parameters into a RunConfig (``whole``: also that head and features go
    together; False for a part of a config, such as a grid's base or one grid value)."""
    unknown = sorted(set(values) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(RUN_KEYS)}{_renamed_hint(unknown)}"
        )
    if values.get("amp") == "auto":
        raise ConfigError(
            f"{where}.amp: 'auto' is no longer a choice (it picked bf16 by the CPU or GPU, so numbers changed "
            "with the machine); float32 ('none') is the default, as the authors; ask for 'bf16' explicitly"
        )
    try:
        checked = {key: RUN_PARAMETERS[key].check(f"{where}.{key}", value) for key, value in values.items()}
    except ParameterError as error:
        raise ConfigError(str(error)) from None
    run = RunConfig(**checked)
    if whole:
        check_head_features(run, where)
    return run


def check_head_features(run: RunConfig, where: str) -> None:
    """RINE reads every cached block; the other heads read one vector (one block's token or the embedding)."""
    if (run.head == DEFAULT_HEAD) != (run.features == BLOCKS_FEATURES):
        wanted = BLOCKS_FEATURES if run.head == DEFAULT_HEAD else f"{BLOCK_FEATURES_PREFIX}K or {EMBEDDING_FEATURES}"
        raise ConfigError(
            f"{where}: head {run.head} with features {run.features}: head {run.head} reads features {wanted}"
        )


@dataclass(frozen=True)
class StoreRef:
    """One store to read: by split name (resolved in the cache) or by path."""

    name: str  # label in results (split name by default)
    path: Path
    variant: str | None = None  # None: "center" for evaluation, training views for train
    views: int | None = None  # training entry only: read its first N views, epoch e view e mod N (None: all)

    @property
    def group(self) -> VariantGroup:
        """The variant group an evaluation entry scores (``center`` by default)."""
        return VariantGroup.from_name(self.variant or CENTER)


@dataclass(frozen=True)
class GridConfig:
    """A parsed grid file.

    ``model`` and ``tap`` locate stores named by split; ``declared`` says
    which of the two the file gave (``data.model``, ``data.tap``): those are
    checked against every store, the others are taken from the stores before
    a grid runs (``grid.plan_grid_stores``).
    """

    name: str
    out: Path
    model: str
    tap: str
    train: StoreRef
    val: StoreRef
    tests: tuple[StoreRef, ...]
    runs: tuple[RunConfig, ...]
    source: Path | None = None
    declared: frozenset[str] = frozenset({"model", "tap"})
    select_across: tuple[str, ...] = ()  # setting fields selection compares across (results.select_runs)
    add_train: StoreRef | None = None  # a split whose rows every run trains on besides the train split's

    def __len__(self) -> int:
        return len(self.runs)


_GRID_KEYS = ("name", "out", "data", "base", "grid", "select_across")
_DATA_KEYS = ("cache_dir", "model", "tap", "train", "val", "test", "add_train")
_REF_KEYS = ("split", "store", "variant", "name", "views")


def _parse_ref(value: Any, where: str, cache_dir: Path, model: str, tap: str, training: bool = False) -> StoreRef:
    if isinstance(value, str):
        value = {"split": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a split name or a mapping with split/store, got {value!r}")
    unknown = sorted(set(value) - set(_REF_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_REF_KEYS)}")
    if ("split" in value) == ("store" in value):
        raise ConfigError(f"{where}: give exactly one of split (a name in the cache) or store (a path)")
    variant = value.get("variant")
    if variant is not None:
        try:  # a training entry names one stored variant (a view); an evaluation entry a group (center, tencrop, ...)
            VariantSpec.from_name(str(variant)) if training else VariantGroup.from_name(str(variant))
        except ValueError as error:
            raise ConfigError(f"{where}.variant: {error}") from None
        variant = str(variant)
    if "split" in value:
        split = str(value["split"])
        path = default_store_path(cache_dir, model, tap, split)
        default_name = split
    else:
        path = Path(value["store"])
        default_name = path.stem
    if variant not in (None, "center"):
        default_name = f"{default_name}_{variant}"
    name = str(value.get("name", default_name))
    if not name or "/" in name:
        raise ConfigError(f"{where}.name: {name!r} must be a non-empty name without '/'")
    return StoreRef(name=name, path=path, variant=variant, views=_parse_views(value, where, training))


def _parse_views(value: dict[str, Any], where: str, training: bool) -> int | None:
    """``views: N`` of the training entry: the grid reads that many training views and cycles them on purpose."""
    if "views" not in value:
        return None
    views = value["views"]
    if not training:
        raise ConfigError(f"{where}.views: only the training entry reads views")
    if "variant" in value:
        raise ConfigError(f"{where}: give views (the first N training views) or variant (one of them), not both")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ConfigError(f"{where}.views: expected a positive number of training views, got {views!r}")
    return views


def parse_grid(text: str, *, source: Path | None = None, out: Path | None = None, amp: str | None = None) -> GridConfig:
    """Parse grid YAML text (relative paths are relative to the working directory).

    ``amp``: the training precision of every config, in place of the file's (``pipeline fit --amp``).
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source or 'grid'}: not valid YAML: {error}") from None
    where = str(source or "grid")
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(_GRID_KEYS)}")
    unknown = sorted(set(document) - set(_GRID_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_GRID_KEYS)}")
    for key in ("name", "data"):
        if key not in document:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = str(document["name"])
    data = document["data"]
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: data: expected a mapping")
    unknown = sorted(set(data) - set(_DATA_KEYS))
    if unknown:
        raise ConfigError(f"{where}: data: unknown key(s) {', '.join(unknown)}; known: {', '.join(_DATA_KEYS)}")
    for key in ("train", "val", "test"):
        if key not in data:
            raise ConfigError(f"{where}: data: missing key {key!r}")
    cache_dir = Path(data.get("cache_dir", "cache"))
    model = str(data.get("model", DEFAULT_MODEL))
    tap = _check_choice("data.tap", data.get("tap", "ln2"), TAPS)
    ref = lambda value, key: _parse_ref(value, f"data.{key}", cache_dir, model, tap)  # noqa: E731
    tests_value = data["test"] if isinstance(data["test"], list) else [data["test"]]
    tests = tuple(ref(value, f"test[{i}]") for i, value in enumerate(tests_value))
    names = [t.name for t in tests] + ["val"]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: data.test: names must be distinct and not 'val': {names}")

    base = document.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base: expected a mapping of hyper-parameters")
    make_run_config(base, "base", whole=False)  # validate base alone, so its errors name it
    points = expand_grid(document.get("grid"), where)
    override = {} if amp is None else {"amp": amp}
    runs = tuple(make_run_config({**base, **point, **override}, "grid") for point in points)
    check_distinct_runs(runs, points, where)
    check_protocols(runs, where)
    select_across = document.get("select_across") or []
    if not isinstance(select_across, list) or any(field not in SELECT_ACROSS_FIELDS for field in select_across):
        raise ConfigError(
            f"{where}: select_across: expected a list of {', '.join(SELECT_ACROSS_FIELDS)}, got {select_across!r}"
        )
    train = _parse_ref(data["train"], "data.train", cache_dir, model, tap, training=True)
    add_train = None
    if data.get("add_train") is not None:
        add_train = _parse_ref(data["add_train"], "data.add_train", cache_dir, model, tap, training=True)
        train = with_added(train, add_train)
    return GridConfig(
        name=name,
        out=out or Path(document.get("out", Path("runs") / name)),
        model=model,
        tap=tap,
        train=train,
        add_train=add_train,
        val=ref(data["val"], "val"),
        tests=tests,
        runs=runs,
        source=source,
        declared=frozenset(key for key in ("model", "tap") if key in data),
        select_across=tuple(select_across),
    )


def with_added(train: StoreRef, added: StoreRef) -> StoreRef:
    """The training entry named for results as ``<train>+<added>``."""
    return dataclasses.replace(train, name=f"{train.name}+{added.name}")  # the same views, variant and store


def expand_grid(grid: Any, where: str) -> list[dict[str, Any]]:
    """ParameterGrid over a mapping of lists or a list of such mappings."""
    if grid is None:
        return [{}]
    blocks = grid if isinstance(grid, list) else [grid]
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: grid[{i}]: expected a mapping of key: [values]")
        for key, values in block.items():
            if key not in RUN_KEYS:
                raise ConfigError(
                    f"{where}: grid: unknown key {key!r}; known: {', '.join(RUN_KEYS)}{_renamed_hint([key])}"
                )
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: grid.{key}: expected a non-empty list of values, got {values!r}")
    if not blocks:
        raise ConfigError(f"{where}: grid: an empty list gives no config; leave grid out to run the base config once")
    for i, block in enumerate(blocks):
        for key, values in block.items():
            checked = [getattr(make_run_config({key: value}, "grid", whole=False), key) for value in values]
            repeats = [values[j] for j, value in enumerate(checked) if value in checked[:j]]
            if repeats:
                repeated = repeats[0]
                raise ConfigError(
                    f"{where}: grid{f'[{i}]' if isinstance(grid, list) else ''}.{key}: {repeated!r} is listed more "
                    "than once; every config would run twice"
                )
    points = list(ParameterGrid(blocks))
    for point in points:
        make_run_config(point, "grid", whole=False)
    return points


def check_distinct_runs(runs: tuple[RunConfig, ...], points: list[dict[str, Any]], where: str) -> None:
    """Refuse a grid that lists one config twice (its rows would be written twice)."""
    first_seen: dict[RunConfig, int] = {}
    for index, run in enumerate(runs):
        if run in first_seen:
            earlier = first_seen[run]
            raise ConfigError(
                f"{where}: grid: configs {earlier} ({points[earlier]}) and {index} ({points[index]}) are the same "
                "once base is applied; every config must appear once"
            )
        first_seen[run] = index


def check_protocols(runs: tuple[RunConfig, ...], where: str) -> None:
    """A protocol other than standard chooses the training datasets of its runs itself."""
    for run in runs:
        if run.protocol != STANDARD_PROTOCOL and run.train_datasets is not None:
            raise ConfigError(
                f"{where}: protocol {run.protocol} chooses each run's train_datasets itself; give train_datasets "
                f"only with protocol {STANDARD_PROTOCOL}"
            )


def load_grid(path: Path, out: Path | None = None, amp: str | None = None) -> GridConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    return parse_grid(path.read_text(), source=path, out=out, amp=amp)


def run_config_dict(config: RunConfig) -> dict[str, Any]:
    """Plain, YAML-friendly values (tuples as lists)."""
    values = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# Fields added with the head zoo: left out of a run's identity while at their defaults, so that a RINE config
# keeps the run id (and the finished run folder) it had before they existed.
# Fields added after run ids were first hashed: at these defaults they are left out, so a run keeps its id.
_ADDED_FIELD_DEFAULTS: dict[str, Any] = {
    "head": DEFAULT_HEAD,
    "features": BLOCKS_FEATURES,
    "k": DEFAULT_KNN_K,
    "C": DEFAULT_LOGREG_C,
    "protocol": STANDARD_PROTOCOL,
    "train_datasets": None,
}


def run_identity_dict(config: RunConfig) -> dict[str, Any]:
    """``run_config_dict`` without the fields added later that are at their defaults: what a run id hashes."""
    values = run_config_dict(config)
    return {k: v for k, v in values.items() if k not in _ADDED_FIELD_DEFAULTS or v != _ADDED_FIELD_DEFAULTS[k]}
