"""A small built-in data set and a tiny random CLIP, so that the whole pipeline runs offline.

Nothing here measures detection quality: the backbone has random weights and the images are synthetic. A real
image is a procedural scene; its fake is the same scene through a generator-like trace
(:data:`GENERATOR_TRACES`: nearest, checkerboard, bilinear, smooth), and the ``guided`` test set's reals are
JPEG while its fakes are PNG, a deliberate format shortcut for ``pipeline audit`` to flag. Every image is drawn
from a generator seeded by (seed, part, generator, index). The demo: README and ``./run_all.sh demo``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import PipelineError
from .files import atomic_path
from .names import RANDOM_WEIGHTS_MARKER

IMAGE_SIZE = 64
TRAIN_GENERATOR = "progan"
# Test "generator" -> trace its fakes carry.
GENERATOR_TRACES = {
    "progan": "nearest",
    "stylegan": "bilinear",
    "guided": "smooth",
    "dalle": "checkerboard",
}
PARTS = ("train", "val", "test")
JPEG_REALS = {"test": ("guided",)}  # part -> generators whose reals are saved as JPEG: the demo's format shortcut
JPEG_REAL_QUALITY = 95
COMPLETE_MARKER = ".demo-complete.json"
BUILDING_MARKER = ".demo-building.json"
DEMO_BACKBONE = dict(
    image_size=IMAGE_SIZE,
    patch_size=8,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    initializer_factor=3.0,
)
# Taps a stride-2, 3x3 transposed convolution puts on the pixel phases
# (even/odd row x even/odd column); the fake's gain follows them.
TRANSPOSED_CONV_TAPS = np.array([[1.0, 2.0], [2.0, 4.0]])
CHECKERBOARD_STRENGTH = 0.08
GENERATOR_NOISE = 0.004
BLOCK_SIZE = 2  # up-sampling factor of the half-resolution traces


# ---------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A natural-looking (size, size, 3) float image in [0, 1]."""
    image = colour_field(rng, size)
    image += lighting_gradient(rng, size)
    for _ in range(int(rng.integers(1, 5))):
        mask = shape_mask(rng, size)
        texture = 1.0 + 0.1 * random_fields(rng, size, 1)[0]
        colour = rng.uniform(0.0, 1.0, 3) * texture[..., None]
        image = image * (1.0 - mask[..., None]) + colour * mask[..., None]
    return np.clip(image, 0.0, 1.0)


