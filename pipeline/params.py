"""The parameters of a run's config, declared once (scikit-learn's ``_parameter_constraints``): type, range or
choices, and how each is written in and read from a CSV cell.

``heads.config`` validates grid values against them and expands grids with them; ``results.rows`` parses the
CSV columns of results.csv and selection.csv with them. Torch-free, importing only the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PipelineError
from .names import (
    AGGREGATIONS,
    ALL_CLASSES,
    AMP_MODES,
    BLOCK_FEATURES_PREFIX,
    BLOCKS_FEATURES,
    CALIBRATIONS,
    EMBEDDING_FEATURES,
    FEATURES_CHOICES,
    HEAD_BLOCKS,
    HEADS,
    LIST_SEPARATOR,
    PROTOCOLS,
)


class ParameterError(PipelineError, ValueError):
    """A value outside its parameter's constraints; the message names the parameter (as the caller calls it)."""


@dataclass(frozen=True)
class Parameter:
    """What one parameter accepts."""

    kind: str  # "int", "float", "choice", "int_list" (increasing), "classes" (names, 'all' or null), "features"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself is refused
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> Any:
        """``value`` validated and typed, or :class:`ParameterError` naming ``name``."""
        if self.kind in ("int", "float"):
            return self._number(name, value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ParameterError(f"{name}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        if self.kind == "int_list":
            if not isinstance(value, (list, tuple)):
                raise ParameterError(f"{name}: expected a list of epochs, got {value!r}")
            items = tuple(Parameter("int", self.low).check(name, item) for item in value)
            if list(items) != sorted(set(items)):
                raise ParameterError(f"{name}: expected increasing epoch numbers, got {list(value)!r}")
            return items
        if self.kind == "features":
            return self._features(name, value)
        return self._classes(name, value)

    def parse_cell(self, text: str) -> Any:
        """A CSV cell as written by ``results.rows.format_value`` (ValueError when it is not one)."""
        if self.kind == "int":
            return int(text)
        if self.kind == "float":
            return float(text)
        if self.kind == "int_list":
            return tuple(int(part) for part in text.split(LIST_SEPARATOR)) if text else ()
        return text  # choices, and classes (written as 'all' or joined with '+')

    def _number(self, name: str, value: Any) -> Any:
        integer = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise ParameterError(f"{name}: expected {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ParameterError(f"{name}: {value!r} is not a finite number")
        if value < self.low or value > self.high or (self.low_open and value == self.low):
            bound = f"({self.low:g}, {self.high:g}]" if self.low_open else f"[{self.low:g}, {self.high:g}]"
            raise ParameterError(f"{name}: {value!r} is outside {bound}")
        return int(value) if integer else float(value)

    @staticmethod
    def _features(name: str, value: Any) -> str:
        """``blocks``, ``embedding`` or ``block:K`` (K an integer, negative from the end), as written."""
        if value in (BLOCKS_FEATURES, EMBEDDING_FEATURES):
            return value
        if isinstance(value, str) and value.startswith(BLOCK_FEATURES_PREFIX):
            number = value.removeprefix(BLOCK_FEATURES_PREFIX)
            if number.lstrip("-").isdigit():
                return f"{BLOCK_FEATURES_PREFIX}{int(number)}"
        raise ParameterError(f"{name}: {value!r} is not one of {FEATURES_CHOICES}")

    @staticmethod
    def _classes(name: str, value: Any) -> tuple[str, ...] | None:
        if value is None or value == ALL_CLASSES:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            raise ParameterError(f"{name}: expected a list of class names, '{ALL_CLASSES}' or null, got {value!r}")
        if len(set(value)) != len(value):
            raise ParameterError(f"{name}: repeated class in {value!r}")
        return tuple(sorted(value))


# One entry per field of heads.config.RunConfig, in its order.
RUN_PARAMETERS: Mapping[str, Parameter] = {
    "contrastive_factor": Parameter("float", low=0.0),  # xi
    "proj_layers": Parameter("int", low=1),  # q
    "proj_dim": Parameter("int", low=1),  # d'
    "epochs": Parameter("int", low=1),
    "batch_size": Parameter("int", low=2),
    "lr": Parameter("float", low=0.0, low_open=True),
    "lr_milestones": Parameter("int_list", low=1),
    "classes": Parameter("classes"),
    "train_fraction": Parameter("float", low=0.0, high=1.0, low_open=True),
    "head_blocks": Parameter("choice", choices=HEAD_BLOCKS),
    "aggregation": Parameter("choice", choices=AGGREGATIONS),
    "seed": Parameter("int", low=0),
    "amp": Parameter("choice", choices=AMP_MODES),
    "calibration": Parameter("choice", choices=CALIBRATIONS),
    "protocol": Parameter("choice", choices=PROTOCOLS),
    "train_datasets": Parameter("classes"),  # names, 'all' or null, like classes
    "head": Parameter("choice", choices=HEADS),
    "features": Parameter("features"),
    "k": Parameter("int", low=1),  # knn: neighbours
    "C": Parameter("float", low=0.0, low_open=True),  # logreg: inverse regularisation strength
}


def cell_parsers() -> dict[str, Callable[[str], Any]]:
    """Column -> parser of its CSV cells, for every run parameter."""
    return {name: parameter.parse_cell for name, parameter in RUN_PARAMETERS.items()}
