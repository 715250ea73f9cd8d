"""`pipeline serve` as a client sees it: the real server in a subprocess on a free loopback port, over HTTP.

Scores equal predict's for the same files; concurrent requests share forward passes (the server's counters);
a full queue answers 503 and the server goes on; bad uploads get the documented answers; the token; a cancelled
request frees its slot; SIGTERM answers the requests in flight and exits 0; the page works in headless Chromium.
Servers whose every backbone call sleeps (conftest's throttle) make the queue states reachable on purpose.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import throttled_environment
from pipeline.detector import PredictConfig, run_predict

pytest.importorskip("starlette", reason="pipeline serve needs the [serve] extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="pipeline serve needs the [serve] extra (starlette, uvicorn)")
pytestmark = pytest.mark.slow

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Server:
    process: subprocess.Popen
    host: str
    port: int
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.reader is not None:
            self.reader.join(10)
        self.process.stderr.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=120):
        """(status, headers, JSON or text) of one request on a new connection."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers={**AUTH, **(headers or {})})
            response = connection.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            return response.status, dict(response.getheaders()), json.loads(data) if "json" in kind else data.decode()
        finally:
            connection.close()

    def score(self, files: list[tuple[str, bytes]], fields: dict | None = None, headers: dict | None = None):
        body, kind = multipart(files, fields or {})
        return self.call("POST", "/v1/score", body, {"Content-Type": kind, **(headers or {})})

    def stats(self) -> dict:
        status, _, counters = self.call("GET", "/v1/stats")
        assert status == 200, counters
        return counters

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counters = self.stats()
            if condition(counters):
                return counters
            time.sleep(0.02)
        raise AssertionError(f"the server's counters never showed {what}: {self.stats()}")


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_server(run: Path, *options: str, env: dict | None = None) -> Server:
    """``python -m pipeline serve`` on a free port (--port 0, read from its first line), once /readyz says ready."""
    command = [sys.executable, "-m", "pipeline", "serve", "--head", str(run), "--port", "0", "--device", "cpu",
               "--token", TOKEN, *options]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        for line in process.stderr:
            log.append(line)
            lines.put(line)
        lines.put("")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    server = Server(process, "127.0.0.1", 0, log, reader)
    try:
        first = lines.get(timeout=120)
        assert first.startswith("listening on http://127.0.0.1:"), "".join(log)
        server.port = int(first.split("http://127.0.0.1:")[1].split()[0])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, _, body = server.call("GET", "/readyz")
            if status == 200:
                return server
            assert body["status"] == "loading", body
            time.sleep(0.1)
        raise AssertionError("the server never got ready: " + "".join(log))
    except BaseException:
        server.stop()
        raise


@pytest.fixture
def stop_servers() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(trained_predict_run) -> Iterator[Server]:
    """The plain server: small limits so that the tests can pass them; backbone calls slowed a little."""
    folder = trained_predict_run["root"] / "serve-throttle"
    server = start_server(trained_predict_run["run"], "--max-upload-mb", "0.5", "--max-images", "40",
                          "--max-pixels", "5000", "--max-wait-ms", "50",
                          env=throttled_environment(folder, 0.2))  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def predicted(trained_predict_run, tmp_path_factory) -> dict[str, float]:
    """``pipeline predict``'s scores of the run's data (center crop, its val threshold): path -> score."""
    out = tmp_path_factory.mktemp("serve-predict") / "scores.csv"
    run_predict(PredictConfig(head=trained_predict_run["run"], inputs=(trained_predict_run["data"],), out=out,
                              device="cpu", progress=False))  # fmt: skip
    with out.open(newline="") as handle:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


