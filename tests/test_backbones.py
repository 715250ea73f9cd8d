"""Which backbone a head gets: identity by content (weights and config), the hub cache first, fast clear failures.

The heads here are the trained run's head with its recorded backbone rewritten, as a head trained on that
backbone records it: a relative folder (a run made elsewhere) or a hub id at a commit (served from a hub cache
built in the test, the layout huggingface_hub reads).
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import COMMIT, copy_folder, fill_hub_cache, head_recording, write_image
from pipeline.cli import main
from pipeline.detector import BackboneUnavailable, Detector, PredictError
from pipeline.features import Backbone, local_content_hash

OFFICIAL = Path(__file__).resolve().parent / "data" / "rine_2class_trainable.pth"


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


@pytest.fixture
def hub_cache(tiny_clip_dir, tmp_path, monkeypatch) -> Path:
    """A hub cache holding the tiny CLIP as test-org/tiny-clip at COMMIT (main)."""
    return fill_hub_cache(tmp_path / "hub", "test-org/tiny-clip", tiny_clip_dir, COMMIT, monkeypatch)


@pytest.fixture
def no_backbone_load(monkeypatch) -> None:
    """Any backbone construction fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a backbone was loaded")

    monkeypatch.setattr(Backbone, "__init__", refuse)


# ---------------------------------------------------------------- local backbones: content, not path


def test_a_head_on_a_relative_folder_scores_from_elsewhere_with_model_at_any_copy(
    trained_predict_run, tiny_clip_dir, tmp_path, monkeypatch
):
    images = sorted(trained_predict_run["data"].rglob("*.png"))[::4]
    made_in = tmp_path / "project"
    copy_folder(tiny_clip_dir, made_in / "models" / "tiny-clip")
    head = head_recording(trained_predict_run["run"], made_in / "head.safetensors", model="models/tiny-clip")
    monkeypatch.chdir(made_in)
    reference = Detector.load(head, device="cpu")
    expected = reference.score(images)

    elsewhere = tmp_path / "elsewhere"
    copy = copy_folder(tiny_clip_dir, elsewhere / "weights" / "my-copy")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(BackboneUnavailable) as caught:  # models/tiny-clip means nothing here: no hub attempt
        Detector.load(head, device="cpu")
    message = str(caught.value)
    assert "models/tiny-clip" in message and local_content_hash(tiny_clip_dir) in message
    assert "--model DIR" in message and "--include-backbone" in message and "(3)" in message

    detector = Detector.load(head, model="weights/my-copy", device="cpu")  # no allow_other_backbone
    assert detector.other_backbone == "" and detector.backbone_label() == reference.backbone_label()
    np.testing.assert_array_equal(detector.score(images), expected)
    out = tmp_path / "s.csv"
    invoke("predict", *map(str, images), "--head", str(head), "--model", str(copy), "--out", str(out),
           "--device", "cpu", "--no-progress")  # fmt: skip
    rows = out.read_text().splitlines()[1:]
    assert [float(row.split(",")[1]) for row in rows] == pytest.approx(expected.tolist(), abs=1e-7)
    assert {row.split(",")[9] for row in rows} == {f"models/tiny-clip@{local_content_hash(tiny_clip_dir)}"}


@pytest.mark.parametrize(("key", "value"), [("layer_norm_eps", 1e-3), ("hidden_act", "gelu")])
def test_a_backbone_config_edited_in_place_is_refused_as_extract_refuses_it(
    trained_predict_run, tiny_clip_dir, tmp_path, key, value
):
    """Issue 24 item 4: the same weights with another config.json are another backbone."""
    folder = copy_folder(tiny_clip_dir, tmp_path / "clip")
    head = head_recording(trained_predict_run["run"], tmp_path / "head.safetensors", model=str(folder))
    assert Detector.load(head, device="cpu").other_backbone == ""
    config = json.loads((folder / "config.json").read_text())
    assert config[key] != value
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    image = write_image(tmp_path / "images" / "x.png", (40, 40), 0)
    output = invoke("predict", str(image), "--head", str(head), "--device", "cpu", code=1)
    assert "scoring is refused" in output and f"config.json {key}: {value!r}" in output
    assert f"the head's {config[key]!r}" in output
    detector = Detector.load(head, device="cpu", allow_other_backbone=True)
    assert "allowed" in detector.backbone_label() and str(folder) in detector.backbone_label()


def test_a_head_without_a_recorded_config_still_checks_the_weights(trained_predict_run, tiny_clip_dir, tmp_path):
    """Heads fitted before the config was recorded: the weights' hash is all there is to compare."""
    folder = copy_folder(tiny_clip_dir, tmp_path / "clip")
    head = head_recording(trained_predict_run["run"], tmp_path / "head.safetensors", model=str(folder))
    with safe_open(str(head), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "model_config"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(head), metadata=metadata)
    assert Detector.load(head, device="cpu").spec.model_config is None
    other = copy_folder(tiny_clip_dir, tmp_path / "other")
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01  # the last float32 weight changes a little (its exponent's lowest bit)
    weights.write_bytes(bytes(data))
    with pytest.raises(PredictError, match="revision local-sha256:.*, the head.s local-sha256:.*scoring is refused"):
        Detector.load(head, model=str(other), device="cpu")


