"""Tests for pipeline.features.images: decoding, crops, training views, perturbations.

Expected values come from hand-computed offsets, hand-built arrays and direct
calls to the libraries the authors used (scipy, OpenCV, Pillow), never from
output of the module saved earlier.
"""

from __future__ import annotations

import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy.ndimage import gaussian_filter

from pipeline.features import augment
from pipeline.features.augment import (
    TrainViewDraw,
    apply_train_view,
    augment_train_view,
    draw_train_view,
    gaussian_blur_official,
    jpeg_roundtrip,
    perturb_image,
    view_rng,
)
from pipeline.features.images import (
    ImageDecodeError,
    center_crop,
    crop_padded,
    decode_image,
    draw_crop_offsets,
    ten_crop,
)
from pipeline.names import PERTURB_PRESETS, PERTURBATIONS


def random_image(height: int, width: int, seed: int = 0, low: int = 0) -> np.ndarray:
    """Random RGB pixels; ``low=1`` keeps every pixel non-zero so padding is visible."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, 256, (height, width, 3), dtype=np.uint8)


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def encode_with_pil(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pil_bilinear_256(pixels: np.ndarray) -> np.ndarray:
    """What torchvision Resize((256, 256)) does to a PIL image."""
    return np.asarray(Image.fromarray(pixels).resize((256, 256), Image.Resampling.BILINEAR))


def first_perturbed_rngs(image: np.ndarray, kind: str, preset: str, count: int) -> list[np.ndarray]:
    """Outputs of the first ``count`` seeds for which the coin said 'perturb'."""
    outputs = []
    seed = 0
    while len(outputs) < count:
        out = perturb_image(image, kind, preset, np.random.default_rng(seed))
        if out is not image:  # unperturbed images come back as the very same array
            assert out.shape == (256, 256, 3)
            outputs.append(out)
        seed += 1
    return outputs


def index_of_match(candidates: list[np.ndarray], output: np.ndarray) -> int:
    matches = [i for i, c in enumerate(candidates) if np.array_equal(c, output)]
    assert len(matches) >= 1, "output matches no independently computed candidate"
    return matches[0]


# ---------------------------------------------------------------- decoding


def test_decode_rgb_png_is_exact_contiguous_uint8(tmp_path: Path) -> None:
    pixels = random_image(37, 53, seed=1)
    path = save_bytes(tmp_path / "a.png", encode_with_pil(pixels, "PNG"))
    decoded = decode_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (37, 53, 3)
    assert decoded.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(decoded, pixels)


def test_decode_zero_byte_file(tmp_path: Path) -> None:
    path = save_bytes(tmp_path / "empty.png", b"")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(info.value) == "file is empty (0 bytes)"
    assert info.value.path == path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encode_with_pil(random_image(64, 80, seed=2), fmt)
    path = save_bytes(tmp_path / f"cut.{fmt.lower()}", data[: len(data) * 6 // 10])
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(info.value) == "truncated image data"


def test_decode_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = save_bytes(tmp_path / "notes.jpg", b"this is plain text, not pixels\n")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(info.value) == "not an image (cannot identify format)"


def test_decode_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(tmp_path / "nope.png")
    assert str(info.value) == "missing file"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(tmp_path)
    assert str(info.value) == "not a file (it is a directory)"


def test_decode_cmyk_jpeg_uses_pillow_cmyk_to_rgb(tmp_path: Path) -> None:
    c, m, y, k = 40, 200, 100, 20
    buffer = io.BytesIO()
    Image.new("CMYK", (32, 32), (c, m, y, k)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(save_bytes(tmp_path / "cmyk.jpg", data))
    # Pillow 13 converts CMYK -> RGB multiplicatively: (255 - ink) * (255 - black) / 255.
    expected = np.array([(255 - ink) * (255 - k) / 255 for ink in (c, m, y)])  # 198, 51, 143
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded.astype(int) - expected).max() <= 3


def test_decode_16bit_grey_png_keeps_high_byte(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 1000], [32767, 32768, 40000, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    assert cv2.imwrite(str(path), values)  # written by OpenCV, not Pillow
    with Image.open(path) as written:
        assert written.mode.startswith("I")
    decoded = decode_image(path)
    high_bytes = np.array([[0, 0, 1, 3], [127, 128, 156, 255]], dtype=np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], high_bytes)


def test_decode_16bit_pgm_opened_as_mode_i_keeps_high_byte(tmp_path: Path) -> None:
    header = b"P5\n3 1\n65535\n"
    body = np.array([300, 4095, 65535], dtype=">u2").tobytes()
    path = save_bytes(tmp_path / "grey16.pgm", header + body)
    with Image.open(path) as written:
        assert written.mode == "I"
    decoded = decode_image(path)
    np.testing.assert_array_equal(decoded[0, :, 0], [1, 15, 255])
    np.testing.assert_array_equal(decoded[0, :, 0], decoded[0, :, 2])


def test_decode_palette_with_alpha_bytes_gives_palette_colours_without_warning(
    tmp_path: Path,
) -> None:
    palette = [(200, 10, 20), (0, 150, 250), (90, 90, 90)]
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([v for colour in palette for v in colour])
    path = tmp_path / "palette.png"
    image.save(path, transparency=bytes([0, 128, 255]))
    with Image.open(path) as written:
        assert isinstance(written.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(path)
    expected = np.array([[palette[i] for i in row] for row in indices], dtype=np.uint8)
    np.testing.assert_array_equal(decoded, expected)


def test_decode_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    rgba = np.dstack([random_image(5, 7, seed=3), np.full((5, 7), 10, np.uint8)])
    decoded = decode_image(save_bytes(tmp_path / "rgba.png", encode_with_pil(rgba, "PNG")))
    np.testing.assert_array_equal(decoded, rgba[:, :, :3])


def test_decode_grayscale_replicates_channels(tmp_path: Path) -> None:
    grey = random_image(9, 11, seed=4)[:, :, 0]
    decoded = decode_image(save_bytes(tmp_path / "grey.png", encode_with_pil(grey, "PNG")))
    np.testing.assert_array_equal(decoded, np.dstack([grey, grey, grey]))


def test_decode_one_pixel_image(tmp_path: Path) -> None:
    pixel = np.array([[[12, 34, 56]]], dtype=np.uint8)
    decoded = decode_image(save_bytes(tmp_path / "dot.png", encode_with_pil(pixel, "PNG")))
    assert decoded.shape == (1, 1, 3)
    np.testing.assert_array_equal(decoded, pixel)


def test_decode_refuses_images_over_max_pixels(tmp_path: Path) -> None:
    path = save_bytes(tmp_path / "big.png", encode_with_pil(random_image(48, 64), "PNG"))
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path, max_pixels=3071)
    assert str(info.value) == "64x48 = 3072 pixels exceeds the limit of 3071 (--max-pixels)"
    assert decode_image(path, max_pixels=3072).shape == (48, 64, 3)
    header_only = save_bytes(tmp_path / "huge.pgm", b"P5\n10001 10000\n255\n")  # no pixels: the limit is checked first
    with pytest.raises(ImageDecodeError, match=r"^10001x10000 = 100010000 pixels exceeds the limit of 100000000 "):
        decode_image(header_only)  # the default limit, 100 million pixels


def test_decode_suspends_pillow_limit_and_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_bytes(tmp_path / "big.png", encode_with_pil(random_image(48, 64), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):  # Pillow alone refuses 3072 > 2 * 1000
        with Image.open(path):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(path).shape == (48, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_decode_in_threads_leaves_pillow_limit_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    paths = [
        save_bytes(tmp_path / f"img_{i}.png", encode_with_pil(random_image(40, 60, seed=i), "PNG")) for i in range(24)
    ]
    barrier = threading.Barrier(6)

    def decode_together(path: Path) -> tuple[int, ...]:
        if paths.index(path) < 6:
            barrier.wait(timeout=10)
        return decode_image(path).shape

    with ThreadPoolExecutor(max_workers=6) as pool:
        shapes = list(pool.map(decode_together, paths))
    assert shapes == [(40, 60, 3)] * 24
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_decode_unicode_and_spaces_in_file_name(tmp_path: Path) -> None:
    pixels = random_image(6, 5, seed=5)
    folder = tmp_path / "dossier été"
    folder.mkdir()
    path = save_bytes(folder / "größe 日本 photo (1).png", encode_with_pil(pixels, "PNG"))
    np.testing.assert_array_equal(decode_image(path), pixels)


def test_decode_exif_rotated_jpeg_keeps_raw_pixel_order(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (250, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 250)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode_with_pil(stored, "JPEG", quality=95, exif=exif.tobytes())
    path = save_bytes(tmp_path / "rotated.jpg", data)
    with Image.open(path) as written:  # the tag is really there
        assert ImageOps.exif_transpose(written).size == (20, 40)
    decoded = decode_image(path)
    assert decoded.shape == (20, 40, 3)
    assert decoded[10, 5, 0] > 200 and decoded[10, 5, 2] < 50
    assert decoded[10, 35, 2] > 200 and decoded[10, 35, 0] < 50


# ---------------------------------------------------------------- center crop


def test_center_crop_rounds_half_to_even_like_torchvision() -> None:
    image = random_image(259, 263, seed=6)
    out = center_crop(image, 224)
    # (259 - 224) / 2 = 17.5 -> 18 ; (263 - 224) / 2 = 19.5 -> 20 (floor would give 17, 19)
    np.testing.assert_array_equal(out, image[18:242, 20:244])
    assert not np.array_equal(out, image[17:241, 19:243])  # HF's (H - 224) // 2 differs here
    assert out.flags["C_CONTIGUOUS"] and out.dtype == np.uint8


def test_center_crop_even_margin_and_half_rounded_down_to_even() -> None:
    image = random_image(260, 261, seed=7)
    # (260 - 224) / 2 = 18 ; (261 - 224) / 2 = 18.5 -> 18 (round half to even, not 19)
    np.testing.assert_array_equal(center_crop(image, 224), image[18:242, 18:242])


def test_center_crop_pads_small_image_symmetrically_with_zeros() -> None:
    image = random_image(101, 50, seed=8, low=1)
    out = center_crop(image, 224)
    assert out.shape == (224, 224, 3)
    # height deficit 123 -> 61 on top, 62 below; width deficit 174 -> 87 each side
    np.testing.assert_array_equal(out[61:162, 87:137], image)
    assert not out[:61].any() and not out[162:].any()
    assert not out[:, :87].any() and not out[:, 137:].any()


def test_center_crop_pads_one_side_and_crops_the_other() -> None:
    image = random_image(300, 50, seed=9, low=1)
    out = center_crop(image, 224)
    # width padded 87 | 87 ; height offset (300 - 224) / 2 = 38
    np.testing.assert_array_equal(out[:, 87:137], image[38:262])
    assert not out[:, :87].any() and not out[:, 137:].any()


def test_center_crop_one_pixel_image() -> None:
    image = np.array([[[9, 8, 7]]], dtype=np.uint8)
    out = center_crop(image, 224)
    expected = np.zeros((224, 224, 3), dtype=np.uint8)
    expected[111, 111] = (9, 8, 7)  # deficit 223 -> 111 before, 112 after
    np.testing.assert_array_equal(out, expected)


def test_center_crop_never_resizes_an_exact_fit() -> None:
    image = random_image(224, 224, seed=10)
    np.testing.assert_array_equal(center_crop(image, 224), image)


# ---------------------------------------------------------------- random crop


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision RandomCrop(size, pad_if_needed=True) as the training views do it: draw, then crop."""
    return crop_padded(image, size, *draw_crop_offsets(rng, image.shape[0], image.shape[1], size))


