"""Where a split's images are: :class:`RowImages` reads a manifest row's bytes or pixels from its image file or from
its Parquet row, checking the bytes against the row's ``sha256`` when the manifest has one.

Stage one (the loop's pixel source) and ``pipeline audit`` read every image through it, so a Parquet row is decoded,
cropped and marked invalid exactly as a file is; an image whose bytes changed since the manifest was built is
refused (:class:`SourceChangedError`), never extracted.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from ..names import DEFAULT_MAX_PIXELS, DEFAULT_PARQUET_IMAGE_COLUMN
from .images import ImageDecodeError, check_file_readable, decoded_image, decoded_image_bytes
from .manifest import Manifest, ManifestError
from .parquet import ParquetReader, parse_parquet_path


class SourceChangedError(ManifestError):
    """An image whose bytes are not those the manifest hashed: the file was edited after ``pipeline manifest``."""


class RowImages:
    """The images of a manifest's rows, from files or Parquet rows; ``data_root`` overrides the manifest's root."""

    def __init__(self, manifest: Manifest, data_root: Path | None = None) -> None:
        self.manifest = manifest
        self.data_root = data_root
        image_column = manifest.options.get("image_column") or DEFAULT_PARQUET_IMAGE_COLUMN
        self.parquet = ParquetReader(str(image_column))

    def __len__(self) -> int:
        return len(self.manifest)

    def location(self, index: int) -> Path:
        """The file holding row ``index``'s image (its Parquet file for a Parquet row)."""
        row = self.manifest.rows[index]
        parsed = parse_parquet_path(row.path)
        if parsed is None:
            return self.manifest.resolve(index, self.data_root)
        root = self.data_root if self.data_root is not None else self.manifest.data_root
        if root is None:
            return self.manifest.resolve(index, self.data_root)  # raises, naming the missing root
        return Path(root).joinpath(*parsed[0].split("/"))

    def is_in_memory(self, index: int) -> bool:
        """Whether row ``index`` is decoded from bytes (a Parquet row, or a row with a hash to check)."""
        row = self.manifest.rows[index]
        return row.sha256 is not None or parse_parquet_path(row.path) is not None

    def read_bytes(self, index: int) -> bytes:
        """Row ``index``'s image bytes, checked against its hash; ``ImageDecodeError`` for a missing or empty image."""
        row = self.manifest.rows[index]
        path = self.location(index)
        parsed = parse_parquet_path(row.path)
        if parsed is None:
            check_file_readable(path)
            try:
                data = path.read_bytes()
            except OSError as error:
                raise ImageDecodeError(f"cannot read file ({error.strerror or error})", path) from None
        else:
            data = self.parquet.read(path, parsed[1])
            if data is None:
                raise ImageDecodeError(f"row {parsed[1]}: no image bytes", path)
        if row.sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != row.sha256:
                where = path if parsed is None else f"{path} row {parsed[1]}"
                raise SourceChangedError(
                    f"{where}: the image changed since the manifest was built (sha256 {digest[:16]}..., the manifest "
                    f"says {row.sha256[:16]}...); rebuild the manifest with `pipeline manifest` and extract it into "
                    "a new store"
                )
        return data

    def decode(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Row ``index``'s pixels, exactly as :func:`images.decode_image` makes them from the file."""
        with self.decoded(index, max_pixels) as pixels:
            return pixels

    def decoded(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> AbstractContextManager[np.ndarray]:
        """:meth:`decode`, holding the decode budget until the block ends (``images.decoded_image``)."""
        if not self.is_in_memory(index):
            return decoded_image(self.location(index), max_pixels)
        return decoded_image_bytes(self.read_bytes(index), max_pixels, self.location(index))
