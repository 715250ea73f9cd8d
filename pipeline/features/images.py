"""Image pixels for RINE: decode a file (bounded memory, clear reasons for bad files) and crop it.

Every function works on ``(H, W, 3)`` uint8 RGB numpy arrays (no torch: the caller turns a batch into a
normalised tensor). The evaluation path never resizes: torchvision's ``CenterCrop`` / ``TenCrop`` with zero
padding (RINE_SPEC section 2). What else happens to pixels (training views, perturbations, format alignment)
is ``augment.py``.
"""

from __future__ import annotations

import io
import stat
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..names import DEFAULT_MAX_PIXELS

# Pixels that the decode threads of one process may hold decoded at once (see PixelBudget).
DECODE_PIXEL_BUDGET: int = 100_000_000


# File name endings (any case) that layouts and `pipeline predict` take for images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


# Pillow modes holding more than 8 bits of grey per pixel (see decode_image).
_STRIP_PIXELS = 1 << 20  # pixels converted at a time into the RGB array
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(Exception):
    """A file could not be turned into RGB pixels; ``str(e)`` is the short reason."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


class _PillowPixelLimitSuspension:
    """Switch Pillow's own decompression-bomb check off while any decode runs.

    ``decode_image`` enforces its own ``max_pixels`` from the header, so
    Pillow's global ``Image.MAX_IMAGE_PIXELS`` (which warns above ~89 M pixels
    and raises above twice that, also inside ``load()`` for some formats) must
    not interfere. The setting is process-global, so it is reference counted
    under a lock: the first decode to enter saves it and sets it to ``None``,
    the last one to leave restores it. Concurrent decodes in a thread pool can
    therefore never leave it changed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved_limit: int | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._active += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                Image.MAX_IMAGE_PIXELS = self._saved_limit


_PILLOW_LIMIT_SUSPENDED = _PillowPixelLimitSuspension()


class PixelBudget:
    """Pixels that concurrent decodes of one process may hold at once: bounds decode memory.

    A decode of a ``w x h`` image first takes ``min(w * h, capacity)`` from the
    budget (waiting while other decodes hold too much of it) and gives it back
    when its pixels have been turned into the RGB array. Pixels are never
    changed: a large image waits for room instead of being reduced. With the
    default capacity (100 M pixels) images of ordinary size never wait, while
    two 10000 x 10000 images are never decoded at the same time. A decode
    holds at most about 8 bytes per pixel (measured: Pillow's 4-byte RGB and
    the 3-byte result, converted strip by strip), and ``decoded_image`` keeps
    the budget until its caller has cut the crops, so the decode threads of a
    process hold at most about 8 x capacity bytes (800 MB); an image larger
    than the capacity takes all of it (itself bounded by ``--max-pixels``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        wanted = min(pixels, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + wanted <= self.capacity)
            self.in_use += wanted
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= wanted
                self._changed.notify_all()


DECODE_BUDGET = PixelBudget(DECODE_PIXEL_BUDGET)


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file into a C-contiguous ``(H, W, 3)`` uint8 RGB array.

    Follows the authors' loader (``PIL.Image.open(path).convert("RGB")``):
    pixels in raw stored order (EXIF orientation is *not* applied), alpha
    dropped without compositing, palette and CMYK converted by Pillow. The
    image is fully loaded, so truncated files fail here instead of yielding
    partly grey pixels (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set).

    Grey images with more than 8 bits (Pillow modes ``I;16*`` from 16-bit
    PNG/PGM/TIFF, and ``I``) are mapped to 8 bits by keeping the high byte
    (``value >> 8``; ``I`` values are first clipped to 0..65535). Pillow 13's
    ``convert("RGB")`` on these modes clips every value above 255 to 255, so
    the authors' loader turns a typical 16-bit photograph into a nearly white
    image; the high byte is also exactly what Pillow itself keeps when it opens
    16-bit *colour* PNGs, so all 16-bit inputs end up treated alike.

    The pixel count (width x height, read from the header before any pixel is
    decoded) must not exceed ``max_pixels``; Pillow's own global limit is
    suspended meanwhile (thread-safe, restored afterwards) so that it neither
    warns nor raises on images this limit accepts.

    Concurrent decodes share :data:`DECODE_BUDGET` (see :class:`PixelBudget`),
    which bounds the memory the decode threads of a process hold.

    Every problem with the file raises ``ImageDecodeError`` whose message is
    a short reason (missing file, empty file, not an image, truncated data,
    too many pixels, or the decoder's own complaint).
    """
    with decoded_image(path, max_pixels) as pixels:
        return pixels