def test_random_crop_pads_full_deficit_on_both_sides_and_covers_all_offsets() -> None:
    image = random_image(10, 6, seed=11, low=1)
    padded = np.zeros((10, 10, 3), dtype=np.uint8)
    padded[:, 2:8] = image  # deficit 8 - 6 = 2 zeros on the left AND on the right
    candidates = {(top, left): padded[top : top + 8, left : left + 8] for top in range(3) for left in range(3)}
    seen = set()
    for seed in range(300):
        out = random_crop(image, 8, np.random.default_rng(seed))
        hits = [key for key, c in candidates.items() if np.array_equal(c, out)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(candidates)  # both ends of [0, padded - size] are reachable


def test_random_crop_pads_both_dimensions() -> None:
    image = random_image(5, 3, seed=12, low=1)
    out = random_crop(image, 8, np.random.default_rng(0))
    assert out.shape == (8, 8, 3)
    padded = np.zeros((11, 13, 3), dtype=np.uint8)
    padded[3:8, 5:8] = image
    assert any(np.array_equal(out, padded[top : top + 8, left : left + 8]) for top in range(4) for left in range(6))


def test_random_crop_exact_size_returns_image() -> None:
    image = random_image(8, 8, seed=13)
    np.testing.assert_array_equal(random_crop(image, 8, np.random.default_rng(3)), image)


# ---------------------------------------------------------------- filters


def test_gaussian_blur_official_matches_scipy_per_channel_into_uint8() -> None:
    image = random_image(30, 41, seed=14)
    before = image.copy()
    out = gaussian_blur_official(image, 1.7)
    expected = np.empty_like(image)
    for c in range(3):
        gaussian_filter(image[:, :, c], sigma=1.7, output=expected[:, :, c])
    np.testing.assert_array_equal(out, expected)
    as_float = np.dstack([gaussian_filter(image[:, :, c].astype(float), 1.7) for c in range(3)])
    assert np.abs(out - as_float).max() <= 2.0  # quantised after each 1-D pass
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(gaussian_blur_official(image, 0.0), image)


def test_jpeg_roundtrip_cv2_encodes_bgr_and_returns_rgb() -> None:
    image = random_image(24, 32, seed=15)
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 30])
    expected = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(jpeg_roundtrip(image, 30, "cv2"), expected)
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 250
    out = jpeg_roundtrip(red, 100, "cv2")
    assert out[8, 8, 0] > 240 and out[8, 8, 2] < 10


