"""Which backbone a head needs, where to find it, and whether a loaded one is it.

A backbone is identified as a feature store identifies it (``cache.StoreIdentity``): a hub id by the commit it
resolved to, a local folder by the content hash of its weights (``local-sha256:...``), and either by its
``config.json`` as canonical JSON. A loaded backbone is the head's when its revision and config are the
recorded ones, whatever path names it. A hub backbone is taken from the hub cache when it is there; when it is
not and the hub is offline or unreachable, loading stops at once with the ways to provide it. docs/scoring.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import PipelineError
from .hub import hub_unreachable, in_hub_cache

if TYPE_CHECKING:
    from ..features import Backbone

LOCAL_PREFIX = "local-"  # revisions of local folders: local-sha256:<hex>


class RecordedBackbone(Protocol):
    """What a head records of its backbone (``DetectorSpec``)."""

    model: str  # hub id, or the local path as given
    revision: str | None  # hub commit or local content hash; None: any revision of ``model``
    model_config: str | None  # config.json as canonical JSON; None: not recorded
    origin: str  # the head's file, for messages


class BackboneUnavailable(PipelineError, RuntimeError):
    """The backbone a head needs is neither here nor reachable; the message says how to provide it."""


def is_local_revision(revision: str | None) -> bool:
    return revision is not None and revision.startswith(LOCAL_PREFIX)


@dataclass(frozen=True)
class BackboneSource:
    """Where a head's backbone is loaded from, and the revision it must show there."""

    model: str  # a local folder or a hub id
    revision: str | None  # the hub revision to load (None: a folder, or the hub's main)
    expected_revision: str | None  # what Backbone.revision must be (None: any)
    other: bool = False  # named otherwise than the head's, and nothing recorded can show it is the same
    local_files_only: bool = False  # found in the hub cache: no request to the hub


def choose_backbone(
    spec: RecordedBackbone, model: str | None, copy: Path | None, copy_revision: str | None
) -> BackboneSource:
    """The backbone to load for ``spec``: ``model`` when given, else an export's copy, else the recorded one."""
    if model is not None and Path(model).is_dir():
        return BackboneSource(str(model), None, spec.revision, other=spec.revision is None and model != spec.model)
    if model is not None and model != spec.model:
        return BackboneSource(model, None, None, other=True)  # another hub id
    if model is None and copy is not None and copy.is_dir():  # (a removed copy: the recorded backbone instead)
        return BackboneSource(str(copy), None, copy_revision)
    if is_local_revision(spec.revision):
        if Path(spec.model).is_dir():
            return BackboneSource(spec.model, None, spec.revision)
        raise BackboneUnavailable(
            unavailable_message(
                spec,
                f"the folder {spec.model} it was trained with is not here (relative paths "
                "are read from the working directory)",
            )
        )
    return BackboneSource(spec.model, spec.revision, spec.revision)


def ensure_available(source: BackboneSource, spec: RecordedBackbone) -> BackboneSource:
    """The source as it is loaded: from the hub cache when there; fail fast when the hub cannot provide it."""
    if Path(source.model).is_dir():
        return source
    if in_hub_cache(source.model, source.revision):
        return replace(source, local_files_only=True)
    reason = hub_unreachable(source.model, source.revision)
    if reason:
        reason = f"it is not in the hub cache and {reason}"
        raise BackboneUnavailable(unavailable_message(spec, reason, model=source.model))
    return source


def unavailable_message(spec: RecordedBackbone, reason: str, model: str | None = None) -> str:
    """One message: what the head needs, why it cannot be had, and the three ways to provide it."""
    from huggingface_hub import constants

    model = model or spec.model
    revision = spec.revision or "main"
    if is_local_revision(spec.revision):
        needs = f"the local backbone {spec.model} (weights {spec.revision}, and its config.json)"
        prefill = f"run where {spec.model} is that folder"
        way_two = "--model DIR (model=DIR): DIR any copy of that folder (the same weights and config.json)"
    else:
        needs = f"the backbone {model} at revision {revision}"
        prefill = (
            f"pre-fill the hub cache: `huggingface-cli download {model} --revision {revision}` on a machine with "
            f"the hub, then copy its cache ({constants.HF_HUB_CACHE}) to the same place here"
        )
        way_two = (
            f"--model DIR (model=DIR): DIR a folder with the same content (`huggingface-cli download {model} "
            f"--revision {revision} --local-dir DIR`, which records the commit)"
            + ("; this head records no revision, so add --allow-other-backbone" if spec.revision is None else "")
        )
    return (
        f"{spec.origin}: needs {needs}; {reason}. Provide it one of three ways: "
        f"(1) {prefill}; (2) {way_two}; (3) an export made with `pipeline export RUN --out DIR --include-backbone`, "
        "which carries its backbone"
    )


def identity_differences(source: BackboneSource, spec: RecordedBackbone, backbone: Backbone) -> list[str]:
    """How a loaded backbone differs from the one the head recorded (weights or commit, then config keys)."""
    out = []
    revisions = {backbone.revision, downloaded_commit(Path(source.model))}
    if source.expected_revision is not None and source.expected_revision not in revisions:
        out.append(f"revision {backbone.revision}, the head's {source.expected_revision}")
    if spec.model_config is not None and backbone.model_config != spec.model_config:
        out += config_differences(spec.model_config, backbone.model_config)
    return out


def config_differences(recorded: str, loaded: str) -> list[str]:
    ours, theirs = json.loads(recorded), json.loads(loaded)
    return [
        f"config.json {key}: {theirs.get(key, '(absent)')!r}, the head's {ours.get(key, '(absent)')!r}"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key)
    ] or ["config.json differs from the head's"]


def downloaded_commit(folder: Path) -> str | None:
    """The hub commit of a folder written by ``huggingface-cli download --local-dir``, when its config.json and
    weights are as downloaded (huggingface_hub's own metadata and check); None otherwise."""
    if not (folder / ".cache" / "huggingface" / "download").is_dir():  # (reading it elsewhere would create it)
        return None
    try:
        from huggingface_hub._local_folder import read_download_metadata

        from ..features import weight_files

        names = ["config.json", *(path.name for path in weight_files(folder))]
        commits = {getattr(read_download_metadata(folder, name, lock=False), "commit_hash", None) for name in names}
    except (ImportError, OSError, ValueError):
        return None
    return commits.pop() if len(commits) == 1 and None not in commits and len(names) > 1 else None