def png_bytes(size: tuple[int, int], seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_scores_labels_and_thresholds_equal_predicts_for_the_same_files(server, predicted):
    paths = sorted(predicted)
    status, _, answer = server.score([(Path(p).name, Path(p).read_bytes()) for p in paths])
    assert status == 200, answer
    threshold = predicted_threshold(server)
    assert len(answer["images"]) == len(paths) == 32
    for path, entry in zip(paths, answer["images"], strict=True):
        assert entry["score"] == pytest.approx(predicted[path], abs=1e-6), path
        assert entry["label"] == ("fake" if entry["score"] >= threshold else "real")
        assert (entry["threshold"], entry["threshold_name"], entry["crop"]) == (threshold, "val", "center")
        assert (entry["width"], entry["height"], entry["format"], entry["error"]) == (45, 38, "PNG", None)
    # one image as the raw body, options as query fields; the robust answer keeps the score
    status, _, raw = server.call("POST", "/v1/score?threshold=0.5&robust=true", Path(paths[0]).read_bytes(),
                                 {"Content-Type": "image/png"})  # fmt: skip
    assert status == 200, raw
    (entry,) = raw["images"]
    assert entry["score"] == pytest.approx(predicted[paths[0]], abs=1e-6)
    assert (entry["threshold"], entry["threshold_name"]) == (0.5, "fixed")
    assert entry["score_min"] <= entry["score"] <= entry["score_max"] and entry["verdict"] in ("real", "fake", "unsure")


def predicted_threshold(server: Server) -> float:
    status, _, description = server.call("GET", "/v1/detector")
    assert status == 200, description
    return description["thresholds"]["val"]["threshold"]


def test_the_detector_endpoint_says_what_the_head_records(server, trained_predict_run):
    from safetensors import safe_open

    with safe_open(str(trained_predict_run["run"] / "head.safetensors"), framework="np") as handle:
        metadata = handle.metadata()
    status, _, description = server.call("GET", "/v1/detector")
    assert status == 200
    assert description["backbone"]["revision"] == metadata["model_revision"]
    assert description["backbone"]["revision"].startswith("local-sha256:")
    assert description["thresholds"] == json.loads(metadata["thresholds"])  # floats survive JSON exactly
    assert description["threshold"] == {"name": "val", "value": description["thresholds"]["val"]["threshold"]}
    assert description["limits"]["max_images"] == 40 and description["token_required"] is True


def test_64_concurrent_requests_are_answered_right_in_fewer_forward_passes(server, predicted):
    paths = sorted(predicted)
    before = server.stats()
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda i: server.score([(f"{i}.png", Path(paths[i % 32]).read_bytes())]), range(64)))
    for i, (status, _, answer) in enumerate(answers):
        assert status == 200, answer
        assert answer["images"][0]["score"] == pytest.approx(predicted[paths[i % 32]], abs=1e-6)
    after = server.stats()
    assert after["requests"] - before["requests"] == 64 and after["images"] - before["images"] == 64
    assert after["batches"] - before["batches"] < 64  # requests shared forward passes
    assert after["largest_batch"] > 1