def test_jpeg_roundtrip_pil_matches_pillow_save_and_reopen() -> None:
    image = random_image(24, 32, seed=16)
    expected = np.asarray(Image.open(io.BytesIO(encode_with_pil(image, "JPEG", quality=100))))
    out = jpeg_roundtrip(image, 100, "pil")
    np.testing.assert_array_equal(out, expected)
    assert out.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError):
        jpeg_roundtrip(image, 50, "libjpeg-turbo")


def test_format_align_makes_every_image_the_same_kind_of_jpeg() -> None:
    """A PNG-born and a JPEG-born image both become a 4:2:0 JPEG of the asked quality, nothing else."""
    y, x = np.mgrid[0:40, 0:56]
    png_born = np.stack([4 * x, 5 * y, 2 * (x + y)], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it close
    jpeg_born = np.asarray(Image.open(io.BytesIO(encode_with_pil(png_born, "JPEG", quality=75))))
    for image in (png_born, jpeg_born):
        encoded = augment.format_align_bytes(image, 95)
        assert encoded == augment.format_align_bytes(image, 95)  # deterministic
        reopened = Image.open(io.BytesIO(encoded))
        assert (reopened.format, reopened.size, reopened.mode) == ("JPEG", (56, 40), "RGB")
        assert reopened.layer == [(1, 2, 2, 0), (2, 1, 1, 1), (3, 1, 1, 1)]  # luma 2x2, chroma 1x1: 4:2:0
        assert not reopened.info.get("exif")
        pixels = augment.format_align(image, 95)
        np.testing.assert_array_equal(pixels, np.asarray(reopened.convert("RGB")))
        assert pixels.dtype == np.uint8 and np.abs(pixels.astype(int) - image).mean() < 2
    with pytest.raises(ValueError, match="1..100"):
        augment.format_align_bytes(png_born, 0)


# ---------------------------------------------------------------- training views


def test_view_rng_makes_views_reproducible_and_distinct() -> None:
    image = random_image(256, 256, seed=17)
    a = augment_train_view(image, 224, view_rng(7, 3, 0))
    b = augment_train_view(image, 224, view_rng(7, 3, 0))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment_train_view(image, 224, view_rng(7, 3, 1)))
    assert not np.array_equal(a, augment_train_view(image, 224, view_rng(7, 4, 0)))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8


