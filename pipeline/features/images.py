"""Image pixels for RINE: decode a file, then crop, augment or perturb it.

Every function here is pure and works on ``(H, W, 3)`` uint8 RGB numpy arrays
(no torch: the caller turns a batch into a normalised tensor). Randomness only
ever comes from a ``numpy.random.Generator`` passed in by the caller, so a
given ``(seed, row, view)`` always yields the same pixels (see ``view_rng``).

Conventions follow RINE_SPEC.md sections 2 and 5 and the authors' code:
no resizing on the validation/test path (torchvision ``CenterCrop`` / ``TenCrop``
with zero padding), the training recipe blur -> JPEG -> random crop -> flip,
the robustness perturbations of paper Table 5 in two presets, and the
format-align re-encoding (every image the same JPEG, :func:`format_align`).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import gaussian_filter

from ..names import DEFAULT_MAX_PIXELS, PERTURB_PRESETS, PERTURBATIONS

# Pixels that the decode threads of one process may hold decoded at once (see PixelBudget).
DECODE_PIXEL_BUDGET: int = 100_000_000
# File name endings (any case) that layouts and `pipeline predict` take for images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

JPEG_ENCODERS = ("cv2", "pil")
TRAIN_BLUR_PROBABILITY = 0.5
TRAIN_BLUR_SIGMA_RANGE = (0.0, 3.0)
TRAIN_JPEG_PROBABILITY = 0.5
TRAIN_JPEG_QUALITIES = (30, 100)
TRAIN_FLIP_PROBABILITY = 0.5

PERTURB_PROBABILITY = 0.5
PERTURB_OUTPUT_SIZE = 256
PERTURB_BLUR_KERNEL_SIZES = (3, 5, 7, 9)
PERTURB_CROP_FRACTION_RANGE = (0.05, 0.2)
PERTURB_JPEG_QUALITY_RANGE = (10, 75)  # integers, upper bound excluded
PERTURB_NOISE_SIGMA_RANGE = (5.0, 20.0)
# The official code passes cv2.BORDER_DEFAULT (== 4) where the sigma goes.
OFFICIAL_BLUR_SIGMA = 4.0
# The official code puts the drawn quality in the parameter-id slot of
# cv2.imencode, which OpenCV ignores, so its default JPEG quality 95 is used.
OFFICIAL_JPEG_QUALITY = 95

# Pillow modes holding more than 8 bits of grey per pixel (see decode_image).
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

PerturbStep = Callable[[np.ndarray, str, np.random.Generator], np.ndarray]


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
    holds at most about 7 bytes per pixel at its peak (measured: Pillow's
    4-byte RGB and the 3-byte result; 16-bit grey: 2 bytes in Pillow, 2 for
    numpy's view of them, 3 for the result), so the decode threads of a
    process hold at most about 7 x capacity bytes (700 MB) plus one image
    larger than the capacity (itself bounded by ``--max-pixels``).
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


# ---------------------------------------------------------------- decoding


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
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels}")
    path = Path(path)
    check_file_readable(path)
    try:
        with _PILLOW_LIMIT_SUSPENDED, Image.open(path) as image:
            check_pixel_count(image.size, max_pixels, path)
            with DECODE_BUDGET.hold(image.size[0] * image.size[1]):
                image.load()
                return convert_to_rgb_array(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (cannot identify format)", path) from None
    except FileNotFoundError:
        raise ImageDecodeError("missing file", path) from None
    except Exception as exc:  # any decoder failure on a bad file becomes a reason
        raise ImageDecodeError(describe_decode_failure(exc), path) from exc


def check_file_readable(path: Path) -> None:
    """Raise ``ImageDecodeError`` if ``path`` is missing, not a file, or empty."""
    try:
        if path.is_dir():
            raise ImageDecodeError("not a file (it is a directory)", path)
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError("missing file", path) from None
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
    """Pixels of a loaded Pillow image as a C-contiguous (H, W, 3) uint8 RGB array."""
    if image.mode in _WIDE_GREY_MODES:
        wide = np.asarray(image)  # uint16 (I;16*) or int32 (I): no wider copy than that
        if wide.dtype.kind == "i":
            wide = np.clip(wide, 0, 65535)
        grey = (wide >> 8).astype(np.uint8)
        del wide
        rgb = np.empty(grey.shape + (3,), dtype=np.uint8)
        rgb[...] = grey[:, :, None]
        return rgb
    # Transparency metadata does not change the RGB values but makes Pillow
    # warn for palette images whose transparency is stored as bytes.
    image.info.pop("transparency", None)
    rgb_image = image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of RGB is a full copy
    return np.ascontiguousarray(np.asarray(rgb_image, dtype=np.uint8))


# ---------------------------------------------------------------- crops


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


# ---------------------------------------------------------------- filters


def gaussian_blur_official(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur each channel with ``scipy.ndimage.gaussian_filter`` into uint8.

    Mirrors the authors' training blur, which filters every channel of the
    uint8 image in place: scipy writes each separable 1-D pass into the uint8
    output, so values are quantised after each axis exactly as scipy does for
    integer outputs. The input array is left untouched.
    """
    require_rgb_image(image)
    blurred = np.array(image, dtype=np.uint8, order="C", copy=True)
    for channel in range(blurred.shape[2]):
        gaussian_filter(blurred[:, :, channel], sigma=sigma, output=blurred[:, :, channel])
    return blurred


