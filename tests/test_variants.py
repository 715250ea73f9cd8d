"""Variant names: the one parser and the constructors agree on every kind."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from pipeline.names import PERTURB_PRESETS, PERTURBATIONS, TEN_CROP
from pipeline.variants import VariantKind, VariantSpec, ten_crop_variants

EVERY_KIND = [
    (VariantSpec.center(), "center", VariantKind.CENTER, 0),
    (VariantSpec.train_view(0), "view_000", VariantKind.TRAIN_VIEW, 0),
    (VariantSpec.train_view(14), "view_014", VariantKind.TRAIN_VIEW, 14),
    (VariantSpec.train_view(1234), "view_1234", VariantKind.TRAIN_VIEW, 1234),
    (VariantSpec.ten_crop(0), "tencrop_0", VariantKind.TEN_CROP, 0),
    (VariantSpec.ten_crop(9), "tencrop_9", VariantKind.TEN_CROP, 9),
    (VariantSpec.perturbed("jpeg", "official"), "jpeg-official", VariantKind.PERTURB, 0),
    (VariantSpec.perturbed("combined", "paper"), "combined-paper", VariantKind.PERTURB, 0),
    (VariantSpec.format_aligned(), "format-align-q95", VariantKind.FORMAT_ALIGN, 0),
    (VariantSpec.format_aligned(7), "format-align-q7", VariantKind.FORMAT_ALIGN, 0),
]


@pytest.mark.parametrize(("spec", "name", "kind", "index"), EVERY_KIND, ids=[case[1] for case in EVERY_KIND])
def test_from_name_round_trips_every_kind(spec: VariantSpec, name: str, kind: VariantKind, index: int) -> None:
    assert (spec.name, spec.kind, spec.index) == (name, kind, index)
    assert VariantSpec.from_name(name) == spec
    assert VariantSpec.from_name(spec.name) == spec


def test_every_perturbation_and_preset_round_trips() -> None:
    for perturbation in PERTURBATIONS:
        for preset in PERTURB_PRESETS:
            spec = VariantSpec.from_name(f"{perturbation}-{preset}")
            assert (spec.kind, spec.perturbation, spec.preset) == (VariantKind.PERTURB, perturbation, preset)


def test_ten_crop_group_lists_its_ten_members_and_is_no_variant() -> None:
    assert [spec.name for spec in ten_crop_variants()] == [f"tencrop_{i}" for i in range(10)]
    assert [spec.index for spec in ten_crop_variants()] == list(range(10))
    with pytest.raises(ValueError, match=f"'{TEN_CROP}' names the group of the ten crops"):
        VariantSpec.from_name(TEN_CROP)


@pytest.mark.parametrize(
    "name", ["", "Center", "view_1", "view_01", "view_-01", "tencrop_10", "tencrop_a", "jpeg", "jpeg-", "rain-official",
             "jpeg-custom", "jpeg-official-2", " center", "format-align", "format-align-95", "format-align-q1000"],
)  # fmt: skip
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        VariantSpec.from_name(name)


def test_constructors_refuse_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="ten-crop index is in 0..9"):
        VariantSpec.ten_crop(10)
    with pytest.raises(ValueError, match="training view index"):
        VariantSpec.train_view(-1)
    with pytest.raises(ValueError, match="unknown perturbation 'rain'"):
        VariantSpec.perturbed("rain", "official")
    with pytest.raises(ValueError, match="unknown perturbation preset 'custom'"):
        VariantSpec.perturbed("jpeg", "custom")
    for quality in (0, 101):
        with pytest.raises(ValueError, match="JPEG quality is in 1..100"):
            VariantSpec.format_aligned(quality)
    assert VariantSpec.from_name("format-align-q80").quality == 80


def test_kind_is_recorded_as_its_plain_value() -> None:
    """Store attributes are JSON: the kind must be written as the string it always was."""
    recorded = json.loads(json.dumps(asdict(VariantSpec.ten_crop(3))))
    assert recorded == {
        "name": "tencrop_3", "kind": "ten_crop", "index": 3, "perturbation": None, "preset": None, "quality": None
    }  # fmt: skip
    assert VariantSpec(**recorded) == VariantSpec.ten_crop(3)
