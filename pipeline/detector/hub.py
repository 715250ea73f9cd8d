"""The Hugging Face hub as the product uses it: what its cache holds, whether it answers, a detector repo.

Nothing here waits on a hub that is known to be offline: :func:`hub_unreachable` says why at once (offline
mode) or after one request of at most :data:`HUB_PROBE_TIMEOUT` seconds, and callers then stop with a message
instead of letting each file's download time out in turn.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PipelineError

HUB_PROBE_TIMEOUT = 5.0  # seconds one request to the hub may take before it counts as unreachable
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DETECTOR_PATTERNS = ("*.json", "*.md", "*.safetensors", "*.onnx", "backbone/*")  # what a detector repo holds


class HubError(PipelineError, RuntimeError):
    """A detector repository that the hub cache does not hold and the hub cannot provide."""


def in_hub_cache(model: str, revision: str | None) -> bool:
    """Whether the hub cache holds ``model``'s config and weights at ``revision`` (a branch name, a commit or None)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(model, name, revision=revision), str)

    try:
        return cached("config.json") and any(cached(name) for name in WEIGHT_NAMES)
    except ValueError:  # not a valid repo id
        return False


def hub_unreachable(repo_id: str, revision: str | None) -> str:
    """Why the hub cannot serve ``repo_id`` now ("" when it answers): offline mode, or one request that failed."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.is_offline_mode():
        return "the hub is offline (HF_HUB_OFFLINE is set)"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), timeout=HUB_PROBE_TIMEOUT)
    except (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
        return ""  # the hub answered about this repo (missing, gated): the download says what is wrong
    except HfHubHTTPError as error:  # an answer, but not the hub's (a proxy, a server error)
        return f"the hub at {constants.ENDPOINT} does not answer as the hub ({str(error).splitlines()[0]})"
    except Exception as error:  # noqa: BLE001 - any transport failure means the hub is out of reach
        return f"the hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__}: {error})"
    return ""


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` (the hub's repo id syntax), as opposed to a path with more parts."""
    parts = text.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return len(parts) == 2 and all(part and set(part) <= allowed and part not in (".", "..") for part in parts)


def fetch_detector_repo(repo_id: str, revision: str | None) -> Path:
    """The folder of detector repo ``repo_id`` at ``revision`` in the hub cache, downloaded there when missing."""
    from huggingface_hub import constants, snapshot_download

    named = f"{repo_id} (revision {revision or 'main'})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError)
        pass
    reason = hub_unreachable(repo_id, revision)
    if reason:
        raise HubError(
            f"{named}: no such local path, and this detector repo is not in the hub cache "
            f"({constants.HF_HUB_CACHE}) while {reason}; pre-fill the cache with `huggingface-cli download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "` on a machine with the hub (then copy the cache here), or give the detector folder's path"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DETECTOR_PATTERNS)))
    except Exception as error:  # noqa: BLE001 - the hub's errors (missing repo, gated, network) as one line
        raise HubError(f"{named}: cannot download this detector repo ({type(error).__name__}: {error})") from None
