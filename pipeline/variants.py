"""Variants and variant groups: the ways of turning an image into the pixels whose features a store holds.

A store keeps one feature array per variant: ``center``, ``view_NNN`` (seeded training views), ``tencrop_0``
.. ``tencrop_9``, ``<perturbation>-<preset>`` and ``format-align-q<quality>`` (:class:`VariantSpec`; the names
table: docs/cache-format.md). What a user asks for is a :class:`VariantGroup` (``center``, ``tencrop``,
``views``, a perturbed or a format-aligned copy), in one spelling across `pipeline extract`, a grid's
``variant:`` and `pipeline predict --crop`. Torch- and Zarr-free: both stages and the product use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .names import (
    CENTER,
    DEFAULT_ALIGN_QUALITY,
    FORMAT_ALIGN,
    PERTURB_PRESETS,
    PERTURBATIONS,
    TEN_CROP,
    TEN_CROP_COUNT,
    VIEWS,
)

_TRAIN_VIEW_NAME = re.compile(r"view_(\d{3,})")
_TEN_CROP_NAME = re.compile(rf"{TEN_CROP}_(\d)")
_FORMAT_ALIGN_NAME = re.compile(rf"{FORMAT_ALIGN}-q(\d{{1,3}})")


class VariantKind(str, Enum):
    """How a variant's pixels are made (the value is what store attributes record)."""

    CENTER = "center"
    TRAIN_VIEW = "train_view"
    TEN_CROP = "ten_crop"
    PERTURB = "perturb"
    FORMAT_ALIGN = "format_align"


@dataclass(frozen=True)
class VariantSpec:
    """How the pixels of one feature array were produced.

    ``index`` is the view of a training view and the crop of a ten-crop
    variant (0 otherwise); ``perturbation`` and ``preset`` are set for
    perturbed variants only, ``quality`` for format-aligned ones.
    """

    name: str
    kind: VariantKind
    index: int = 0
    perturbation: str | None = None
    preset: str | None = None
    quality: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", VariantKind(self.kind))

    @staticmethod
    def center() -> VariantSpec:
        return VariantSpec("center", VariantKind.CENTER)

    @staticmethod
    def train_view(view: int) -> VariantSpec:
        if view < 0:
            raise ValueError(f"a training view index is >= 0, got {view}")
        return VariantSpec(f"view_{view:03d}", VariantKind.TRAIN_VIEW, index=view)

    @staticmethod
    def ten_crop(crop: int) -> VariantSpec:
        """One of torchvision's ten crops (corners, center, then the same of the flip)."""
        if not 0 <= crop < TEN_CROP_COUNT:
            raise ValueError(f"a ten-crop index is in 0..{TEN_CROP_COUNT - 1}, got {crop}")
        return VariantSpec(f"{TEN_CROP}_{crop}", VariantKind.TEN_CROP, index=crop)

    @staticmethod
    def perturbed(perturbation: str, preset: str) -> VariantSpec:
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; choose from {PERTURBATIONS}")
        if preset not in PERTURB_PRESETS:
            raise ValueError(f"unknown perturbation preset {preset!r}; choose from {PERTURB_PRESETS}")
        return VariantSpec(f"{perturbation}-{preset}", VariantKind.PERTURB, perturbation=perturbation, preset=preset)

    @staticmethod
    def format_aligned(quality: int = DEFAULT_ALIGN_QUALITY) -> VariantSpec:
        """Every image re-encoded as JPEG at ``quality`` before the center crop."""
        if not 1 <= quality <= 100:
            raise ValueError(f"a JPEG quality is in 1..100, got {quality}")
        return VariantSpec(f"{FORMAT_ALIGN}-q{quality}", VariantKind.FORMAT_ALIGN, quality=quality)

    @staticmethod
    def from_name(name: str) -> VariantSpec:
        """The spec of a stored variant name (see the module table); ValueError for anything else."""
        if name == "center":
            return VariantSpec.center()
        if match := _TRAIN_VIEW_NAME.fullmatch(name):
            return VariantSpec.train_view(int(match.group(1)))
        if match := _TEN_CROP_NAME.fullmatch(name):
            return VariantSpec.ten_crop(int(match.group(1)))
        if match := _FORMAT_ALIGN_NAME.fullmatch(name):
            return VariantSpec.format_aligned(int(match.group(1)))
        perturbation, dash, preset = name.partition("-")
        if dash and perturbation in PERTURBATIONS and preset in PERTURB_PRESETS:
            return VariantSpec.perturbed(perturbation, preset)
        hint = f" ({TEN_CROP!r} names the group of the ten crops, not a stored variant)" if name == TEN_CROP else ""
        raise ValueError(
            f"unknown variant {name!r}{hint}: expected center, view_NNN, {TEN_CROP}_0..{TEN_CROP_COUNT - 1} "
            f"<perturbation>-<preset> with a perturbation in {PERTURBATIONS} and a preset in {PERTURB_PRESETS}, "
            f"or {FORMAT_ALIGN}-q<JPEG quality>"
        )


