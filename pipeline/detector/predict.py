"""``pipeline predict``: score many image files with a detector, streaming rows into a resumable output.

:func:`collect_inputs` lists the images (files, folders, CSV manifests, path lists), each once. They go through
stage one's loop (threaded decoding, the evaluation's crops) with the detector's forward step, and a committer
that scores each batch, reads the headers and appends the rows (``output.py``). Batches are planned over the
whole input list, so a resumed run puts every image through the backbone in the same batch as an uninterrupted
one. Inputs and outputs: docs/scoring.md.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

from ..features import (
    IMAGE_EXTENSIONS,
    BatchWork,
    FinishedShard,
    ImageSource,
    PixelRecipe,
    StageTimes,
    extract_shards,
    read_image_header,
    read_sidecar,
    sidecar_path,
)
from ..names import CENTER, CROPS, DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, REENCODINGS, TEN_CROP, UNSURE
from .detector import Detector, PredictError, PredictOptionError, variants_of
from .output import PredictionRow, PredictionWriter, open_prediction_writer, output_columns, printable
from .robust import RobustRecipe, robust_scores

LIST_SUFFIXES = (".txt", ".lst")
FAILURE_EXAMPLES = 10


class NoImagesFound(PredictError):
    """The inputs name no image at all (the CLI exits 3)."""


@dataclass(frozen=True)
class PredictConfig:
    """Everything ``pipeline predict`` needs, resolved from the command line."""

    head: Path | str  # run folder, exported detector folder, head.safetensors, the authors' .pth, or a hub repo id
    inputs: tuple[Path, ...]
    out: Path | None = None  # .csv, .jsonl or .parquet; None: CSV to the given stream
    crop: str = CENTER  # one of names.CROPS
    auto_min_side: int | None = None  # --crop auto: ten crops from this shorter side on (None: twice the crop)
    threshold: str | None = None  # a rule name or a number; None: the head's default (val, or 0.5)
    model: str | None = None  # a folder with the head's backbone content, or another backbone (refused unless allowed)
    revision: str | None = None  # of a hub repo id given as head
    allow_other_backbone: bool = False
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 32
    decode_workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    robust: bool = False  # also score re-encoded copies: score_min, score_max, verdict (robust.py)

    def validate(self) -> None:
        if self.crop not in CROPS:
            raise PredictError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if min(self.batch_size, self.decode_workers, self.max_pixels) < 1:
            raise PredictError("batch size, decode workers and max pixels must be at least 1")
        if self.auto_min_side is not None and self.auto_min_side < 1:
            raise PredictError(f"auto_min_side must be at least 1, got {self.auto_min_side}")
        if self.out is not None and self.out.suffix.lower() not in OUTPUT_FORMATS:
            raise PredictOptionError(f"{self.out}: the name must end with one of {', '.join(OUTPUT_FORMATS)}")


@dataclass(frozen=True)
class PredictSummary:
    out: Path | None
    n_images: int
    n_resumed: int  # rows already in the output when the run started
    n_scored: int  # rows this run wrote
    failures: tuple[tuple[str, str], ...]  # (path, error) of every row of the output without a score
    seconds: float
    times: StageTimes  # of the scoring loop: decoding (overlapped), backbone, head and writing
    n_unsure: int | None = None  # --robust: rows of the output whose verdict is unsure; None without --robust

    def report(self) -> str:
        rate = self.n_scored / self.seconds if self.seconds > 0 else 0.0
        resumed = f"; {self.n_resumed} were already in {self.out}" if self.n_resumed else ""
        t = self.times
        lines = [
            f"{self.n_images} images: {self.n_scored} written in {self.seconds:.1f} s ({rate:.1f} img/s){resumed}",
            f"time: decoding {t.decode:.1f} s (in {t.wait_for_pixels:.1f} s of waiting), backbone {t.backbone:.1f} s, "
            f"head, headers and writing {t.write:.1f} s",
        ]
        if self.n_unsure is not None:
            lines.append(
                f"robust verdicts: {self.n_unsure} unsure of {self.n_images - len(self.failures)} scored "
                f"(re-encoded as {', '.join(REENCODINGS)}, the scores straddle the threshold)"
            )
        if self.failures:
            lines.append(f"{len(self.failures)} images could not be scored (rows with an error):")
            for reason, count in Counter(reason for _, reason in self.failures).most_common():
                lines.append(f"  {count:>6} x {reason}")
            lines += [f"  e.g. {path}: {reason}" for path, reason in self.failures[:FAILURE_EXAMPLES]]
        return "\n".join(lines)


# ---------------------------------------------------------------- inputs


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Every image path the inputs name, in order, each once (see the module doc)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # every image-named entry, files or not: a link loop, a FIFO or a folder named x.jpg gets a row saying so
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif item.suffix.lower() == ".csv":
            found.extend(read_path_csv(item))
        elif item.suffix.lower() in LIST_SUFFIXES:
            found.extend(read_path_list(item))
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def read_path_csv(path: Path) -> list[Path]:
    """The ``path`` column of a CSV, resolved against its sidecar's data root or its folder."""
    data_root = read_sidecar(sidecar_path(path))[0]
    root = data_root or path.parent
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise PredictError(f"{path}: a CSV of images needs a 'path' column (found {reader.fieldnames})")
        return [root / row["path"] for row in reader if row["path"]]


