"""The run config's parameters, declared once (pipeline.params), drive grid validation and the CSV parsers."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.heads import RunConfig
from pipeline.params import RUN_PARAMETERS, ParameterError
from pipeline.results import format_value


def test_every_run_config_field_is_declared_in_its_order() -> None:
    assert tuple(RUN_PARAMETERS) == tuple(f.name for f in dataclasses.fields(RunConfig))


@pytest.mark.parametrize(
    "name, value",
    [("contrastive_factor", 0.1), ("proj_dim", 1024), ("lr", 0.001), ("lr_milestones", [6, 11]),
     ("train_fraction", 0.2), ("head_blocks", "last"), ("amp", "bf16"), ("calibration", "temperature"),
     ("seed", 3)],
)  # fmt: skip
def test_a_checked_value_written_to_a_csv_cell_reads_back_equal(name: str, value: object) -> None:
    parameter = RUN_PARAMETERS[name]
    checked = parameter.check(name, value)
    assert parameter.parse_cell(format_value(checked)) == checked


@pytest.mark.parametrize(
    "name, value, message",
    [("proj_dim", 0, r"proj_dim: 0 is outside \[1, inf\]"), ("lr", 0.0, r"lr: 0.0 is outside \(0, inf\]"),
     ("train_fraction", 1.5, "outside"), ("batch_size", 8.5, "expected an integer"),
     ("contrastive_factor", float("nan"), "not a finite number"), ("lr_milestones", [11, 6], "increasing"),
     ("aggregation", "max", "'max' is not one of tie, mean"), ("classes", ["a", "a"], "repeated class")],
)  # fmt: skip
def test_values_outside_their_constraints_are_refused_by_name(name: str, value: object, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        RUN_PARAMETERS[name].check(name, value)