def ten_crop_variants() -> tuple[VariantSpec, ...]:
    """The ten members of the ``TEN_CROP`` group, in torchvision's order."""
    return tuple(VariantSpec.ten_crop(i) for i in range(TEN_CROP_COUNT))


@dataclass(frozen=True)
class VariantGroup:
    """Variants made or scored together: ``center``, ``tencrop``, ``views`` (``count`` training views), a
    perturbed copy or a format-aligned copy. Build one with the static constructors or :meth:`from_name`."""

    kind: VariantKind
    count: int = 1  # training views: how many
    perturbation: str | None = None
    preset: str | None = None
    quality: int | None = None

    @staticmethod
    def center() -> VariantGroup:
        return VariantGroup(VariantKind.CENTER)

    @staticmethod
    def ten_crop() -> VariantGroup:
        return VariantGroup(VariantKind.TEN_CROP, count=TEN_CROP_COUNT)

    @staticmethod
    def views(count: int) -> VariantGroup:
        if count < 1:
            raise ValueError(f"a group of training views holds at least one, got {count}")
        return VariantGroup(VariantKind.TRAIN_VIEW, count=count)

    @staticmethod
    def perturbed(perturbation: str, preset: str) -> VariantGroup:
        spec = VariantSpec.perturbed(perturbation, preset)  # checks both
        return VariantGroup(VariantKind.PERTURB, perturbation=spec.perturbation, preset=spec.preset)

    @staticmethod
    def format_aligned(quality: int = DEFAULT_ALIGN_QUALITY) -> VariantGroup:
        return VariantGroup(VariantKind.FORMAT_ALIGN, quality=VariantSpec.format_aligned(quality).quality)

    @staticmethod
    def from_name(name: str) -> VariantGroup:
        """``center``, ``tencrop``, ``<perturbation>-<preset>`` or ``format-align-q<quality>``; ValueError else."""
        if name == CENTER:
            return VariantGroup.center()
        if name == TEN_CROP:
            return VariantGroup.ten_crop()
        try:
            spec = VariantSpec.from_name(name)
        except ValueError:
            spec = None
        if spec is not None and spec.kind is VariantKind.PERTURB:
            return VariantGroup.perturbed(spec.perturbation or "", spec.preset or "")
        if spec is not None and spec.kind is VariantKind.FORMAT_ALIGN:
            return VariantGroup.format_aligned(spec.quality or DEFAULT_ALIGN_QUALITY)
        raise ValueError(
            f"unknown variant group {name!r}: expected {CENTER}, {TEN_CROP}, <perturbation>-<preset> with a "
            f"perturbation in {PERTURBATIONS} and a preset in {PERTURB_PRESETS}, or {FORMAT_ALIGN}-q<JPEG quality>"
        )

    @property
    def name(self) -> str:
        """How users write the group (training views: ``views``)."""
        if self.kind is VariantKind.CENTER:
            return CENTER
        if self.kind is VariantKind.TEN_CROP:
            return TEN_CROP
        if self.kind is VariantKind.TRAIN_VIEW:
            return VIEWS
        return self.members[0].name

    @property
    def members(self) -> tuple[VariantSpec, ...]:
        """The stored variants of the group, in order."""
        if self.kind is VariantKind.CENTER:
            return (VariantSpec.center(),)
        if self.kind is VariantKind.TEN_CROP:
            return ten_crop_variants()
        if self.kind is VariantKind.TRAIN_VIEW:
            return tuple(VariantSpec.train_view(view) for view in range(self.count))
        if self.kind is VariantKind.PERTURB:
            return (VariantSpec.perturbed(self.perturbation or "", self.preset or ""),)
        return (VariantSpec.format_aligned(self.quality or DEFAULT_ALIGN_QUALITY),)

    @property
    def is_training(self) -> bool:
        return self.kind is VariantKind.TRAIN_VIEW

    @property
    def is_perturbed(self) -> bool:
        """A copy of the images other than the detector would see them: a perturbation or format alignment."""
        return self.kind in (VariantKind.PERTURB, VariantKind.FORMAT_ALIGN)

    def describe(self) -> str:
        if self.kind is VariantKind.TRAIN_VIEW:
            return f"{self.count} augmented view(s)"
        if self.kind is VariantKind.TEN_CROP:
            return "ten crops"
        if self.kind is VariantKind.PERTURB:
            return f"perturbation {self.name}"
        if self.kind is VariantKind.FORMAT_ALIGN:
            return f"format-aligned (JPEG quality {self.quality})"
        return "center crop"
