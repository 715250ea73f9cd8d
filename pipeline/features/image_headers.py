"""What an image file says about itself, read from its header without decoding pixels.

:func:`read_image_header` parses format, size, mode, metadata and, for JPEG, the quantisation tables, from which
:func:`estimate_jpeg_quality` finds the nearest IJG quality (an estimate for encoders with their own tables). It
describes files; it does not validate them (``pipeline extract`` does). :func:`read_format_aligned_header`
describes the file an image becomes in the format-align variant.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..names import DEFAULT_MAX_PIXELS
from .augment import format_align_bytes
from .images import _PILLOW_LIMIT_SUSPENDED, ImageDecodeError, check_file_readable, decode_image, decode_image_bytes

# ITU T.81 Annex K tables K.1 (luminance) and K.2 (chrominance), natural
# (row-major) order, as Pillow's ``image.quantization`` gives them.
STANDARD_LUMINANCE_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
STANDARD_CHROMINANCE_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)  # fmt: skip
JPEG_QUALITIES = np.arange(1, 101)
# TIFF tag of the EXIF IFD pointer: a TIFF "has EXIF" when it points to one.
TIFF_EXIF_IFD_TAG = 34665


@dataclass(frozen=True)
class ImageHeader:
    """The header facts of one file; ``error`` is empty when it could be read.

    ``jpeg_quality`` is the estimated IJG quality (1..100) of a JPEG (Pillow
    formats JPEG and MPO, the latter a JPEG with a multi-picture segment, as
    many cameras write), None for other formats. On an error row only
    ``file_size`` may be known (None when the file could not be stat'ed).
    """

    format: str | None = None  # Pillow's name for the content: JPEG, PNG, WEBP, ... (not the extension)
    width: int | None = None
    height: int | None = None
    mode: str | None = None  # Pillow mode: RGB, L, RGBA, P, CMYK, I;16, ...
    has_exif: bool | None = None
    file_size: int | None = None  # bytes
    jpeg_quality: int | None = None
    error: str = ""


def read_image_header(path: Path) -> ImageHeader:
    """The header of ``path``; every problem with the file becomes ``ImageHeader(error=...)``."""
    path = Path(path)
    try:
        check_file_readable(path)
    except ImageDecodeError as error:
        return ImageHeader(file_size=file_size_or_none(path), error=error.reason)
    return describe_file(path, file_size_or_none(path))


def read_format_aligned_header(path: Path, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of the file ``path`` becomes in the format-align variant (``augment.format_align_bytes``).

    Unlike :func:`read_image_header` this decodes the pixels (they are
    re-encoded): a file that cannot be decoded becomes an error header.
    """
    path = Path(path)
    try:
        encoded = format_align_bytes(decode_image(path, max_pixels), quality)
    except ImageDecodeError as error:
        return ImageHeader(file_size=file_size_or_none(path), error=error.reason)
    return describe_file(io.BytesIO(encoded), len(encoded))


def read_bytes_header(
    data: bytes, align_quality: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageHeader:
    """:func:`read_image_header` (or, with ``align_quality``, :func:`read_format_aligned_header`) of a file's bytes."""
    if align_quality is None:
        if not data:
            return ImageHeader(file_size=0, error="file is empty (0 bytes)")
        return describe_file(io.BytesIO(data), len(data))
    try:
        encoded = format_align_bytes(decode_image_bytes(data, max_pixels), align_quality)
    except ImageDecodeError as error:
        return ImageHeader(file_size=len(data), error=error.reason)
    return describe_file(io.BytesIO(encoded), len(encoded))


def describe_file(source: Path | BinaryIO, file_size: int | None) -> ImageHeader:
    """Open ``source`` with Pillow (header only) and describe it; a parser failure becomes the error."""
    try:
        # Pillow's decompression-bomb limit applies at open(); a header
        # audit decodes nothing, so no size is refused.
        with _PILLOW_LIMIT_SUSPENDED, Image.open(source) as image:
            quantization = getattr(image, "quantization", None)  # JPEG and MPO (camera JPEGs)
            return ImageHeader(
                format=image.format,
                width=image.width,
                height=image.height,
                mode=image.mode,
                has_exif=has_exif(image),
                file_size=file_size,
                jpeg_quality=estimate_jpeg_quality(quantization) if quantization else None,
            )
    except UnidentifiedImageError:
        return ImageHeader(file_size=file_size, error="not an image (cannot identify format)")
    except Exception as error:  # any parser failure on a bad file becomes its reason
        return ImageHeader(file_size=file_size, error=f"cannot read header ({type(error).__name__}: {error})")


def file_size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def has_exif(image: Image.Image) -> bool:
    """Whether the file carries an EXIF block (JPEG APP1, PNG eXIf, WebP EXIF, TIFF EXIF IFD)."""
    if image.info.get("exif"):
        return True
    tags = getattr(image, "tag_v2", None)  # TIFF: the EXIF IFD is a tag of the main IFD
    return tags is not None and TIFF_EXIF_IFD_TAG in tags


def ijg_quantization_table(base_table: Sequence[int], quality: int) -> np.ndarray:
    """libjpeg's ``jpeg_quality_scaling`` of ``base_table`` (baseline: values 1..255)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = (np.asarray(base_table, dtype=np.int64) * scale + 50) // 100
    return np.clip(table, 1, 255)


def _ijg_tables(base_table: Sequence[int]) -> np.ndarray:
    """(100, 64): the table of every quality 1..100, row q-1."""
    return np.stack([ijg_quantization_table(base_table, int(q)) for q in JPEG_QUALITIES])


_IJG_TABLES = (_ijg_tables(STANDARD_LUMINANCE_TABLE), _ijg_tables(STANDARD_CHROMINANCE_TABLE))


def estimate_jpeg_quality(quantization: Mapping[int, Sequence[int]]) -> int:
    """The IJG quality whose luminance (and chrominance) tables are nearest to the file's.

    ``quantization`` is Pillow's ``image.quantization``: table id -> 64 values
    in natural order. Tables 0 and 1 are compared to the scaled standard
    luminance and chrominance tables by mean absolute difference; for a file
    written by an IJG-scaling encoder the result is its quality exactly.
    Ties go to the higher quality.
    """
    distance = np.zeros(len(JPEG_QUALITIES))
    compared = 0
    for table_id, candidates in enumerate(_IJG_TABLES):
        table = quantization.get(table_id)
        if table is None:
            continue
        values = np.asarray(table, dtype=np.int64)
        if values.shape != (64,):
            raise ValueError(f"a JPEG quantisation table has 64 values, got {values.shape}")
        distance += np.abs(candidates - values).mean(axis=1)
        compared += 1
    if not compared:
        raise ValueError("no quantisation table with id 0 or 1")
    best = np.flatnonzero(distance == distance.min())[-1]
    return int(JPEG_QUALITIES[best])
