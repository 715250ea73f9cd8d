"""``pipeline export --include-backbone``: the backbone's files copied into a detector folder.

The copy holds what loading the backbone reads: its safetensors weights (``.bin`` only when it has no
safetensors), ``config.json`` and ``preprocessor_config.json``, taken from the local folder or the hub cache
snapshot the detector loaded. ``config.json`` of the export records the copy's folder and content hash;
``Detector.load`` then loads the copy, checked against that hash and the head's recorded config.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .detector import Detector

BACKBONE_FOLDER = "backbone"
BACKBONE_CONFIG_FILES = ("config.json", "preprocessor_config.json")


def backbone_source_folder(detector: Detector) -> Path:
    """The folder the detector's backbone was loaded from: a local folder, or its hub cache snapshot."""
    from huggingface_hub import try_to_load_from_cache

    model = detector.backbone.config.model
    if Path(model).is_dir():
        return Path(model)
    return Path(try_to_load_from_cache(model, "config.json", revision=detector.backbone.revision)).parent


def backbone_files(folder: Path) -> list[Path]:
    """What loading the backbone reads: safetensors weights (and their index), else ``.bin``; its configs."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    indexes = sorted(folder.glob("*.index.json"))
    configs = [folder / name for name in BACKBONE_CONFIG_FILES if (folder / name).is_file()]
    return weights + indexes + configs


def copy_backbone(detector: Detector, out: Path) -> dict[str, str]:
    """Copy the backbone into ``out/backbone``; the record ``config.json`` keeps of it (folder, content hash)."""
    from ..features import local_content_hash

    folder = out / BACKBONE_FOLDER
    folder.mkdir()
    for file in backbone_files(backbone_source_folder(detector)):
        shutil.copyfile(file, folder / file.name)  # a hub snapshot's links are followed to their blobs
    return {"folder": BACKBONE_FOLDER, "revision": local_content_hash(folder)}
