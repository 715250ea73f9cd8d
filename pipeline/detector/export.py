"""``pipeline export``: a trained run as a self-contained detector folder, optionally with one ONNX graph.

The folder (``head.safetensors``, ``config.json`` with the detector's spec, a ``README.md`` model card with
the hub's metadata block, with ``--onnx`` ``detector.onnx``: backbone + head as one graph, with
``--include-backbone`` the backbone's files) is created whole under a temporary name, then renamed; it is a
valid hub model repository, and ``Detector.load(OUT)`` (or its repo id) reads it. Contents: docs/scoring.md.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import PipelineError
from ..files import atomic_path, disk_errors_explained
from ..heads import RineHead
from ..names import CENTER, DEFAULT_HEAD, THRESHOLD_RULES, VAL_SPLIT
from ..results import OK, ResultRow
from ..results.run_folder import HEAD_FILE, RunDocument, RunFolder
from .backbone_copy import copy_backbone
from .backbones import is_local_revision
from .detector import CONFIG_FILE, EXPORT_FORMAT, Detector, DetectorSpec, read_detector_files

ONNX_FILE = "detector.onnx"
ONNX_OPSET = 17


class ExportError(PipelineError, RuntimeError):
    """A run folder that cannot be exported, or an --out that must not be overwritten."""


@dataclass(frozen=True)
class ExportConfig:
    run_dir: Path
    out: Path
    onnx: bool = False
    overwrite: bool = False  # replace OUT when it is a detector folder written by this command
    include_backbone: bool = False  # copy the backbone's files into OUT/backbone (a folder that needs no hub)
    model: str | None = None  # where the run's backbone is when its recorded path is not (same content only)


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    files: tuple[str, ...]

    def report(self) -> str:
        return f"exported detector to {self.out}: {', '.join(self.files)}"


@dataclass(frozen=True)
class RunRecord:
    """What a run folder says about the trained head."""

    folder: RunFolder
    head: RineHead
    spec: DetectorSpec
    document: RunDocument  # config.yaml
    fit: dict[str, Any]  # fit.json ({} when absent)
    rows: tuple[ResultRow, ...]  # metrics.csv

    @property
    def val_crop(self) -> str:
        return next((row.variant for row in self.rows if row.split == VAL_SPLIT and row.variant), CENTER)


def read_run(path: Path) -> RunRecord:
    folder = RunFolder(path)
    missing = folder.missing()
    if missing:
        raise ExportError(f"{path}: not a finished run folder of `pipeline fit` (no {', '.join(missing)})")
    head, spec = read_detector_files(folder.head_path)
    rows = tuple(row for row in folder.read_metrics() if row.status == OK)
    return RunRecord(folder, head, spec, folder.read_document(), folder.read_fit(), rows)


def config_document(record: RunRecord, onnx: bool, included: dict[str, str] | None = None) -> dict[str, Any]:
    head = record.head
    data = record.document.data
    spec_json = record.spec.to_json()
    if included is not None:
        spec_json["backbone"]["included"] = included
    document = {
        "format": EXPORT_FORMAT,
        **spec_json,
        "crop": record.val_crop,
        "head": head_description(head, record.spec.head),
        "source": {
            "run": record.folder.run_id,
            "grid": record.document.grid,
            "train_split": data.get("train", {}).get("name"),
            "package_version": __version__,
        },
    }
    if onnx:
        document["onnx"] = {
            "file": ONNX_FILE,
            "inputs": {"pixels": "uint8 (batch, size, size, 3) RGB crops"},
            "outputs": {"logit": "float32 (batch,)", "score": "float32 (batch,) = sigmoid(logit / temperature)"},
        }
    return document


def head_description(head: Any, kind: str) -> dict[str, Any]:
    """config.json's ``head``: its file, its kind and its shape (RINE's q, d', aggregation; a probe's position)."""
    shape = {"file": HEAD_FILE, "kind": kind, "n_blocks": head.n_blocks, "in_dim": head.in_dim}
    if kind == DEFAULT_HEAD:
        return shape | {"proj_dim": head.proj_dim, "proj_layers": head.proj_layers, "aggregation": head.aggregation}
    return shape | {"position": head.position} | ({"k": head.k} if kind == "knn" else {})


def run_export(config: ExportConfig) -> ExportSummary:
    """Write ``config.run_dir`` as a detector folder at ``config.out`` (see the module doc)."""
    record = read_run(Path(config.run_dir))
    out = Path(config.out)
    if out.is_symlink():
        raise ExportError(
            f"{out}: is a symbolic link; --out must name the folder itself (give its target, {out.resolve()}, "
            "or another --out)"
        )
    if out.exists() and not is_exported_folder(out):
        raise ExportError(f"{out}: exists and is not a folder written by `pipeline export`; choose another --out")
    if out.exists() and not config.overwrite:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it, or choose another --out")
    needs_backbone = config.onnx or config.include_backbone
    detector = (
        Detector.load(record.folder.path, model=config.model, device="cpu", dtype="float32") if needs_backbone else None
    )
    with disk_errors_explained(out), atomic_path(out) as tmp:
        tmp.mkdir()
        shutil.copyfile(record.folder.head_path, tmp / HEAD_FILE)
        included = copy_backbone(detector, tmp) if config.include_backbone else None
        document = config_document(record, config.onnx, included)
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, out.name, config.onnx, included), encoding="utf-8")
        if detector is not None:
            export_onnx(detector, tmp / ONNX_FILE)
        if out.exists():  # an earlier export, replaced once the new one is whole
            shutil.rmtree(out)
    return ExportSummary(out, tuple(sorted(p.name for p in out.iterdir())))


def is_exported_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- ONNX


class PixelsToScore(torch.nn.Module):
    """Backbone + head as one module: uint8 RGB crops (B, S, S, 3) -> (logit (B,), score (B,))."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.model = detector.backbone.model  # registered, so its weights are the graph's initialisers
        self.head = detector.head
        self.spec = detector.spec

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tap = self.spec.input_name  # the tap's tokens, or the embedding
        tokens = self.backbone.tap_tokens(self.backbone.normalise(pixels), (tap,))[tap]
        tokens = tokens.to(getattr(torch, self.spec.store_dtype)).float()
        if self.spec.head_blocks == "last":
            tokens = tokens[:, -1:]
        logit = self.head(tokens)[0].squeeze(1)
        return logit, torch.sigmoid(logit / self.spec.temperature)