def test_bad_uploads_get_the_documented_answers(server, predicted):
    good = Path(sorted(predicted)[0]).read_bytes()
    files = [("good.png", good), ("empty.png", b""), ("cut.png", good[: len(good) // 2]),
             ("notes.png", b"just some text"), ("huge.png", png_bytes((100, 100)))]  # fmt: skip
    status, _, answer = server.score(files)
    assert status == 200, answer
    errors = {entry["name"]: entry["error"] for entry in answer["images"]}
    assert errors["good.png"] is None and answer["images"][0]["score"] is not None
    assert errors["empty.png"] == "file is empty (0 bytes)"
    assert errors["cut.png"] == "truncated image data"
    assert errors["notes.png"] == "not an image (cannot identify format)"
    assert "100x100 = 10000 pixels exceeds the limit of 5000" in errors["huge.png"]
    assert all(e["score"] is None and e["label"] is None for e in answer["images"][1:])
    huge = answer["images"][4]
    assert (huge["width"], huge["height"], huge["format"]) == (100, 100, "PNG")

    status, _, answer = server.score([("big.bin", os.urandom(600 * 1024))])
    assert status == 413 and "larger than the limit" in answer["error"]
    status, _, answer = server.score([(f"{i}.png", good) for i in range(41)])
    assert status == 413 and "41 images" in answer["error"]
    status, _, answer = server.call("POST", "/v1/score", b"--x\r\nbroken", {"Content-Type": "multipart/form-data"})
    assert status == 400 and "boundary" in answer["error"]
    status, _, answer = server.score([], {"threshold": "0.5"})
    assert status == 400 and "no image" in answer["error"]
    for fields, word in (({"threshold": "1.5"}, "threshold"), ({"crop": "huge"}, "crop"),
                         ({"robust": "maybe"}, "robust"), ({"path": "/etc/passwd"}, "unknown option")):  # fmt: skip
        status, _, answer = server.score([("good.png", good)], fields)
        assert status == 422 and word in answer["error"], answer
    status, _, answer = server.call("GET", "/v1/nothing")
    assert status == 404 and answer == {"error": "Not Found"}
    status, _, answer = server.call("GET", "/v1/score")
    assert status == 405 and "error" in answer


def test_a_missing_or_wrong_token_gets_401_and_health_needs_none(server, predicted):
    good = Path(sorted(predicted)[0]).read_bytes()
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, response_headers, answer = server.score([("good.png", good)], headers=headers)
        assert status == 401 and "token" in answer["error"] and response_headers["www-authenticate"] == "Bearer"
        assert server.call("GET", "/v1/detector", headers=headers)[0] == 401
    assert server.call("GET", "/healthz", headers={"Authorization": ""})[:3:2] == (200, {"status": "alive"})
    assert server.call("GET", "/readyz", headers={"Authorization": ""})[0] == 200


def in_thread(action) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(action()), daemon=True)
    thread.start()
    return thread, result


def test_a_full_queue_answers_503_with_retry_after_and_the_server_goes_on(trained_predict_run, stop_servers):
    folder = trained_predict_run["root"] / "serve-slow"
    server = start_server(trained_predict_run["run"], "--batch-size", "1", "--max-queue", "1", "--max-wait-ms", "0",
                          env=throttled_environment(folder, 1.0))  # fmt: skip
    stop_servers.append(server)
    image = [("a.png", next(trained_predict_run["data"].rglob("*.png")).read_bytes())]
    first, first_answer = in_thread(lambda: server.score(image))
    server.wait_for(lambda c: c["in_batch"] == 1 and c["queued"] == 0, "the first image being scored")
    second, second_answer = in_thread(lambda: server.score(image))
    server.wait_for(lambda c: c["queued"] == 1, "the second image waiting")
    status, headers, answer = server.score(image)
    assert status == 503 and "queue is full" in answer["error"] and int(headers["retry-after"]) >= 1
    for thread, answer in ((first, first_answer), (second, second_answer)):
        thread.join(60)
        assert answer[0][0] == 200 and answer[0][2]["images"][0]["score"] is not None
    assert server.score(image)[0] == 200
    assert server.stats()["rejected"] == 1

    # a client that goes away while its request waits frees the queue at once
    busy, busy_answer = in_thread(lambda: server.score(image))
    server.wait_for(lambda c: c["in_batch"] == 1 and c["queued"] == 0, "an image being scored")
    body, kind = multipart(image, {})
    gone = socket.create_connection((server.host, server.port))
    gone.sendall(
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    server.wait_for(lambda c: c["queued"] == 1, "the abandoned request waiting")
    gone.close()
    counters = server.wait_for(lambda c: c["cancelled"] == 1 and c["queued"] == 0, "the abandoned request cancelled")
    assert counters["rejected"] == 1
    third, third_answer = in_thread(lambda: server.score(image))  # fits the queue of one again
    for thread, answer in ((busy, busy_answer), (third, third_answer)):
        thread.join(60)
        assert answer[0][0] == 200
    final = server.stats()
    assert (final["rejected"], final["cancelled"]) == (1, 1)
    assert final["images"] == final["requests"] - final["cancelled"]  # the abandoned image was never scored


def test_sigterm_answers_the_requests_in_flight_and_exits_0(trained_predict_run, stop_servers):
    folder = trained_predict_run["root"] / "serve-term"
    server = start_server(trained_predict_run["run"], "--batch-size", "2", "--max-wait-ms", "0",
                          env=throttled_environment(folder, 1.0))  # fmt: skip
    stop_servers.append(server)
    image = [("a.png", next(trained_predict_run["data"].rglob("*.png")).read_bytes())]
    clients = [in_thread(lambda: server.score(image)) for _ in range(4)]
    server.wait_for(lambda c: c["requests"] == 4, "four requests accepted")
    server.process.send_signal(signal.SIGTERM)
    for thread, answer in clients:
        thread.join(60)
        assert answer and answer[0][0] == 200 and answer[0][2]["images"][0]["score"] is not None
    assert server.process.wait(60) == 0, "".join(server.log)
    assert "stopped: 4 requests, 4 images" in "".join(server.log)


def test_a_head_that_cannot_be_loaded_or_a_busy_port_stops_the_server_with_one_error_line(tmp_path):
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"not a head")
    command = [sys.executable, "-m", "pipeline", "serve", "--head", str(head), "--device", "cpu"]
    broken = subprocess.run([*command, "--port", "0"], capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1, broken.stderr
    assert broken.stderr.startswith("listening on http://127.0.0.1:")
    (error,) = [line for line in broken.stderr.splitlines() if line.startswith("Error:")]
    assert str(head) in error and "Traceback" not in broken.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([*command, "--port", str(taken.getsockname()[1])], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert busy.returncode == 1 and "Error: cannot listen on 127.0.0.1:" in busy.stderr, busy.stderr


# ---------------------------------------------------------------- the page in a browser


def browser_paths() -> tuple[str, str]:
    chromium = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                     if shutil.which(name)), None)  # fmt: skip
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "headless Chromium or chromedriver not found, so the page is not checked in a browser: install them "
            "(Debian/Ubuntu, as root: apt-get install -y chromium chromium-driver; .ci/run does this)"
        )
    pytest.importorskip("selenium", reason="the page test drives Chromium with selenium (the test extra)")
    return chromium, driver


def test_the_page_scores_a_picked_image_in_headless_chromium(server, predicted, tmp_path):
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900",
                     f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "tokenrow").is_displayed())  # the server asked for a token
        driver.find_element(By.ID, "token").send_keys(TOKEN + "\t")
        wait.until(lambda d: d.find_element(By.ID, "threshold").get_attribute("value") == "val")
        assert "real" in driver.find_element(By.ID, "meaning").text
        paths = sorted(predicted)
        picked = [paths[0], paths[-1]]  # a real and a fake
        driver.find_element(By.ID, "files").send_keys("\n".join(picked))
        rows = wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.result")) == 2 and
                          d.find_elements(By.CSS_SELECTOR, "tr.result"))  # fmt: skip
        shown = {row.get_attribute("data-name"): row for row in rows}
        for path in picked:
            row = shown[Path(path).name]
            assert float(row.get_attribute("data-score")) == pytest.approx(predicted[path], abs=1e-6)
            label = "fake" if "1_fake" in path else "real"
            assert row.find_element(By.CSS_SELECTOR, ".badge").text == label
        artefacts = Path(os.environ.get("RINE_TEST_ARTEFACTS", tmp_path))
        artefacts.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(artefacts / "serve_page.png"))
    finally:
        driver.quit()