def jpeg_roundtrip(image: np.ndarray, quality: int, encoder: str) -> np.ndarray:
    """Encode an RGB image as JPEG in memory and decode it again.

    ``encoder="cv2"``: OpenCV on the BGR array with ``IMWRITE_JPEG_QUALITY``;
    ``encoder="pil"``: Pillow ``save(format="JPEG", quality=...)``, reopened
    as RGB. Both keep their library's default chroma subsampling.
    """
    require_rgb_image(image)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if encoder == "cv2":
        return jpeg_roundtrip_cv2(image, quality)
    if encoder == "pil":
        return jpeg_roundtrip_pil(image, quality)
    raise ValueError(f"unknown JPEG encoder {encoder!r}; expected one of {JPEG_ENCODERS}")


def jpeg_roundtrip_cv2(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through OpenCV (which expects BGR channel order)."""
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    ok, encoded = cv2.imencode(".jpg", flip_channels(image), params)
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode an image of shape {image.shape}")
    return flip_channels(cv2.imdecode(encoded, cv2.IMREAD_COLOR))


def jpeg_roundtrip_pil(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return np.ascontiguousarray(np.array(reopened.convert("RGB"), dtype=np.uint8))


def format_align_bytes(image: np.ndarray, quality: int) -> bytes:
    """The file every image becomes in the format-align variant: Pillow JPEG at ``quality``, 4:2:0, no metadata.

    Reals and fakes alike, whatever their original format, so that the file
    format (and JPEG quality) no longer tells them apart (``pipeline audit
    --perturb format-align`` audits these files).
    """
    require_rgb_image(image)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    return buffer.getvalue()


def format_align(image: np.ndarray, quality: int) -> np.ndarray:
    """The pixels of :func:`format_align_bytes` decoded again (RGB uint8)."""
    with Image.open(io.BytesIO(format_align_bytes(image, quality))) as reopened:
        return np.ascontiguousarray(np.array(reopened.convert("RGB"), dtype=np.uint8))


def flip_channels(image: np.ndarray) -> np.ndarray:
    """Reverse the channel order (RGB <-> BGR)."""
    return np.ascontiguousarray(image[:, :, ::-1])


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """Mirror an image left to right."""
    return np.ascontiguousarray(image[:, ::-1])


# ---------------------------------------------------------------- training views


@dataclass(frozen=True)
class TrainViewDraw:
    """Every random choice of one augmented training view.

    ``blur_sigma`` is None when no blur is applied; ``jpeg_quality`` and
    ``jpeg_encoder`` are None when no JPEG round trip is applied; the crop
    offsets refer to the ``pad_if_needed`` padded image.
    """

    blur_sigma: float | None
    jpeg_quality: int | None
    jpeg_encoder: str | None
    crop_top: int
    crop_left: int
    flip: bool


def view_rng(seed: int, row: int, view: int) -> np.random.Generator:
    """The generator for every random choice of image ``row``, view ``view``.

    Seeded from ``SeedSequence([seed, row, view])``, so a resumed or sharded
    run reproduces exactly the same pixels for the same triple.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, row, view]))