def test_draw_train_view_statistics() -> None:
    draws = [draw_train_view(view_rng(0, row, 0), 256, 256, 224) for row in range(4000)]
    blurred = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    compressed = [d for d in draws if d.jpeg_quality is not None]
    assert 0.46 < len(blurred) / 4000 < 0.54
    assert 0.0 <= min(blurred) < 0.05 and 2.95 < max(blurred) <= 3.0
    assert 0.46 < len(compressed) / 4000 < 0.54
    qualities = [d.jpeg_quality for d in compressed]
    assert set(qualities) == {30, 100}
    assert 0.44 < qualities.count(30) / len(qualities) < 0.56
    assert {d.jpeg_encoder for d in compressed} == {"cv2", "pil"}
    assert all(d.jpeg_encoder is None for d in draws if d.jpeg_quality is None)
    assert 0.46 < sum(d.flip for d in draws) / 4000 < 0.54
    tops = {d.crop_top for d in draws}
    assert tops == set(range(33))  # uniform over [0, 256 - 224] inclusive


def test_augment_train_view_applies_blur_jpeg_crop_flip_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple] = []

    def record_blur(image: np.ndarray, sigma: float) -> np.ndarray:
        calls.append(("blur", sigma))
        return image

    def record_jpeg(image: np.ndarray, quality: int, encoder: str) -> np.ndarray:
        calls.append(("jpeg", quality, encoder))
        return image

    monkeypatch.setattr(augment, "gaussian_blur_official", record_blur)
    monkeypatch.setattr(augment, "jpeg_roundtrip", record_jpeg)
    image = random_image(32, 32, seed=18)  # crop of the full size: only flips change pixels
    flips = 0
    n_views = 600
    for view in range(n_views):
        start = len(calls)
        out = augment_train_view(image, 32, view_rng(1, 0, view))
        names = [c[0] for c in calls[start:]]
        assert names in ([], ["blur"], ["jpeg"], ["blur", "jpeg"])
        if np.array_equal(out, image[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, image)
    blur_calls = [c for c in calls if c[0] == "blur"]
    jpeg_calls = [c for c in calls if c[0] == "jpeg"]
    assert 0.42 < len(blur_calls) / n_views < 0.58
    assert 0.42 < len(jpeg_calls) / n_views < 0.58
    assert {c[1] for c in jpeg_calls} == {30, 100}
    assert 0.42 < flips / n_views < 0.58


def test_apply_train_view_matches_hand_built_pipeline() -> None:
    image = random_image(40, 50, seed=19)
    draw = TrainViewDraw(blur_sigma=1.3, jpeg_quality=30, jpeg_encoder="pil", crop_top=5, crop_left=7, flip=True)
    blurred = np.empty_like(image)
    for c in range(3):
        gaussian_filter(image[:, :, c], sigma=1.3, output=blurred[:, :, c])
    compressed = np.asarray(Image.open(io.BytesIO(encode_with_pil(blurred, "JPEG", quality=30))))
    expected = compressed[5:37, 7:39][:, ::-1]
    np.testing.assert_array_equal(apply_train_view(image, 32, draw), expected)


def test_apply_train_view_cv2_jpeg_without_blur_or_flip() -> None:
    image = random_image(40, 50, seed=20)
    draw = TrainViewDraw(blur_sigma=None, jpeg_quality=100, jpeg_encoder="cv2", crop_top=8, crop_left=0, flip=False)
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 100])
    compressed = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(apply_train_view(image, 32, draw), compressed[8:40, 0:32])