# ---------------------------------------------------------------- hub backbones: the cache first, fast failures


def test_a_hub_backbone_loads_from_the_cache_without_asking_the_hub(trained_predict_run, hub_cache, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    import huggingface_hub

    def no_request(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_request)
    head = head_recording(trained_predict_run["run"], tmp_path / "head.safetensors", model="test-org/tiny-clip",
                          model_revision=COMMIT)  # fmt: skip
    detector = Detector.load(head, device="cpu")
    assert detector.backbone.revision == COMMIT and detector.backbone_label() == f"test-org/tiny-clip@{COMMIT}"
    assert detector.backbone.config.local_files_only


def test_the_official_head_offline_fails_at_once_with_the_backbone_it_needs_and_three_ways(
    tmp_path, monkeypatch, no_backbone_load
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneUnavailable) as caught:
        Detector.load(OFFICIAL, device="cpu")
    message = str(caught.value)
    assert message.startswith(f"{OFFICIAL}: needs the backbone openai/clip-vit-large-patch14 at revision main")
    assert "the hub is offline (HF_HUB_OFFLINE is set)" in message
    assert "(1) pre-fill the hub cache: `huggingface-cli download openai/clip-vit-large-patch14 --revision main`" in (
        message
    )
    assert str(tmp_path / "empty-cache") in message
    assert "(2) --model DIR" in message and "--local-dir DIR" in message and "--allow-other-backbone" in message
    assert "(3) an export made with `pipeline export RUN --out DIR --include-backbone`" in message
    image = write_image(tmp_path / "x.png", (40, 40), 0)
    output = invoke("predict", str(image), "--head", str(OFFICIAL), code=1)
    assert output.startswith("Error: ") and output.count("\n") == 1 and "--include-backbone" in output


class CountingServer:
    """A TCP server on 127.0.0.1 that counts connections and closes each without an answer (a broken hub)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


def test_an_unreachable_hub_is_asked_once_then_the_message(tmp_path, monkeypatch, no_backbone_load):
    import huggingface_hub.constants as constants

    server = CountingServer()
    template = constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    try:
        with pytest.raises(BackboneUnavailable, match=f"the hub at {server.url} cannot be reached") as caught:
            Detector.load(OFFICIAL, device="cpu")
    finally:
        server.socket.close()
    assert server.connections == 1  # one request, no retry loop
    assert "huggingface-cli download openai/clip-vit-large-patch14" in str(caught.value)


def test_a_threshold_the_pth_cannot_have_exits_2_before_any_backbone_load(tmp_path, no_backbone_load):
    image = write_image(tmp_path / "x.png", (40, 40), 0)
    for rule in ("fpr1", "val"):
        output = invoke("predict", str(image), "--head", str(OFFICIAL), "--threshold", rule, code=2)
        assert "carries no val thresholds" in output and f"--threshold {rule} needs them" in output
    output = invoke("predict", str(image), "--head", str(OFFICIAL), "--out", str(tmp_path / "s.txt"), code=2)
    assert "the name must end with one of .csv, .jsonl, .parquet" in output


def test_a_folder_downloaded_with_local_dir_is_the_hub_commit_it_records(trained_predict_run, tiny_clip_dir, tmp_path):
    """`huggingface-cli download ID --revision R --local-dir DIR` records the commit of each file it wrote."""
    from huggingface_hub._local_folder import write_download_metadata

    head = head_recording(trained_predict_run["run"], tmp_path / "head.safetensors", model="test-org/tiny-clip",
                          model_revision=COMMIT)  # fmt: skip
    folder = copy_folder(tiny_clip_dir, tmp_path / "downloaded")
    for name in ("config.json", "model.safetensors"):
        write_download_metadata(folder, name, COMMIT, etag="x")
    detector = Detector.load(head, model=str(folder), device="cpu")  # no allow_other_backbone
    assert detector.other_backbone == "" and detector.backbone_label() == f"test-org/tiny-clip@{COMMIT}"
    plain = copy_folder(tiny_clip_dir, tmp_path / "plain")  # the same files without the download's record
    with pytest.raises(PredictError, match="scoring is refused"):
        Detector.load(head, model=str(plain), device="cpu")


# ---------------------------------------------------------------- the small ones


def test_no_image_found_is_one_line_and_exit_status_3(trained_predict_run, tmp_path, no_backbone_load):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    output = invoke("predict", str(empty), "--head", str(trained_predict_run["run"]), code=3)
    assert output.startswith(f"Error: no image found in {empty}") and output.count("\n") == 1


def test_repr_names_backbone_head_threshold_and_crop(trained_predict_run, tiny_clip_dir):
    detector = Detector.load(trained_predict_run["run"], device="cpu", threshold="eer")
    text = repr(detector)
    assert text.startswith(f"Detector(backbone='{tiny_clip_dir}@local-sha256:")
    assert f"head='{trained_predict_run['run'] / 'head.safetensors'}'" in text
    assert f"threshold={detector.thresholds['eer']!r} (eer)" in text and text.endswith("crop=32x32)")
