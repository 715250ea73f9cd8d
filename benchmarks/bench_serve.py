"""``pipeline serve`` under load on loopback: throughput and latency by concurrency, against ``pipeline predict``,
and the server's peak memory over many requests.

Speed: the ViT-B/32-shaped random CLIP and random head of ``bench_predict.py``
(float32 on the CPU) behind ``python -m pipeline serve`` (a subprocess, batch
32, max wait 10 ms); N random 256x256 PNGs. For 1, 8 and 32 clients (threads,
one keep-alive connection each, one image per request as the raw body) every
image is posted once; prints images/s and p50/p95/p99 latency per concurrency.
``run_predict`` then scores the same files (batch 32, 2 decode workers) in this
process, with the server stopped; its images/s are those of its scoring loop
(decode, forward, head, rows written; the detector load excluded, as the
server's is). Prints ``RATIO service images/s (32 clients) /
predict images/s`` (target >= 0.8: batching makes concurrent requests share
forward passes) and the server's batches.

Memory: the tests' tiny CLIP (32 px) and head behind a second server; 8 clients
post 32x32 PNGs, one per request; the server's peak resident memory (VmHWM of
its /proc status, Linux) is read after the first 1,000 requests and after
10,000. Prints ``RATIO peak RSS after 10,000 / after 1,000 requests`` (target:
about 1, no leak).

    .venv/bin/python benchmarks/bench_serve.py [--images 256] [--clients 1,8,32] [--memory 1000,10000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import add_scratch_options, print_machine, quiet_transformers, save_random_clip, scratch_dir
from bench_predict import TINY_CLIP, save_run_head, write_images

from pipeline.detector import PredictConfig, run_predict
from pipeline.features import Backbone, BackboneConfig

TARGET = 0.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="Images posted per concurrency level.")
    parser.add_argument("--size", type=int, default=256, help="Side of the random PNGs.")
    parser.add_argument("--clients", default="1,8,32", help="Concurrency levels; the last one is the ratio's.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory", default="1000,10000", help="Request counts of the memory readings ('' to skip).")
    add_scratch_options(parser)
    return parser.parse_args()


class Service:
    """``python -m pipeline serve`` on a free loopback port."""

    def __init__(self, run: Path, batch: int) -> None:
        command = [sys.executable, "-m", "pipeline", "serve", "--head", str(run), "--port", "0", "--device", "cpu",
                   "--dtype", "float32", "--batch-size", str(batch), "--max-queue", "100000", "--max-wait-ms", "10"]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        first = self.process.stderr.readline()
        self.port = int(first.split("http://127.0.0.1:")[1].split()[0])
        deadline = time.monotonic() + 300
        while self.get("/readyz")[0] != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not get ready: " + first + self.process.stderr.read())
            time.sleep(0.2)

    def get(self, path: str) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def peak_rss_kb(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.process.stderr.close()


def post_all(port: int, payloads: list[bytes], clients: int) -> tuple[float, list[float]]:
    """Post every payload once from ``clients`` threads; (seconds, latencies in seconds)."""
    shares = [payloads[i::clients] for i in range(clients)]

    def client(share: list[bytes]) -> list[float]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        latencies = []
        for body in share:
            start = time.perf_counter()
            connection.request("POST", "/v1/score", body=body, headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200 and answer["images"][0]["error"] is None, answer
            latencies.append(time.perf_counter() - start)
        connection.close()
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [value for values in pool.map(client, shares) for value in values]
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def speed(args: argparse.Namespace, work: Path) -> None:
    model_dir = save_random_clip(work / "vit-b32-random")
    run = save_run_head(work / "run", Backbone(BackboneConfig(model=str(model_dir), device="cpu", dtype="float32")))
    data = write_images(work / "images", args.images, args.size)
    payloads = [path.read_bytes() for path in sorted(data.iterdir())]
    levels = [int(n) for n in args.clients.split(",")]
    service = Service(run, args.batch)
    try:
        post_all(service.port, payloads[: args.batch], levels[-1])  # warm-up
        rates = {}
        for clients in levels:
            before = service.get("/v1/stats")[1]
            seconds, latencies = post_all(service.port, payloads, clients)
            after = service.get("/v1/stats")[1]
            rates[clients] = len(payloads) / seconds
            batches = after["batches"] - before["batches"]
            print(f"serve, {clients:>2} clients: {rates[clients]:.1f} img/s, latency p50 "
                  f"{percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms, "
                  f"p99 {percentile(latencies, 99) * 1000:.0f} ms; {batches} batches "
                  f"({len(payloads) / batches:.1f} images per batch)")  # fmt: skip
    finally:
        service.stop()
    config = PredictConfig(head=run, inputs=(data,), out=work / "scores.csv", device="cpu", dtype="float32",
                           batch_size=args.batch, progress=False)  # fmt: skip
    start = time.perf_counter()
    summary = run_predict(config)
    predict = len(payloads) / summary.times.wall
    print(f"run_predict on the same {len(payloads)} files: {predict:.1f} img/s in its scoring loop "
          f"({len(payloads) / (time.perf_counter() - start):.1f} img/s with the detector load)")  # fmt: skip
    ratio = rates[levels[-1]] / predict
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"RATIO service images/s ({levels[-1]} clients) / predict images/s = {ratio:.3f} ({verdict} target {TARGET})")
    print(f"RATIO service images/s ({levels[-1]} clients) / (1 client) = {rates[levels[-1]] / rates[levels[0]]:.2f}")


def memory(args: argparse.Namespace, work: Path) -> None:
    counts = [int(n) for n in args.memory.split(",") if n]
    if not counts:
        return
    model_dir = save_random_clip(work / "tiny-clip", **TINY_CLIP)
    run = save_run_head(work / "tiny-run", Backbone(BackboneConfig(model=str(model_dir), device="cpu")), 16)
    small = write_images(work / "small", 256, 32, seed=1)
    payloads = [path.read_bytes() for path in sorted(small.iterdir())]
    service = Service(run, args.batch)
    peaks, sent = {}, 0
    try:
        start = time.perf_counter()
        for count in sorted(counts):
            todo = count - sent
            post_all(service.port, [payloads[i % len(payloads)] for i in range(todo)], 8)
            sent = count
            peaks[count] = service.peak_rss_kb()
            print(f"serve after {count} requests of 32x32 PNGs ({time.perf_counter() - start:.1f} s): "
                  f"peak RSS {peaks[count] / 1024:.0f} MiB")  # fmt: skip
    finally:
        service.stop()
    low, high = min(counts), max(counts)
    print(f"RATIO peak RSS after {high} / after {low} requests = {peaks[high] / peaks[low]:.3f} (target: about 1)")


def main() -> int:
    args = parse_args()
    quiet_transformers()
    print_machine()
    print(f"speed inputs: {args.images} random {args.size}x{args.size} PNGs, random CLIP vision tower ViT-B/32 shape, "
          f"float32 on the CPU, batch {args.batch}, one image per request; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    with scratch_dir(args, "bench_serve_") as work:
        speed(args, work)
        memory(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
