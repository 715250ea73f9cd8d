"""What a variant is: one way of turning an image into the pixels whose features a store holds.

A store keeps one feature array per variant, named:

=================  ============  ==================================================
name               kind          pixels
=================  ============  ==================================================
``center``         center        the evaluation crop (no resize)
``view_000`` ...   train_view    seeded augmented training view ``i``
``tencrop_0`` ...  ten_crop      crop ``i`` of torchvision's ten crops (0-4 the
``tencrop_9``                    corners and center, 5-9 the same of the flip)
``jpeg-official``  perturb       a robustness perturbation (``PERTURBATIONS``)
                                 with a preset (``PERTURB_PRESETS``)
``format-align-    format_align  every image (real and fake) re-encoded the same
q95``                            way, JPEG at quality 95 (the number), then the
                                 center crop: no file-format shortcut left
=================  ============  ==================================================

The ten crops are scored together: ``TEN_CROP`` names that *group* (what a
grid asks for), never a stored array; :func:`ten_crop_variants` lists its ten
members. :meth:`VariantSpec.from_name` is the one parser of these names.

Torch- and Zarr-free: both stages reach it (stage two through ``cache``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .names import DEFAULT_ALIGN_QUALITY, FORMAT_ALIGN, PERTURB_PRESETS, PERTURBATIONS, TEN_CROP, TEN_CROP_COUNT

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