def export_onnx(detector: Detector, path: Path) -> None:
    """Trace :class:`PixelsToScore` on CPU float32 into ``path`` (dynamic batch)."""
    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError:
        raise ExportError("--onnx needs the onnx package: pip install 'rine-pipeline[export]'") from None
    size = detector.backbone.crop_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    module = PixelsToScore(detector).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches of transformers' code
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["logit", "score"],
            dynamic_axes={"pixels": {0: "batch"}, "logit": {0: "batch"}, "score": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript tracer: no onnxscript needed, forward hooks traced as they run
        )


# ---------------------------------------------------------------- model card


def percent(value: float) -> str:
    return "" if value != value else f"{100 * value:.1f}"  # NaN -> empty


_MARKDOWN_SPECIALS = re.compile(r"([\\`*\[\]|])")  # code, emphasis, links and images, table cells


def md(value: object) -> str:
    """Text from a run (dataset and split names, config values) made inert in Markdown: no HTML, links or cells."""
    text = " ".join(str(value).split())  # no line breaks: one table row stays one row
    return html.escape(_MARKDOWN_SPECIALS.sub(r"\\\1", text), quote=False)


def md_code(value: object) -> str:
    """A code span holding ``value`` literally (Markdown shows a code span's text as it is, HTML included)."""
    return "`" + " ".join(str(value).replace("`", "'").split()) + "`"