def read_path_list(path: Path) -> list[Path]:
    """One path per line; blank lines and ``#`` comments skipped; relative to the list's folder."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    return [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# ---------------------------------------------------------------- planning


def ten_crop_rows(paths: Sequence[Path], rows: np.ndarray, detector: Detector, config: PredictConfig) -> np.ndarray:
    """For ``--crop auto``: which of ``rows`` get ten crops, from their headers (unreadable: center)."""

    def wants_ten(row: int) -> bool:
        header = read_image_header(paths[row])
        if header.error:
            return False
        return detector.crop_of("auto", header.height, header.width, config.auto_min_side) == TEN_CROP

    with ThreadPoolExecutor(max(4, config.decode_workers)) as pool:
        chosen = list(
            tqdm(
                pool.map(wants_ten, rows.tolist(), chunksize=64),
                total=len(rows),
                unit="img",
                desc="predict: image sizes",
                disable=not config.progress,
                leave=False,
            )
        )
    return np.array(chosen, dtype=bool)


def open_batch_rows(done: np.ndarray, batch_size: int) -> np.ndarray:
    """The rows of every batch that still has an image to score (its done images included)."""
    starts = [start for start in range(0, len(done), batch_size) if not done[start : start + batch_size].all()]
    return np.array([row for start in starts for row in range(start, min(start + batch_size, len(done)))], dtype=int)


def plan_work(
    n_images: int, batch_size: int, done: np.ndarray, ten_crop: np.ndarray, crop_size: int, robust: bool = False
) -> list[BatchWork]:
    """One work item per batch with rows not yet done (with mixed crops: its center and ten-crop halves);
    ``robust``: each item's recipe also makes the re-encoded copies (``RobustRecipe``)."""
    recipes = {crop: PixelRecipe(variants_of(crop), crop_size) for crop in (CENTER, TEN_CROP)}
    if robust:
        recipes = {crop: RobustRecipe(recipe) for crop, recipe in recipes.items()}
    work = []
    for start in range(0, n_images, batch_size):
        rows = np.arange(start, min(start + batch_size, n_images))
        if done[rows].all():
            continue
        for crop, members in ((CENTER, rows[~ten_crop[rows]]), (TEN_CROP, rows[ten_crop[rows]])):
            if len(members):
                work.append(BatchWork(len(work), members, recipes[crop], closes_shard=True))
    return work


# ---------------------------------------------------------------- scoring