@contextmanager
def decoded_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[np.ndarray]:
    """:func:`decode_image`, holding its share of :data:`DECODE_BUDGET` until the block ends.

    For callers that cut crops from the pixels and drop them: the budget then
    covers the decoded array for as long as it lives, not only the decode.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels}")
    path = Path(path)
    check_file_readable(path)
    with _decoded(path, max_pixels, path) as pixels:
        yield pixels


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: Path | None = None) -> np.ndarray:
    """:func:`decode_image` of an image file's bytes held in memory (an upload, a Parquet row): the same pixels, the
    same reasons; ``name`` is what an :class:`ImageDecodeError` names (the file it came from)."""
    with decoded_image_bytes(data, max_pixels, name) as pixels:
        return pixels


@contextmanager
def decoded_image_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: Path | None = None
) -> Iterator[np.ndarray]:
    """:func:`decode_image_bytes`, holding its share of :data:`DECODE_BUDGET` until the block ends."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels}")
    if len(data) == 0:
        raise ImageDecodeError("file is empty (0 bytes)", name)
    with _decoded(io.BytesIO(data), max_pixels, name) as pixels:
        yield pixels


@contextmanager
def _decoded(source: Path | BinaryIO, max_pixels: int, path: Path | None) -> Iterator[np.ndarray]:
    with ExitStack() as held:  # the budget, given back when the caller's block ends (or the decode fails)
        try:
            with _PILLOW_LIMIT_SUSPENDED, Image.open(source) as image:
                check_pixel_count(image.size, max_pixels, path)
                held.enter_context(DECODE_BUDGET.hold(image.size[0] * image.size[1]))
                image.load()
                pixels = convert_to_rgb_array(image)
        except ImageDecodeError:
            raise
        except UnidentifiedImageError:
            raise ImageDecodeError("not an image (cannot identify format)", path) from None
        except FileNotFoundError:
            raise ImageDecodeError("missing file", path) from None
        except Exception as exc:  # any decoder failure on a bad file becomes a reason
            raise ImageDecodeError(describe_decode_failure(exc), path) from exc
        yield pixels  # Pillow's copy is closed: only the RGB array is held now


def check_file_readable(path: Path) -> None:
    """Raise ``ImageDecodeError`` if ``path`` is missing, not a regular file (never opened then), or empty."""
    try:
        if path.is_dir():
            raise ImageDecodeError("not a file (it is a directory)", path)
        status = path.stat()
        size = status.st_size
        if not stat.S_ISREG(status.st_mode):  # a FIFO would block the reader, a device never end
            raise ImageDecodeError("not a regular file (a FIFO, socket or device)", path)
    except FileNotFoundError:
        raise ImageDecodeError("broken symbolic link" if path.is_symlink() else "missing file", path) from None
    except PermissionError:
        raise ImageDecodeError("permission denied", path) from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})", path) from None
    if size == 0:
        raise ImageDecodeError("file is empty (0 bytes)", path)


def check_pixel_count(size: tuple[int, int], max_pixels: int, path: Path | None = None) -> None:
    """Raise ``ImageDecodeError`` when a ``(width, height)`` exceeds ``max_pixels``."""
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"{width}x{height} = {pixels} pixels exceeds the limit of {max_pixels} (--max-pixels)",
            path,
        )


def describe_decode_failure(exc: BaseException) -> str:
    """A short human reason for an exception raised while decoding a file."""
    message = str(exc)
    if "truncated" in message.lower():
        return "truncated image data"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    return f"cannot decode image ({type(exc).__name__}: {message})"