def card_metadata(spec: DetectorSpec) -> list[str]:
    """The model card's metadata block (YAML front matter), as the hub reads it."""
    lines = ["---", "library_name: rine-pipeline", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {tag}" for tag in ("synthetic-image-detection", "ai-generated-image-detection", "rine", "clip")]
    if not is_local_revision(spec.revision):
        lines.append(f"base_model: {spec.model}")
    return [*lines, "---", ""]


def backbone_lines(spec: DetectorSpec, included: dict[str, str] | None) -> list[str]:
    """The card's paragraph on where the backbone comes from."""
    if included is not None:
        return [
            f"This folder carries its backbone (`{included['folder']}/`, content {included['revision']}): it scores "
            "with no hub at all.",
        ]
    if is_local_revision(spec.revision):
        where = (
            f"a local folder (weights {spec.revision}, recorded as `{spec.model}`; any copy of it with the same "
            "weights and config.json is accepted: `pipeline predict --model DIR ...`, `Detector.load(..., model=DIR)`)"
        )
    else:
        revision = spec.revision or "main"
        where = (
            f"`{spec.model}` at revision `{revision}` from the hub (or its cache: `huggingface-cli download "
            f"{spec.model} --revision {revision}` pre-fills it)"
        )
    return [
        f"The backbone is not included: it loads from {where}. An export made with `--include-backbone` carries it.",
    ]


HEAD_WORDS = {
    "linear": "one linear layer trained with BCE (UFD's linear probe)",
    "logreg": "a logistic regression (scikit-learn, on standardised features)",
    "knn": "cosine k nearest neighbours among its training images (UFD's nearest-neighbour variant)",
}


def model_card(record: RunRecord, name: str, onnx: bool, included: dict[str, str] | None = None) -> str:
    spec = record.spec
    run = record.document.run
    data = record.document.data
    train = data.get("train", {})
    head = record.head
    setting = record.rows[0].setting if record.rows else None
    in_code = " ".join(name.replace("`", "'").replace('"', "'").split())  # cannot close the code block or string
    what = HEAD_WORDS.get(spec.head, "")
    lines = [
        *card_metadata(spec),
        f"# {'RINE detector' if spec.head == DEFAULT_HEAD else 'Detector'} {md(name)}",
        "",
        (
            "A synthetic-image detector: the RINE head (Koutlis & Papadopoulos, *Leveraging Representations from "
            "Intermediate Encoder-Blocks for Synthetic Image Detection*, ECCV 2024) on the CLS tokens of the blocks "
            "of a frozen CLIP vision tower"
            if spec.head == DEFAULT_HEAD
            else f"A synthetic-image detector: {what} on the features `{spec.features}` of a frozen vision tower"
        )
        + f", trained with rine-pipeline (version {__version__}). Its score is the probability that an image is "
        "synthetic (AI-generated).",
        "",
        "## How to load",
        "",
        "```python",
        "from pipeline import Detector  # pip install rine-pipeline",
        "",
        f'det = Detector.load("{in_code}")  # loads the backbone below',
        'scores = det.score(["photo.jpg"], crop="center")  # probability of fake',
        "fake = scores >= det.threshold",
        "```",
        "",
        "```bash",
        f"pipeline predict --head {in_code} images/ --out scores.csv   # streaming, resumable; --threshold eer|fpr1|...",
        "```",
        "",
        "Published on the hub (`huggingface-cli upload ORG/NAME " + in_code + "`), it loads by its repo id: "
        '`Detector.load("ORG/NAME", revision=...)`, `pipeline predict --head ORG/NAME --revision ...`.',
        "",
        *backbone_lines(spec, included),
    ]
    if onnx:
        lines += [
            "",
            f"`{ONNX_FILE}` holds backbone and head as one graph: input `pixels`, uint8 RGB crops of shape "
            "(batch, S, S, 3) cut as below; outputs `logit` and `score` (= sigmoid(logit / temperature)). For ten "
            "crops, run the ten and take the sigmoid of their mean logit divided by the temperature.",
        ]
    lines += [
        "",
        "## Backbone and features",
        "",
        "| backbone | revision | tap | blocks | head reads | feature dtype | crop |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {md_code(spec.model)} | {md_code(spec.revision)} | {md(spec.tap)} | {md(spec.block_selection)} "
        f"| {md(spec.head_blocks)} | {md(spec.store_dtype)} | {md(record.val_crop)} |",
        "",
        "Images are decoded as RGB and center-cropped to the backbone's input size **without resizing** (smaller "
        "images are zero-padded); `tencrop` scores the ten crops (corners, center and their flips) by the sigmoid "
        "of their mean logit. Do not resize images before scoring: resizing erases the traces the head reads.",
        "",
        "## Training data",
        "",
        f"- training split {md_code(train.get('name'))} (manifest sha256 {md_code(train.get('manifest'))}): "
        f"{record.fit.get('n_train', '?')} images used, {record.fit.get('n_train_invalid', 0)} unreadable left out",
        f"- classes: {md(setting.classes if setting else run.get('classes'))}; fraction of the split: "
        f"{md(run.get('train_fraction'))}; epochs: {md(run.get('epochs'))}",
        f"- validation split {md_code(spec.calibration.val_split if spec.calibration else data.get('val', {}).get('name'))}"
        + (f" ({spec.calibration.n_val} images): thresholds and temperature chosen there" if spec.calibration else ""),
        "",
        "## Configuration",
        "",
        "| key | value |",
        "| --- | --- |",
        *(f"| {md(key)} | {md(value)} |" for key, value in run.items()),
        f"| parameters | {sum(p.numel() for p in head.parameters())} |",
        f"| temperature | {spec.temperature:g} |",
    ]
    if spec.calibration is not None:
        lines += [
            "",
            f"## Thresholds (chosen on {md_code(spec.calibration.val_split)}; a score >= threshold is called fake)",
            "",
            "| name | rule | threshold | val acc | val real acc (1 - FPR) | val fake acc (TPR) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        rules = {
            "val": "best accuracy (the default)",
            "eer": "equal error rate",
            "fpr1": "1 % false positives",
            "fpr5": "5 % false positives",
        }
        for rule in THRESHOLD_RULES:
            point = spec.calibration.thresholds[rule]
            lines.append(
                f"| {rule} | {rules[rule]} | {point.threshold:.6g} | {percent(point.acc)} | "
                f"{percent(point.real_acc)} | {percent(point.fake_acc)} |"
            )
    lines += [
        "",
        "## Metrics (percent; thresholds from val unless named)",
        "",
        "| split | variant | dataset | n | ACC@0.5 | AP | AUC | EER | ACC | TPR@1%FPR | TPR@5%FPR | ECE | Brier |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record.rows:
        m = row.metrics or {}
        lines.append(
            f"| {md(row.split)} | {md(row.variant)} | {md(row.dataset)} | {row.n} | {percent(m['acc'])} | {percent(m['ap'])} | "
            f"{percent(m['auc'])} | {percent(m['eer'])} | {percent(m['calibrated_acc'])} | "
            f"{percent(m['val_fpr1_fake_acc'])} | {percent(m['val_fpr5_fake_acc'])} | {percent(m['ece'])} | "
            f"{m['brier']:.4f} |"
        )
    lines += [
        "",
        "On the val split itself the thresholded columns are empty (they are chosen there). TPR@x%FPR is the "
        "fraction of fakes called fake at the val threshold for x % false positives; on another test set the "
        "false-positive rate at that threshold differs (see `val_fpr1_real_acc` in metrics.csv of the run).",
        "",
        "## Intended use and limitations",
        "",
        "- For flagging images that are likely synthetic, as one signal among others (provenance, metadata, human "
        "review); a score is evidence, not proof.",
        "- It knows the generators and image sources of its training data. On other generators, other real-image "
        "sources, or images that were re-compressed, resized, cropped or filtered (as social media do), accuracy "
        "drops, sometimes to chance, and the false-positive rate at a val threshold can be far from its val value: "
        "measure it on data like yours before relying on a threshold.",
        "- Scores read as probabilities only as far as the val split resembles your data"
        + (" (temperature scaling fitted there)." if spec.calibration and spec.calibration.method != "none" else ".")
        + " The share of synthetic images in your data changes what a score means.",
        "- The center crop sees the middle of large images only; `--crop tencrop` or `auto` covers more of them.",
        "- Not for decisions about people without human review.",
        "",
    ]
    return "\n".join(lines)
