"""What happens to decoded pixels besides cropping: the authors' training views, the robustness perturbations
of the paper's Table 5 (two presets) and format alignment (every image one JPEG).

Pure functions on ``(H, W, 3)`` uint8 arrays; randomness only from a ``numpy.random.Generator`` the caller
passes, so a given ``(seed, row, view)`` always yields the same pixels (``view_rng``). A new perturbation
goes here (and its name in ``names.PERTURBATIONS``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..names import PERTURB_PRESETS, PERTURBATIONS
from .images import crop_padded, draw_crop_offsets, flip_horizontal, require_positive_size, require_rgb_image

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


PerturbStep = Callable[[np.ndarray, str, np.random.Generator], np.ndarray]


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