def convert_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Pixels of a loaded Pillow image as a C-contiguous (H, W, 3) uint8 RGB array.

    Converted strip by strip (every conversion here is pixel-wise) into the
    result, so that the peak is Pillow's copy and the result, nothing more
    (``np.asarray`` of a whole image goes through ``tobytes``, two more
    copies: 10-14 bytes per pixel were measured, 4-7 now).
    """
    # Transparency metadata does not change the RGB values but makes Pillow
    # warn for palette images whose transparency is stored as bytes.
    image.info.pop("transparency", None)
    width, height = image.size
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = image if bottom - top == height else image.crop((0, top, width, bottom))  # small: no extra copy
        if image.mode in _WIDE_GREY_MODES:
            wide = np.asarray(strip)  # uint16 (I;16*) or int32 (I)
            if wide.dtype.kind == "i":
                wide = np.clip(wide, 0, 65535)
            rgb[top:bottom] = (wide >> 8).astype(np.uint8)[:, :, None]
        else:
            rgb[top:bottom] = np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"), dtype=np.uint8)
    return rgb


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` on an array, never resizing; a new array.

    A side shorter than ``size`` is first zero-padded symmetrically (the
    extra pixel of an odd deficit goes right/bottom). The offset is
    ``int(round((H - size) / 2))`` with Python's round-half-to-even, so an
    H = 259 image is cropped from row 18 (``(H - size) // 2`` would give 17).
    """
    require_rgb_image(image)
    require_positive_size(size)
    padded = pad_centered(image, size)
    height, width = padded.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return np.array(padded[top : top + size, left : left + size], order="C")


def pad_centered(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad each side shorter than ``size`` like torchvision ``CenterCrop``."""
    height, width = image.shape[:2]
    pad_h = max(size - height, 0)
    pad_w = max(size - width, 0)
    if pad_h == 0 and pad_w == 0:
        return image
    return np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``TenCrop(size)``: a ``(10, size, size, 3)`` uint8 array.

    Order: top-left, top-right, bottom-left, bottom-right, center of the image,
    then the same five of its horizontal flip (the flipped center uses the
    flipped image's own rounding, as torchvision does). Images smaller than
    ``size`` are zero-padded first exactly like ``center_crop`` (torchvision
    would raise instead).
    """
    require_rgb_image(image)
    require_positive_size(size)
    padded = pad_centered(image, size)
    flipped = padded[:, ::-1]
    return np.stack(five_crop(padded, size) + five_crop(flipped, size))


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """The four corners and the center of an image at least ``size`` on each side."""
    height, width = image.shape[:2]
    bottom, right = height - size, width - size
    corners = [(0, 0), (0, right), (bottom, 0), (bottom, right)]
    crops = [image[top : top + size, left : left + size] for top, left in corners]
    return crops + [center_crop(image, size)]


def random_crop_padding(height: int, width: int, size: int) -> tuple[int, int]:
    """Zeros added on each end of (height, width) by ``pad_if_needed``."""
    return max(size - height, 0), max(size - width, 0)


def draw_crop_offsets(rng: np.random.Generator, height: int, width: int, size: int) -> tuple[int, int]:
    """Uniform (top, left) of a random crop in the ``pad_if_needed`` padded image."""
    pad_h, pad_w = random_crop_padding(height, width, size)
    top = int(rng.integers(0, height + 2 * pad_h - size + 1))
    left = int(rng.integers(0, width + 2 * pad_w - size + 1))
    return top, left


def crop_padded(image: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    """The ``size`` square at (top, left) of the ``pad_if_needed`` padded image."""
    pad_h, pad_w = random_crop_padding(image.shape[0], image.shape[1], size)
    padded = np.pad(image, ((pad_h, pad_h), (pad_w, pad_w), (0, 0))) if pad_h or pad_w else image
    return np.array(padded[top : top + size, left : left + size], order="C")


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """Mirror an image left to right."""
    return np.ascontiguousarray(image[:, ::-1])


def require_rgb_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is an (H, W, 3) uint8 array with H, W >= 1."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 numpy array, got {type(image).__name__} of dtype {getattr(image, 'dtype', None)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")


def require_positive_size(size: int) -> None:
    """Raise ``ValueError`` unless ``size`` is a positive integer."""
    if int(size) != size or size < 1:
        raise ValueError(f"crop size must be a positive integer, got {size}")
