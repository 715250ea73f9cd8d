"""The audits ``pipeline audit`` left in the report folder: its JSON documents and per-image CSVs.

``pipeline audit --split NAME`` writes ``audit_<split>.json`` (and
``audit_<split>_<variant>.json`` with ``--perturb format-align``) into
``reports/`` by default, the report's own folder. The report shows each
document (flags highlighted) and uses the per-image records of audits of the
files as they are (``variant`` null) for its error analysis.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .table import SkippedOutput

AUDIT_GLOB = "audit_*.json"
DOCUMENT_KEYS = ("split", "variant", "threshold", "flags", "feature_aucs", "summary", "n_images", "n_errors")


@dataclass(frozen=True)
class AuditDocument:
    """One ``audit_*.json`` as written by ``pipeline.features.audit.write_audit``."""

    path: Path
    split: str
    variant: str | None  # None: the files as they are
    threshold: float
    flags: tuple[Mapping[str, Any], ...]
    feature_aucs: tuple[Mapping[str, Any], ...]
    summary: tuple[Mapping[str, Any], ...]
    n_images: int
    n_errors: int

    @property
    def title(self) -> str:
        return self.split + (f" ({self.variant})" if self.variant else "")

    @property
    def images_csv(self) -> Path:
        return self.path.with_name(f"{self.path.stem}_images.csv")

    @property
    def flagged_datasets(self) -> set[str]:
        return {str(flag["dataset"]) for flag in self.flags}


def read_audits(folder: Path) -> tuple[list[AuditDocument], list[SkippedOutput]]:
    """Every audit document in ``folder`` (sorted by name); unreadable ones are reported, not raised."""
    documents, problems = [], []
    for path in sorted(folder.glob(AUDIT_GLOB)) if folder.is_dir() else []:
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            missing = [key for key in DOCUMENT_KEYS if key not in content]
            if missing:
                raise ValueError(f"missing key(s) {missing}")
            documents.append(
                AuditDocument(
                    path=path,
                    split=str(content["split"]),
                    variant=content["variant"],
                    threshold=float(content["threshold"]),
                    flags=tuple(content["flags"]),
                    feature_aucs=tuple(content["feature_aucs"]),
                    summary=tuple(content["summary"]),
                    n_images=int(content["n_images"]),
                    n_errors=int(content["n_errors"]),
                )
            )
        except (OSError, ValueError, TypeError) as error:
            problems.append(SkippedOutput(path.name, f"not an audit written by `pipeline audit` ({error})"))
    return documents, problems


@dataclass(frozen=True)
class ImageFacts:
    """A file's format and size, as far as known ('unknown' format and None sizes otherwise)."""

    format: str
    width: int | None
    height: int | None


UNKNOWN = "unknown"
UNKNOWN_FACTS = ImageFacts(UNKNOWN, None, None)


def audited_image_facts(documents: Sequence[AuditDocument]) -> dict[tuple[str, str], ImageFacts]:
    """(dataset, path) -> facts from the per-image CSVs of audits of the files as they are."""
    facts: dict[tuple[str, str], ImageFacts] = {}
    for document in documents:
        if document.variant is not None or not document.images_csv.is_file():
            continue
        with document.images_csv.open(newline="", encoding="utf-8") as handle:
            for record in csv.DictReader(handle):
                if record.get("error"):
                    continue
                facts[(record["dataset"], record["path"])] = ImageFacts(
                    record["format"] or UNKNOWN,
                    int(record["width"]) if record["width"] else None,
                    int(record["height"]) if record["height"] else None,
                )
    return facts