def draw_train_view(rng: np.random.Generator, height: int, width: int, size: int) -> TrainViewDraw:
    """Draw the official training recipe's choices for an image of this shape.

    (a) blur with p = 0.5, sigma uniform in [0, 3]; (b) JPEG with p = 0.5,
    encoder a choice of {cv2, pil} and quality a choice of {30, 100};
    (c) random crop offsets; (d) horizontal flip with p = 0.5. Blur and JPEG
    keep the shape, so the crop can be drawn before any pixel is touched.
    """
    blur_sigma = None
    if rng.random() < TRAIN_BLUR_PROBABILITY:
        blur_sigma = float(rng.uniform(*TRAIN_BLUR_SIGMA_RANGE))
    jpeg_quality = None
    jpeg_encoder = None
    if rng.random() < TRAIN_JPEG_PROBABILITY:
        jpeg_encoder = str(rng.choice(JPEG_ENCODERS))
        jpeg_quality = int(rng.choice(TRAIN_JPEG_QUALITIES))
    top, left = draw_crop_offsets(rng, height, width, size)
    flip = bool(rng.random() < TRAIN_FLIP_PROBABILITY)
    return TrainViewDraw(blur_sigma, jpeg_quality, jpeg_encoder, top, left, flip)


def apply_train_view(image: np.ndarray, size: int, draw: TrainViewDraw) -> np.ndarray:
    """Apply drawn choices in the official order: blur, JPEG, crop, flip."""
    require_rgb_image(image)
    require_positive_size(size)
    view = image
    if draw.blur_sigma is not None:
        view = gaussian_blur_official(view, draw.blur_sigma)
    if draw.jpeg_quality is not None and draw.jpeg_encoder is not None:
        view = jpeg_roundtrip(view, draw.jpeg_quality, draw.jpeg_encoder)
    view = crop_padded(view, size, draw.crop_top, draw.crop_left)
    return flip_horizontal(view) if draw.flip else view