def random_fields(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """(count, size, size) zero-mean, unit-variance fields with a 1/f^alpha spectrum."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    alpha = rng.uniform(1.6, 2.4)
    shape = (count, size, size // 2 + 1)
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / radius**alpha
    spectrum[:, 0, 0] = 0.0
    fields = np.fft.irfft2(spectrum, s=(size, size))
    return fields / fields.std(axis=(1, 2), keepdims=True)


def colour_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two random fields mixed into RGB around a random base colour."""
    mix = rng.normal(0.0, 0.12, (2, 3))
    base = rng.uniform(0.25, 0.75, 3)
    return base + np.einsum("khw,kc->hwc", random_fields(rng, size, 2), mix)


def lighting_gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear ramp in a random direction, tinted per channel."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = x * np.cos(angle) + y * np.sin(angle)
    return rng.uniform(0.0, 0.3) * ramp[..., None] * rng.uniform(0.5, 1.0, 3)


def shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Coverage in [0, 1] of an ellipse or a rectangle, anti-aliased over one pixel."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(3.0, size / 3, 2)
    if rng.random() < 0.5:
        # signed distance to the ellipse, approximated in pixels
        distance = (np.hypot((y - cy) / ry, (x - cx) / rx) - 1.0) * min(ry, rx)
    else:
        distance = np.maximum(np.abs(y - cy) - ry, np.abs(x - cx) - rx)
    return np.clip(0.5 - distance, 0.0, 1.0)


# ---------------------------------------------------------------- traces


def downsample_half(image: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block: the scene rendered at half resolution."""
    h, w, c = image.shape
    return image.reshape(h // BLOCK_SIZE, BLOCK_SIZE, w // BLOCK_SIZE, BLOCK_SIZE, c).mean(axis=(1, 3))


def upsample_nearest(image: np.ndarray) -> np.ndarray:
    return image.repeat(BLOCK_SIZE, axis=0).repeat(BLOCK_SIZE, axis=1)


def upsample_bilinear(image: np.ndarray) -> np.ndarray:
    """2x bilinear up-sampling with half-pixel centres and replicated borders."""
    for axis in (0, 1):
        before = np.concatenate([image.take([0], axis), image.take(np.arange(image.shape[axis] - 1), axis)], axis)
        after = np.concatenate([image.take(np.arange(1, image.shape[axis]), axis), image.take([-1], axis)], axis)
        even = 0.75 * image + 0.25 * before
        odd = 0.75 * image + 0.25 * after
        image = np.stack([even, odd], axis=axis + 1).reshape(
            *image.shape[:axis], 2 * image.shape[axis], *image.shape[axis + 1 :]
        )
    return image


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W[, C]) image, borders reflected."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="reflect")
        image = sum(w * padded.take(np.arange(i, i + image.shape[axis]), axis) for i, w in enumerate(taps))
    return image


def checkerboard_gain(size: int) -> np.ndarray:
    """(size, size) gain of uneven transposed-convolution overlap, mean 1."""
    relative = TRANSPOSED_CONV_TAPS / TRANSPOSED_CONV_TAPS.mean() - 1.0
    return np.tile(1.0 + CHECKERBOARD_STRENGTH * relative, (size // 2, size // 2))


def trace_nearest(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return upsample_nearest(downsample_half(scene)) + rng.normal(0.0, GENERATOR_NOISE, scene.shape)


def trace_bilinear(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return upsample_bilinear(downsample_half(scene)) + rng.normal(0.0, GENERATOR_NOISE, scene.shape)


def trace_checkerboard(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    up = upsample_bilinear(downsample_half(scene)) * checkerboard_gain(scene.shape[0])[..., None]
    return up + rng.normal(0.0, GENERATOR_NOISE, scene.shape)


def trace_smooth(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = gaussian_blur(rng.normal(0.0, 0.02, scene.shape), 1.0)
    return gaussian_blur(scene, 0.8) + noise


TRACES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "nearest": trace_nearest,
    "bilinear": trace_bilinear,
    "checkerboard": trace_checkerboard,
    "smooth": trace_smooth,
}


def add_sensor_noise(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return scene + rng.normal(0.0, rng.uniform(0.008, 0.02), scene.shape)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def make_pair(seed: int, part: str, generator: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(real, fake) uint8 images of one index: one scene, two renderings."""
    key = [seed, PARTS.index(part), list(GENERATOR_TRACES).index(generator), index]
    scene = render_scene(np.random.default_rng(key + [0]))
    real = add_sensor_noise(scene, np.random.default_rng(key + [1]))
    fake = TRACES[GENERATOR_TRACES[generator]](scene, np.random.default_rng(key + [2]))
    return to_uint8(real), to_uint8(fake)


# ---------------------------------------------------------------- data set


def demo_parameters(n_train: int, n_test: int, seed: int) -> dict[str, object]:
    return {
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "jpeg_reals": {part: list(generators) for part, generators in JPEG_REALS.items()},
        "jpeg_real_quality": JPEG_REAL_QUALITY,
    }


def is_demo_complete(root: Path, n_train: int, n_test: int, seed: int) -> bool:
    """True when ``root`` holds a finished build with these parameters."""
    marker = Path(root) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == demo_parameters(n_train, n_test, seed)


def make_demo_data(root: Path, n_train: int, n_test: int, seed: int, progress: bool = True) -> None:
    """Write the demo data set under ``root`` (see the module docstring); marker last.

    ``root`` must be absent, empty, or a previous demo build (which is
    replaced); any other non-empty folder is refused, so user data is never
    overwritten.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be at least 1, got {n_train} and {n_test}")
    root = Path(root)
    clear_previous_build(root)
    root.mkdir(parents=True, exist_ok=True)
    parameters = json.dumps(demo_parameters(n_train, n_test, seed), sort_keys=True)
    (root / BUILDING_MARKER).write_text(parameters)
    parts = (
        ("train", (TRAIN_GENERATOR,), n_train),
        ("val", (TRAIN_GENERATOR,), n_test),
        ("test", tuple(GENERATOR_TRACES), n_test),
    )
    total = sum(2 * count * len(generators) for _, generators, count in parts)
    with tqdm(total=total, desc="demo images", unit="img", disable=not progress) as bar:
        for part, generators, count in parts:
            for generator in generators:
                write_pairs(root / part / generator, seed, part, generator, count, lambda: bar.update(2))
    (root / COMPLETE_MARKER).write_text(parameters)
    (root / BUILDING_MARKER).unlink()


def clear_previous_build(root: Path) -> None:
    if not root.exists() or not any(root.iterdir()):
        return
    if not ((root / COMPLETE_MARKER).is_file() or (root / BUILDING_MARKER).is_file()):
        raise FileExistsError(
            f"{root}: not empty and not a demo build (no {COMPLETE_MARKER} or {BUILDING_MARKER}); "
            f"choose an empty or new folder"
        )
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    for part in PARTS:
        shutil.rmtree(root / part, ignore_errors=True)


def write_pairs(
    folder: Path, seed: int, part: str, generator: str, count: int, on_pair: Callable[[], object] = lambda: None
) -> None:
    (folder / "0_real").mkdir(parents=True, exist_ok=True)
    (folder / "1_fake").mkdir(parents=True, exist_ok=True)
    jpeg_reals = generator in JPEG_REALS.get(part, ())
    for index in range(count):
        real, fake = make_pair(seed, part, generator, index)
        if jpeg_reals:
            Image.fromarray(real).save(folder / "0_real" / f"{index:05d}.jpg", quality=JPEG_REAL_QUALITY)
        else:
            Image.fromarray(real).save(folder / "0_real" / f"{index:05d}.png")
        Image.fromarray(fake).save(folder / "1_fake" / f"{index:05d}.png")
        on_pair()


# ---------------------------------------------------------------- backbone


def make_demo_backbone(path: Path, seed: int) -> None:
    """Save a tiny random-weight CLIPVisionModel (64 px, patch 8, 4 blocks) to ``path``.

    Random weights, with one change: every patch-embedding kernel is made
    zero-mean (a random high-pass filter bank), so the CLS tokens follow image
    texture more than mean colour and the demo's up-sampling traces reach the
    head. Loaded by path exactly like a hub id; no preprocessor config, so
    CLIP's normalisation applies. Written to a temporary folder, then renamed.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(CLIPVisionConfig(**DEMO_BACKBONE)).eval()
    kernels = model.get_input_embeddings().weight  # (hidden, 3, patch, patch)
    with torch.no_grad():
        kernels -= kernels.mean(dim=(2, 3), keepdim=True)
    from transformers.utils import logging as hf_logging

    shutil.rmtree(path, ignore_errors=True)  # an incomplete earlier build
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for one tiny local file
    try:
        with atomic_path(path) as partial:
            model.save_pretrained(partial)
            (partial / RANDOM_WEIGHTS_MARKER).write_text("random weights: the demo's backbone (pipeline demo)\n")
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def is_backbone_complete(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()


# ---------------------------------------------------------------- building both


class DemoError(PipelineError):
    """The demo cannot be built where asked (e.g. a non-empty folder that is not a demo build)."""


@dataclass(frozen=True)
class DemoConfig:
    """Where `pipeline demo` builds the data set and the backbone, and their sizes."""

    root: Path
    backbone: Path
    n_train: int = 1000  # training images per label
    n_test: int = 100  # validation and test images per label and generator
    seed: int = 0


@dataclass(frozen=True)
class DemoSummary:
    config: DemoConfig
    data_built: bool  # False: a finished build with the same parameters was kept
    backbone_built: bool

    def report(self) -> str:
        c = self.config
        n_images = 2 * (c.n_train + c.n_test * (1 + len(GENERATOR_TRACES)))
        data = f"{n_images} images written to {c.root}" if self.data_built else f"already built in {c.root}"
        backbone = (
            f"random-weight CLIP saved to {c.backbone}" if self.backbone_built else f"already saved in {c.backbone}"
        )
        return f"demo data: {data}\ndemo backbone: {backbone}"


def build_demo(config: DemoConfig) -> DemoSummary:
    """Build the demo data set and the tiny random CLIP, each only when not already built."""
    data_built = not is_demo_complete(config.root, config.n_train, config.n_test, config.seed)
    if data_built:
        try:
            make_demo_data(config.root, config.n_train, config.n_test, config.seed)
        except (FileExistsError, ValueError) as error:
            raise DemoError(str(error)) from None
    backbone_built = not is_backbone_complete(config.backbone)
    if backbone_built:
        make_demo_backbone(config.backbone, config.seed)
    return DemoSummary(config, data_built, backbone_built)