class PredictionCommitter:
    """The committer of ``pipeline predict``: scores each finished work item and appends its batch's rows.

    A batch planned as two work items (its center and ten-crop images) is
    written once both are scored, its rows in input order.
    """

    def __init__(
        self,
        detector: Detector,
        paths: Sequence[Path],
        work: Sequence[BatchWork],
        writer: PredictionWriter,
        done: set[str],
        batch_size: int,
    ) -> None:
        self.detector = detector
        self.paths = paths
        self.work = {item.shard: item for item in work}
        self.parts = Counter(int(item.rows[0]) // batch_size for item in work)  # input batch -> its work items
        self.batch_size = batch_size
        self.writer = writer
        self.done = done
        self.backbone = detector.backbone_label()
        self.pending: dict[int, list[tuple[int, PredictionRow]]] = {}
        self.seconds = 0.0
        self.written = 0
        self.failures: list[tuple[str, str]] = []
        self.unsure = 0

    def submit(self, finished: FinishedShard) -> None:
        start = time.perf_counter()
        item = self.work.pop(finished.shard)
        robust = isinstance(item.recipe, RobustRecipe)
        groups = item.recipe.groups() if robust else [item.recipe.names]
        tap = self.detector.spec.input_name  # the tap's tokens, or the embedding
        scores = np.stack(
            [
                self.detector.scores(
                    torch.stack([self.detector.logits(finished.features[(tap, name)]) for name in names], dim=1)
                )
                for names in groups
            ],
            axis=1,
        )
        verdicts = robust_scores(scores, self.detector.threshold) if robust else None
        crop = TEN_CROP if len(groups[0]) > 1 else CENTER
        batch = int(item.rows[0]) // self.batch_size
        rows = self.pending.setdefault(batch, [])
        for i, row in enumerate(item.rows.tolist()):
            if printable(str(self.paths[row])) not in self.done:
                score = float(scores[i, 0]) if finished.valid[i] else None
                prediction = self.prediction_row(row, score, crop, finished.errors[i])
                if verdicts is not None and score is not None:
                    prediction = replace(
                        prediction,
                        score_min=float(verdicts.score_min[i]),
                        score_max=float(verdicts.score_max[i]),
                        verdict=verdicts.verdict[i],
                    )
                rows.append((row, prediction))
        self.parts[batch] -= 1
        if not self.parts[batch]:
            ordered = [prediction for _, prediction in sorted(self.pending.pop(batch), key=lambda pair: pair[0])]
            self.writer.write(ordered)
            self.written += len(ordered)
            self.failures += [(p.path, p.error) for p in ordered if p.score is None]
            self.unsure += sum(p.verdict == UNSURE for p in ordered)
        self.seconds += time.perf_counter() - start

    def prediction_row(self, row: int, score: float | None, crop: str, error: str) -> PredictionRow:
        header = read_image_header(self.paths[row])
        label = "" if score is None else ("fake" if score >= self.detector.threshold else "real")
        return PredictionRow(
            str(self.paths[row]),
            score,
            label,
            self.detector.threshold,
            self.detector.threshold_name,
            crop,
            header.width,
            header.height,
            header.format or "",
            self.backbone,
            error,
        )

    def close(self) -> None:
        """Each batch is written once its work items are scored: nothing is left in flight."""


def check_resumable(rows: Sequence[PredictionRow], detector: Detector, crop: str, out: Path | None) -> None:
    """Refuse to append to an output made with another threshold, backbone or crop mode."""
    allowed_crops = {CENTER, TEN_CROP} if crop == "auto" else {crop}
    wanted = (detector.threshold, detector.threshold_name, detector.backbone_label())
    for row in rows:
        made = (row.threshold, row.threshold_name, row.backbone)
        if made != wanted or row.crop not in allowed_crops:
            raise PredictError(
                f"{out}: holds rows made with threshold {row.threshold!r} ({row.threshold_name}), crop {row.crop}, "
                f"backbone {row.backbone}; this run uses threshold {wanted[0]!r} ({wanted[1]}), crop {crop}, "
                f"backbone {wanted[2]}. Write to another --out (or delete it) instead of mixing them."
            )


def run_predict(
    config: PredictConfig, stream: TextIO | None = None, log: Callable[[str], object] = lambda line: None
) -> PredictSummary:
    """Score every input image into ``config.out`` (or CSV on ``stream``), resuming what the output holds."""
    config.validate()
    start = time.perf_counter()
    paths = collect_inputs(config.inputs)
    if not paths:
        raise NoImagesFound(
            f"no image found in {', '.join(map(str, config.inputs))} (folders are searched recursively for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; lists and CSVs name files): nothing to score"
        )
    detector = Detector.load(
        config.head,
        model=config.model,
        revision=config.revision,
        allow_other_backbone=config.allow_other_backbone,
        device=config.device,
        dtype=config.dtype,
        threshold=config.threshold,
    )
    log(detector.describe())
    writer = open_prediction_writer(config.out, stream, output_columns(config.robust))
    try:
        existing = list(writer.existing_rows())
        check_resumable(existing, detector, config.crop, config.out)
        done = {printable(row.path) for row in existing}  # Parquet holds undecodable names escaped
        is_done = np.array([printable(str(path)) in done for path in paths], dtype=bool)
        ten_crop = np.full(len(paths), config.crop == TEN_CROP)
        if config.crop == "auto":  # every image of a batch to compute, so that its halves are those of a full run
            rows = open_batch_rows(is_done, config.batch_size)
            ten_crop[rows] = ten_crop_rows(paths, rows, detector, config)
        work = plan_work(len(paths), config.batch_size, is_done, ten_crop, detector.backbone.crop_size, config.robust)
        committer = PredictionCommitter(detector, paths, work, writer, done, config.batch_size)
        source = ImageSource(lambda row: paths[row], config.max_pixels, config.decode_workers)
        total = sum(len(item.rows) for item in work)
        with tqdm(total=total, unit="img", desc="predict", disable=not config.progress, smoothing=0.05) as bar:
            times = extract_shards(work, source, detector.forward_step(), committer, progress=bar.update)
    finally:
        writer.close()
    earlier = [(row.path, row.error) for row in existing if row.score is None]
    unsure = sum(row.verdict == UNSURE for row in existing) + committer.unsure
    return PredictSummary(
        out=config.out,
        n_images=len(paths),
        n_resumed=len(existing),
        n_scored=committer.written,
        failures=tuple(earlier + committer.failures),
        seconds=time.perf_counter() - start,
        times=times,
        n_unsure=unsure if config.robust else None,
    )