# ---------------------------------------------------------------- ten crop


def test_ten_crop_order_matches_torchvision() -> None:
    image = random_image(259, 263, seed=21)
    out = ten_crop(image, 224)
    assert out.shape == (10, 224, 224, 3)
    flipped = image[:, ::-1]
    expected = []
    for source in (image, flipped):
        expected += [
            source[0:224, 0:224],  # top-left
            source[0:224, 39:263],  # top-right
            source[35:259, 0:224],  # bottom-left
            source[35:259, 39:263],  # bottom-right
            source[18:242, 20:244],  # center: round(17.5) = 18, round(19.5) = 20
        ]
    for i in range(10):
        np.testing.assert_array_equal(out[i], expected[i], err_msg=f"crop {i}")
    # the flipped center is not the flip of the center when the margin is odd
    assert not np.array_equal(out[9], out[4][:, ::-1])


def test_ten_crop_pads_small_images_like_center_crop() -> None:
    image = random_image(200, 100, seed=22, low=1)
    padded = np.zeros((224, 224, 3), dtype=np.uint8)
    padded[12:212, 62:162] = image
    out = ten_crop(image, 224)
    for i in range(5):
        np.testing.assert_array_equal(out[i], padded)
        np.testing.assert_array_equal(out[5 + i], padded[:, ::-1])


# ---------------------------------------------------------------- perturbations


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturb_half_of_the_time_and_untouched_otherwise(kind: str) -> None:
    image = random_image(40, 48, seed=23)
    before = image.copy()
    perturbed = 0
    for seed in range(200):
        out = perturb_image(image, kind, "paper", np.random.default_rng(seed))
        if out.shape == (256, 256, 3):
            perturbed += 1
        else:
            assert out is image
    assert 0.38 < perturbed / 200 < 0.62
    np.testing.assert_array_equal(image, before)


def test_perturb_official_blur_is_sigma_4_for_every_kernel() -> None:
    image = random_image(100, 120, seed=24)
    official = [pil_bilinear_256(cv2.GaussianBlur(image, (k, k), 4)) for k in (3, 5, 7, 9)]
    paper = [pil_bilinear_256(cv2.GaussianBlur(image, (k, k), 0)) for k in (3, 5, 7, 9)]
    for preset, candidates in (("official", official), ("paper", paper)):
        outputs = first_perturbed_rngs(image, "blur", preset, 40)
        assert {index_of_match(candidates, out) for out in outputs} == {0, 1, 2, 3}
    assert not any(np.array_equal(o, p) for o in official for p in paper)


