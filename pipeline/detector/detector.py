"""The Python API: a RINE detector (a head, its frozen backbone and its calibration) that scores images.

:meth:`Detector.load` reads what the head records (:class:`DetectorSpec`: backbone id and revision, tap and
blocks, stored dtype, val thresholds, temperature), loads that backbone and refuses another unless allowed;
:meth:`Detector.score` scores images in memory as the evaluation does (the same decode and crops, features
rounded to the stored dtype, the head in float32, ``sigmoid(mean logit / temperature)``). Importing this
module imports neither torch nor transformers; :meth:`load` does. Usage: docs/scoring.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PipelineError
from ..names import (
    BLOCKS_FEATURES,
    CENTER,
    CROPS,
    DEFAULT_HEAD,
    DEFAULT_MODEL,
    DEFAULT_THRESHOLD,
    EMBEDDING_FEATURES,
    EMBEDDING_TAP,
    TEN_CROP,
)
from ..results.run_folder import CALIBRATION_METADATA_KEYS, HEAD_FILE, REQUIRED_HEAD_METADATA
from .backbones import BackboneSource, choose_backbone, ensure_available, identity_differences, is_local_revision
from .hub import fetch_detector_repo, looks_like_repo_id

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..features import Backbone, ForwardStep
    from ..heads import HeadCalibration, RineHead
    from ..variants import VariantSpec
    from .robust import RobustScores

FIXED = "fixed"  # the threshold name of a number given by the user (0.5 included)
EXPORT_FORMAT = "rine-pipeline/detector@1"
CONFIG_FILE = "config.json"


class PredictError(PipelineError, RuntimeError):
    """The head, backbone, threshold or inputs cannot be used together."""


class PredictOptionError(PredictError):
    """An option that does not fit the head (e.g. a val threshold of a head without any), found before the
    backbone is loaded; the CLI exits 2 on it."""


@dataclass(frozen=True)
class DetectorSpec:
    """What a head expects from the backbone, and how its logits become scores."""

    model: str
    revision: str | None  # hub commit or local content hash of the head's features; None: not recorded
    tap: str
    block_indices: tuple[int, ...] | None  # None: every block of the backbone (the authors' .pth)
    head_blocks: str = "all"  # "last": the head reads only the last of those blocks
    store_dtype: str = "float32"  # the head saw features rounded to this dtype
    amp: str = "none"  # the precision the head trained in ("bf16" or "none"); it always scores in float32
    calibration: HeadCalibration | None = None  # val thresholds and temperature; None for the authors' .pth
    origin: str = ""  # where the spec was read, for messages
    model_config: str | None = None  # the backbone's config.json as canonical JSON; None: not recorded
    backbone_copy: Path | None = None  # an export's own copy of the backbone (--include-backbone)
    backbone_copy_revision: str | None = None  # that copy's content hash, as exported
    head: str = DEFAULT_HEAD  # rine, linear, knn or logreg
    features: str = BLOCKS_FEATURES  # what the head reads: blocks, block:K (of those stored) or embedding

    @property
    def input_name(self) -> str:
        """What the head reads of a forward pass: its tap's tokens, or the pooled embedding."""
        return EMBEDDING_TAP if self.features == EMBEDDING_FEATURES else self.tap

    @property
    def temperature(self) -> float:
        return 1.0 if self.calibration is None else self.calibration.temperature

    @property
    def block_selection(self) -> str:
        """The blocks in ``backbone.parse_block_selection`` syntax."""
        return "all" if self.block_indices is None else ",".join(str(b) for b in self.block_indices)

    def describe_backbone(self) -> str:
        revision = self.revision or "any revision"
        return f"{self.model} ({revision}), tap {self.tap}, blocks {self.block_selection}"

    @classmethod
    def official(cls, origin: str) -> DetectorSpec:
        """The authors' released heads: every block's ln_2 output of ViT-L/14, features in float32, no thresholds."""
        return cls(DEFAULT_MODEL, None, "ln2", None, origin=origin)

    @classmethod
    def from_head_metadata(cls, metadata: Mapping[str, str], where: Path) -> DetectorSpec:
        """Read the metadata ``pipeline fit`` writes into head.safetensors; errors name the missing or bad key."""
        from ..heads import CheckpointError, HeadCalibration

        missing = [key for key in REQUIRED_HEAD_METADATA if key not in metadata]
        if missing:
            raise CheckpointError(
                f"{where}: head metadata lacks {', '.join(missing)}; not a head written by `pipeline fit`"
            )
        try:
            blocks = tuple(int(b) for b in json.loads(metadata["store_blocks"]))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{where}: head metadata store_blocks is not a list of blocks ({error})") from None
        has_calibration = any(key in metadata for key in CALIBRATION_METADATA_KEYS)  # heads of older versions have none
        return cls(
            model=metadata["model"],
            revision=metadata["model_revision"] or None,
            tap=metadata["tap"],
            block_indices=blocks,
            head_blocks=metadata.get("head_blocks", metadata.get("blocks_used", "all")),
            store_dtype=metadata.get("store_dtype", "float32"),
            amp=metadata.get("amp", "none"),
            calibration=HeadCalibration.from_metadata(metadata, where) if has_calibration else None,
            origin=str(where),
            model_config=metadata.get("model_config") or None,
            head=metadata.get("head", DEFAULT_HEAD),
            features=metadata.get("features", BLOCKS_FEATURES),
        )

    def to_json(self) -> dict[str, Any]:
        """The typed fields of ``config.json`` (``pipeline export``); calibration keys null without one."""
        calibration = (
            dict.fromkeys(CALIBRATION_METADATA_KEYS) if self.calibration is None else self.calibration.as_json()
        )
        return {
            "backbone": {
                "model": self.model,  # a hub id, or the local folder's path as given (a hint)
                "revision": self.revision,
                "source": "local" if is_local_revision(self.revision) else "hub",
                "tap": self.tap,
                "model_config": None if self.model_config is None else json.loads(self.model_config),
            },
            "block_indices": None if self.block_indices is None else list(self.block_indices),
            "head_blocks": self.head_blocks,
            "features": self.features,
            "store_dtype": self.store_dtype,
            "amp": self.amp,
            **calibration,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any], where: Path) -> DetectorSpec:
        """Read :meth:`to_json`'s fields back (``config.json`` of an exported detector)."""
        from ..heads import HeadCalibration

        try:
            backbone = document["backbone"]
            blocks = document["block_indices"]
            calibration = None if document["calibration"] is None else HeadCalibration.from_json(document, where)
            model_config = backbone.get("model_config")
            copy = backbone.get("included")
            if copy is not None and (str(copy["folder"]) in ("", ".", "..") or "/" in str(copy["folder"])):
                raise ValueError(f"backbone.included.folder {copy['folder']!r} is not a folder of the export")
            return cls(
                model=str(backbone["model"]),
                revision=backbone["revision"],
                tap=str(backbone["tap"]),
                block_indices=None if blocks is None else tuple(int(b) for b in blocks),
                head_blocks=str(document["head_blocks"]),
                store_dtype=str(document["store_dtype"]),
                amp=str(document["amp"]),
                calibration=calibration,
                origin=str(where),
                model_config=None if model_config is None else canonical_json(model_config),
                backbone_copy=None if copy is None else Path(where).parent / str(copy["folder"]),
                backbone_copy_revision=None if copy is None else str(copy["revision"]),
                head=str(document.get("head", {}).get("kind", DEFAULT_HEAD)),
                features=str(document.get("features", BLOCKS_FEATURES)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PredictError(f"{where}: not a detector config written by `pipeline export` ({error!r})") from None


def canonical_json(document: Any) -> str:
    """A config.json object as the identity text ``cache.canonical_model_config`` makes of it."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def read_detector_files(path: str | Path, revision: str | None = None) -> tuple[RineHead, DetectorSpec]:
    """The head and its spec from a run folder, an exported folder, a head.safetensors, an authors' .pth, or a
    detector repo on the hub (``org/name`` at ``revision``, through the hub cache)."""
    from ..heads import load_head, load_official_checkpoint

    if not Path(path).exists() and looks_like_repo_id(str(path)):
        path = fetch_detector_repo(str(path), revision)
    elif revision is not None:
        raise PredictOptionError(f"{path}: --revision (revision=) is for a hub repo id ORG/NAME, not a local head")
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_FILE
        if config.is_file():
            return read_exported(path)
        path = path / HEAD_FILE
        if not path.is_file():
            raise PredictError(
                f"{path.parent}: neither a run folder ({HEAD_FILE}) nor an exported detector ({CONFIG_FILE})"
            )
    if not path.is_file():
        raise PredictOptionError(
            f"{path}: no such head file (give a run folder, a head.safetensors, an exported folder, an official "
            ".pth or a hub repo id ORG/NAME)"
        )
    if path.suffix == ".safetensors":
        head, metadata = load_head(path)
        return head, DetectorSpec.from_head_metadata(metadata, path)
    return load_official_checkpoint(path), DetectorSpec.official(str(path))


def read_exported(folder: Path) -> tuple[RineHead, DetectorSpec]:
    from ..heads import load_head

    config = folder / CONFIG_FILE
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PredictError(f"{config}: not readable JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise PredictError(f"{config}: not a detector config (its format is not {EXPORT_FORMAT!r})")
    head, _ = load_head(folder / document.get("head", {}).get("file", HEAD_FILE))
    return head, DetectorSpec.from_json(document, config)


def resolve_crop(crop: str, height: int, width: int, crop_size: int, auto_min_side: int | None) -> str:
    """``center`` or ``tencrop`` for one image under a crop mode of ``CROPS``."""
    if crop == "auto":
        limit = 2 * crop_size if auto_min_side is None else auto_min_side
        return TEN_CROP if min(height, width) >= limit else CENTER
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return crop


def variants_of(crop: str) -> tuple[VariantSpec, ...]:
    """The variants a resolved crop (``center`` or ``tencrop``) is scored by."""
    from ..variants import VariantGroup

    return VariantGroup.from_name(crop).members


def parse_threshold(text: str) -> str | float:
    """A threshold option: a rule name of ``metrics.THRESHOLD_RULES`` or a number in [0, 1]."""
    from ..names import THRESHOLD_RULES

    if text in THRESHOLD_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold {text!r}: give one of {', '.join(THRESHOLD_RULES)} or a number in [0, 1]")
    return value


class Detector:
    """A head on its backbone; see the module doc. Build it with :meth:`load`."""

    def __init__(
        self,
        spec: DetectorSpec,
        head: RineHead,
        backbone: Backbone,
        *,
        threshold: str | float | None = None,
        other_backbone: str = "",
    ) -> None:
        self.spec = spec
        self.head = head.to(backbone.device).eval()
        self.backbone = backbone
        self.other_backbone = other_backbone  # why the backbone differs from the head's (allowed), or ""
        self.threshold = DEFAULT_THRESHOLD
        self.threshold_name = FIXED
        self.use_threshold(threshold)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model: str | None = None,
        revision: str | None = None,
        allow_other_backbone: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        threshold: str | float | None = None,
    ) -> Detector:
        """Read a head (run folder, exported folder, head.safetensors, authors' .pth, or a detector repo id on the
        hub at ``revision``) and load its backbone.

        ``model`` (a folder or a hub id) replaces the recorded backbone: a folder with the recorded content
        (weights and config.json) is the head's; anything else is refused unless ``allow_other_backbone``.
        ``threshold`` is a rule name (``val``, ``eer``, ``fpr1``, ``fpr5``) or a number; by default ``val`` when
        the head has val thresholds, else 0.5. Everything but the backbone is checked before it is loaded.
        """
        head, spec = read_detector_files(path, revision)
        check_threshold(spec, threshold)
        source = choose_backbone(spec, model, spec.backbone_copy, spec.backbone_copy_revision)
        if source.other and not allow_other_backbone:
            raise PredictError(refusal(spec, f"{source.model} (another model)"))
        available = ensure_available(source, spec)  # before transformers is imported: a missing one fails fast
        from ..features import BlockSelectionError

        try:
            backbone = load_backbone(available, spec, device, dtype)
        except BlockSelectionError as error:
            if not allow_other_backbone:
                raise PredictError(refusal(spec, f"{source.model} ({error})")) from None
            raise PredictError(f"{source.model}: cannot load the backbone the head needs ({error})") from None
        differences = identity_differences(source, spec, backbone)
        other = ""
        if source.other or differences:
            if not allow_other_backbone:
                raise PredictError(refusal(spec, f"{source.model} ({'; '.join(differences) or backbone.revision})"))
            other = f"other than the head's {spec.model} ({spec.revision or 'any revision'}): allowed"
        if spec.features == EMBEDDING_FEATURES:
            n_blocks, dim, what = 1, backbone.embedding_dim, "image embedding"
        else:
            n_blocks, dim, what = 1 if spec.head_blocks == "last" else len(backbone.block_indices), backbone.dim, ""
        if (head.n_blocks, head.in_dim) != (n_blocks, dim):
            raise PredictError(
                f"the head expects {head.n_blocks} blocks of dim {head.in_dim}, "
                f"the backbone {source.model} gives {n_blocks} of dim {dim}"
                + (f" (its {what}; 0: it has none)" if what else "")
            )
        return cls(spec, head, backbone, threshold=threshold, other_backbone=other)

    def __repr__(self) -> str:
        return (
            f"Detector(backbone={self.backbone_label()!r}, head={self.spec.origin!r}, "
            f"threshold={self.threshold!r} ({self.threshold_name}), crop={self.crop_size}x{self.crop_size})"
        )

    @property
    def crop_size(self) -> int:
        """The side of the square crops the backbone reads (no resize: larger images are cropped)."""
        return self.backbone.crop_size

    # ------------------------------------------------------------------ thresholds

    @property
    def thresholds(self) -> dict[str, float]:
        """Rule name -> threshold chosen on val (empty for the authors' checkpoints)."""
        return {} if self.spec.calibration is None else self.spec.calibration.threshold_values()

    def use_threshold(self, threshold: str | float | None) -> None:
        """Label by a rule's val threshold (``val``, ``eer``, ``fpr1``, ``fpr5``) or a number; None: the default."""
        if threshold is None:
            threshold = "val" if self.spec.calibration is not None else DEFAULT_THRESHOLD
        if isinstance(threshold, str):
            threshold = parse_threshold(threshold)
        if isinstance(threshold, str):
            if threshold not in self.thresholds:
                raise PredictError(
                    f"{self.spec.origin}: this head carries no val thresholds ({self.why_no_thresholds()}); "
                    f"--threshold {threshold} needs them: give a number such as 0.5"
                )
            self.threshold, self.threshold_name = self.thresholds[threshold], threshold
        else:
            self.threshold, self.threshold_name = float(threshold), FIXED

    def why_no_thresholds(self) -> str:
        return why_no_thresholds(self.spec)

    def describe(self) -> str:
        """Lines for the terminal: backbone, threshold and where it comes from."""
        lines = [f"head {self.spec.origin}: {self.spec.describe_backbone()}, temperature {self.spec.temperature:g}"]
        if self.other_backbone:
            lines.append(f"backbone {self.backbone_label()}")
        if self.threshold_name == FIXED:
            note = "" if self.thresholds else f" ({self.why_no_thresholds()})"
            lines.append(f"threshold {self.threshold:g} (fixed){note}")
        else:
            point = self.spec.calibration.thresholds[self.threshold_name]
            lines.append(  # the report's number formats: a threshold with 4 significant digits, rates in percent
                f"threshold {self.threshold:.4g} ({self.threshold_name}, chosen on val split "
                f"{self.spec.calibration.val_split}: acc {100 * point.acc:.1f} %, real acc {100 * point.real_acc:.1f} %, "
                f"fake acc {100 * point.fake_acc:.1f} %; the output's threshold column keeps the full precision)"
            )
        return "\n".join(lines)

    def backbone_label(self) -> str:
        """The backbone that made the features (the output's ``backbone`` column): the head's recorded identity
        when it is the head's, wherever it was loaded from; else the folder or id and what it is."""
        if not self.other_backbone:
            return f"{self.spec.model}@{self.spec.revision or self.backbone.revision}"
        return f"{self.backbone.config.model}@{self.backbone.revision} ({self.other_backbone})"

    # ------------------------------------------------------------------ scoring steps

    def forward_step(self) -> ForwardStep:
        """Pixels -> {tap: tokens} rounded to the dtype the head was trained on."""
        from ..features import ForwardStep

        return ForwardStep(self.backbone, (self.spec.input_name,), self.spec.store_dtype)

    def logits(self, tokens: np.ndarray) -> torch.Tensor:
        """Head logits (B,) of tokens (B, n_blocks, dim) (or embeddings (B, 1, e)), on the CPU in float32."""
        import torch

        from ..devices import exact_float32

        x = torch.from_numpy(tokens).to(self.backbone.device)
        if self.spec.head_blocks == "last":
            x = x[:, -1:]
        with torch.inference_mode(), exact_float32():
            logits, _ = self.head(x.float())
        return logits.float().squeeze(1).cpu()

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Probability of fake from crop logits (B, n_crops): ``sigmoid(mean logit / temperature)``."""
        from ..heads import calibrated_scores

        return calibrated_scores(logits, self.spec.temperature)

    def crop_of(self, crop: str, height: int, width: int, auto_min_side: int | None = None) -> str:
        return resolve_crop(crop, height, width, self.backbone.crop_size, auto_min_side)

    # ------------------------------------------------------------------ in-memory API

    def score(
        self,
        images: Iterable[str | Path | Image.Image | np.ndarray],
        crop: str = CENTER,
        *,
        batch_size: int = 32,
        auto_min_side: int | None = None,
        robust: bool = False,
    ) -> np.ndarray | RobustScores:
        """Probability of fake per image (float64 array), in order.

        ``images``: file paths, PIL images or (H, W, 3) uint8 RGB arrays (a
        file that cannot be decoded raises ``PredictError`` naming it). With
        ``robust`` each image is also scored as re-encoded (``robust.REENCODINGS``,
        in the same batches): a ``RobustScores`` with ``score``, ``score_min``,
        ``score_max`` and ``verdict`` (real, fake or unsure) per image.
        """
        arrays = [to_rgb_array(item) for item in images]
        crops = [self.crop_of(crop, a.shape[0], a.shape[1], auto_min_side) for a in arrays]
        if not robust:
            return self.score_arrays(arrays, crops, batch_size=batch_size)
        from .robust import REENCODINGS, robust_scores, with_copies

        scores = self.score_arrays(*with_copies(arrays, crops), batch_size=batch_size)
        return robust_scores(scores.reshape(len(arrays), 1 + len(REENCODINGS)), self.threshold)

    def score_arrays(self, arrays: Sequence[np.ndarray], crops: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Scores of (H, W, 3) uint8 RGB arrays, each by its resolved crop (``center`` or ``tencrop``)."""
        import torch

        from ..features import PixelRecipe

        scores = np.empty(len(arrays), dtype=np.float64)
        step = self.forward_step()
        for kind in (CENTER, TEN_CROP):
            members = [i for i, c in enumerate(crops) if c == kind]
            recipe = PixelRecipe(variants_of(kind), self.backbone.crop_size)
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                pixels = [recipe(arrays[i], i) for i in chunk]
                logits = [
                    self.logits(step(np.stack([p[name] for p in pixels]))[self.spec.input_name])
                    for name in recipe.names
                ]
                scores[chunk] = self.scores(torch.stack(logits, dim=1))
        return scores


def check_threshold(spec: DetectorSpec, threshold: str | float | None) -> None:
    """Refuse a threshold rule the head carries no value for (:class:`PredictOptionError`), before any loading."""
    if isinstance(threshold, str):
        try:
            threshold = parse_threshold(threshold)
        except ValueError as error:
            raise PredictOptionError(f"--threshold: {error}") from None
    if isinstance(threshold, str) and spec.calibration is None:
        raise PredictOptionError(
            f"{spec.origin}: this head carries no val thresholds ({why_no_thresholds(spec)}); --threshold "
            f"{threshold} needs them: give a number such as 0.5"
        )


def why_no_thresholds(spec: DetectorSpec) -> str:
    if spec.block_indices is None:
        return "the authors' checkpoints were not calibrated; their evaluation calls a score above 0.5 fake"
    return "it was trained before thresholds were stored with heads; fit it again to get them"


def load_backbone(source: BackboneSource, spec: DetectorSpec, device: str, dtype: str) -> Backbone:
    from ..features import Backbone, BackboneConfig, BlockSelectionError

    config = BackboneConfig(source.model, source.revision, device, dtype, local_files_only=source.local_files_only)
    try:
        return Backbone(config, spec.block_selection)
    except BlockSelectionError:
        raise  # another backbone (fewer blocks): the caller says so
    except (OSError, ValueError) as error:
        raise PredictError(f"{source.model}: cannot load the backbone the head needs ({error})") from None


def refusal(spec: DetectorSpec, found: str) -> str:
    return (
        f"{spec.origin}: the head was trained on features of {spec.describe_backbone()}; the backbone asked for is "
        f"{found}. Its features mean nothing to this head, so scoring is refused; pass --allow-other-backbone "
        "(allow_other_backbone=True) to score anyway (the output's backbone column then says so)"
    )


def to_rgb_array(item: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a path (decoded as evaluation decodes), a PIL image or an array."""
    from PIL import Image

    from ..features import ImageDecodeError, convert_to_rgb_array, decode_image

    if isinstance(item, (str, Path)):
        try:
            return decode_image(Path(item))
        except ImageDecodeError as error:
            raise PredictError(f"{item}: {error}") from None
    if isinstance(item, Image.Image):
        return convert_to_rgb_array(item.copy())  # the conversion edits the image's info
    array = np.asarray(item)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise PredictError(f"an image array must be (H, W, 3) uint8 RGB, got {array.shape} {array.dtype}")
    return np.ascontiguousarray(array)