def augment_train_view(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented ``(size, size, 3)`` uint8 training view (official recipe)."""
    require_rgb_image(image)
    draw = draw_train_view(rng, image.shape[0], image.shape[1], size)
    return apply_train_view(image, size, draw)


# ---------------------------------------------------------------- robustness


def perturb_image(image: np.ndarray, kind: str, preset: str, rng: np.random.Generator) -> np.ndarray:
    """Robustness perturbation of paper Table 5 (RINE_SPEC section 5).

    With probability 0.5 the image is perturbed and then resized to 256x256;
    otherwise the very same array is returned unchanged. The caller applies
    the usual 224 center crop afterwards in both cases.

    Kinds: ``blur`` (OpenCV ``GaussianBlur``, square kernel drawn from
    {3, 5, 7, 9}); ``crop`` (a fraction f uniform in [0.05, 0.2) is drawn and
    ``int(side * f / 2)`` pixels are removed from both ends of each side, as in
    the official code, then resized back with bicubic interpolation);
    ``jpeg``; ``noise`` (additive Gaussian, sigma uniform in [5, 20], clipped
    to 0..255 and truncated to uint8); ``combined`` (blur, crop, jpeg, noise
    in that order).

    Presets: ``official`` reproduces the official code's quirks: the blur
    sigma is always 4 (OpenCV's BORDER_DEFAULT passed as sigma), JPEG is
    OpenCV at quality 95 applied to the RGB array as if it were BGR (the
    official code hands RGB to OpenCV, and its drawn quality lands in the
    parameter-id slot, so OpenCV's default 95 applies), and the crop is resized
    back to (height=W, width=H) because the official code swaps OpenCV's
    (width, height) order (identical for square images). ``paper`` uses the
    described parameters: blur sigma 0 (derived by OpenCV from the kernel
    size), JPEG quality uniform integer in [10, 75) through OpenCV in the
    correct channel order, crop resized back to the original (H, W).

    The final 256x256 resize is Pillow bilinear (with Pillow's antialiasing
    support when shrinking), because the official pipeline does
    ``ToPILImage()`` then torchvision ``Resize((256, 256))``, which on a PIL
    image is exactly ``Image.resize((256, 256), BILINEAR)``.
    """
    require_rgb_image(image)
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    if preset not in PERTURB_PRESETS:
        raise ValueError(f"unknown perturbation preset {preset!r}; expected one of {PERTURB_PRESETS}")
    if rng.random() >= PERTURB_PROBABILITY:
        return image
    perturbed = image
    for step in perturbation_steps(kind):
        perturbed = step(perturbed, preset, rng)
    return resize_bilinear_pil(perturbed, PERTURB_OUTPUT_SIZE)


def perturbation_steps(kind: str) -> tuple[PerturbStep, ...]:
    """The step functions a perturbation kind applies, in order."""
    steps = {
        "blur": (perturb_blur,),
        "crop": (perturb_crop,),
        "jpeg": (perturb_jpeg,),
        "noise": (perturb_noise,),
        "combined": (perturb_blur, perturb_crop, perturb_jpeg, perturb_noise),
    }
    return steps[kind]


def perturb_blur(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
    """OpenCV Gaussian blur with a kernel size drawn from {3, 5, 7, 9}."""
    kernel = int(rng.choice(PERTURB_BLUR_KERNEL_SIZES))
    sigma = OFFICIAL_BLUR_SIGMA if preset == "official" else 0.0
    return cv2.GaussianBlur(image, (kernel, kernel), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def perturb_crop(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
    """Remove ``int(side * f / 2)`` pixels at both ends of each side, resize back (bicubic)."""
    fraction = float(rng.uniform(*PERTURB_CROP_FRACTION_RANGE))
    height, width = image.shape[:2]
    cut_h = int(height * fraction * 0.5)
    cut_w = int(width * fraction * 0.5)
    kept = np.ascontiguousarray(image[cut_h : height - cut_h, cut_w : width - cut_w])
    target = (height, width) if preset == "official" else (width, height)  # cv2: (w, h)
    return cv2.resize(kept, target, interpolation=cv2.INTER_CUBIC)


def perturb_jpeg(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
    """JPEG re-compression through OpenCV (see ``perturb_image`` for the presets)."""
    if preset == "official":
        return flip_channels(jpeg_roundtrip_cv2(flip_channels(image), OFFICIAL_JPEG_QUALITY))
    quality = int(rng.integers(*PERTURB_JPEG_QUALITY_RANGE))
    return jpeg_roundtrip_cv2(image, quality)


def perturb_noise(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, sigma uniform in [5, 20]; clipped, truncated to uint8."""
    sigma = float(rng.uniform(*PERTURB_NOISE_SIGMA_RANGE))
    noisy = image.astype(np.float64) + sigma * rng.standard_normal(image.shape)
    return np.clip(noisy, 0.0, 255.0).astype(np.uint8)


def resize_bilinear_pil(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with Pillow bilinear (torchvision ``Resize`` on PIL)."""
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


# ---------------------------------------------------------------- checks


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