def test_perturb_official_jpeg_is_quality_95_on_the_rgb_array() -> None:
    image = random_image(100, 120, seed=25)
    # The official code hands the RGB array to OpenCV unchanged, at OpenCV's default quality 95.
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    expected = pil_bilinear_256(cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    for out in first_perturbed_rngs(image, "jpeg", "official", 5):
        np.testing.assert_array_equal(out, expected)


def test_perturb_paper_jpeg_quality_is_drawn_in_10_to_74() -> None:
    image = random_image(64, 72, seed=26)

    def bgr_roundtrip(quality: int) -> np.ndarray:
        bgr = image[:, :, ::-1].copy()
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return pil_bilinear_256(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])

    qualities = list(range(10, 75))
    candidates = [bgr_roundtrip(q) for q in qualities]
    outputs = first_perturbed_rngs(image, "jpeg", "paper", 30)
    seen = {qualities[index_of_match(candidates, out)] for out in outputs}
    assert len(seen) > 10 and min(seen) >= 10 and max(seen) <= 74


def test_perturb_crop_removes_half_fraction_per_end_and_resizes_bicubic() -> None:
    image = random_image(100, 160, seed=27)
    # f in [0.05, 0.2): int(100 * f / 2) in 2..9 rows, int(160 * f / 2) in 4..15 columns per end
    cuts = [(ch, cw) for ch in range(2, 10) for cw in range(4, 16)]

    def candidate(ch: int, cw: int, dsize: tuple[int, int]) -> np.ndarray:
        kept = image[ch : 100 - ch, cw : 160 - cw].copy()
        return pil_bilinear_256(cv2.resize(kept, dsize, interpolation=cv2.INTER_CUBIC))

    swapped = [candidate(ch, cw, (100, 160)) for ch, cw in cuts]  # official: (W, H) order swapped
    straight = [candidate(ch, cw, (160, 100)) for ch, cw in cuts]
    for out in first_perturbed_rngs(image, "crop", "official", 8):
        index_of_match(swapped, out)
    for out in first_perturbed_rngs(image, "crop", "paper", 8):
        index_of_match(straight, out)


@pytest.mark.parametrize("preset", PERTURB_PRESETS)
def test_perturb_noise_sigma_range_and_truncation(preset: str) -> None:
    image = np.full((256, 256, 3), 128, dtype=np.uint8)  # 256 x 256: the final resize is exact
    sigmas = []
    for out in first_perturbed_rngs(image, "noise", preset, 12):
        residual = out.astype(float) - 128.0
        assert abs(residual.mean() + 0.5) < 0.2  # float -> uint8 truncates, it does not round
        sigmas.append(residual.std())
    assert min(sigmas) > 4.5 and max(sigmas) < 20.5
    assert max(sigmas) - min(sigmas) > 3.0  # sigma is drawn per image


def test_perturb_combined_runs_blur_crop_jpeg_noise_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []

    def recorder(name: str, fill: int):
        def step(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
            order.append(f"{name}<-{int(image[0, 0, 0])}")
            return np.full_like(image, fill)

        return step

    monkeypatch.setattr(augment, "perturb_blur", recorder("blur", 1))
    monkeypatch.setattr(augment, "perturb_crop", recorder("crop", 2))
    monkeypatch.setattr(augment, "perturb_jpeg", recorder("jpeg", 3))
    monkeypatch.setattr(augment, "perturb_noise", recorder("noise", 4))
    image = np.zeros((30, 30, 3), dtype=np.uint8)
    out = first_perturbed_rngs(image, "combined", "official", 1)[0]
    assert order == ["blur<-0", "crop<-1", "jpeg<-2", "noise<-3"]
    np.testing.assert_array_equal(out, np.full((256, 256, 3), 4, dtype=np.uint8))


def test_perturb_handles_tiny_images_and_rejects_unknown_names() -> None:
    tiny = np.full((1, 2, 3), 77, dtype=np.uint8)
    for kind in PERTURBATIONS:
        for preset in PERTURB_PRESETS:
            out = first_perturbed_rngs(tiny, kind, preset, 2)[0]
            assert out.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_image(tiny, "rotate", "paper", np.random.default_rng(0))
    with pytest.raises(ValueError, match="preset"):
        perturb_image(tiny, "blur", "authors", np.random.default_rng(0))
