"""``pipeline serve``: a detector as an HTTP service (the ``[serve]`` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from ..errors import PipelineError
from ..names import (
    CROPS,
    DEFAULT_SERVE_BATCH,
    DEFAULT_SERVE_HOST,
    DEFAULT_SERVE_MAX_IMAGES,
    DEFAULT_SERVE_MAX_PIXELS,
    DEFAULT_SERVE_MAX_QUEUE,
    DEFAULT_SERVE_MAX_UPLOAD_MB,
    DEFAULT_SERVE_MAX_WAIT_MS,
    DEFAULT_SERVE_PORT,
    SERVE_TOKEN_ENV,
)
from .group import main
from .options import DEVICE_OPTION
from .product import _check_threshold

SERVE_MODULES = ("starlette", "uvicorn", "python_multipart")


@main.command("serve")
@click.option(
    "--head",
    "head",
    required=True,
    help="A run folder, its head.safetensors, a folder written by `pipeline export`, or an official .pth.",
)
@click.option("--host", default=DEFAULT_SERVE_HOST, help="Address to listen on; 0.0.0.0 opens it to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_SERVE_PORT, help="0: a free port (printed).")
@click.option(
    "--token", default=None, help=f"Require 'Authorization: Bearer TOKEN' on /v1/*. Default: ${SERVE_TOKEN_ENV}."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=DEFAULT_SERVE_BATCH,
    help="Images per forward pass at most (the re-encoded copies of robust requests count).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0),
    default=DEFAULT_SERVE_MAX_WAIT_MS,
    help="How long the worker waits for more images before it runs a batch.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=DEFAULT_SERVE_MAX_QUEUE,
    help="Images waiting for the model at most; a request that does not fit gets 503 with Retry-After.",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(0, min_open=True),
    default=DEFAULT_SERVE_MAX_UPLOAD_MB,
    help="Largest request body (MiB); larger: 413.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1),
    default=DEFAULT_SERVE_MAX_IMAGES,
    help="Most images in one request; more: 413.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=DEFAULT_SERVE_MAX_PIXELS,
    help="An image with more pixels gets a per-image error.",
)
@click.option("--workers", "decode_workers", type=click.IntRange(1), default=2, help="Decoding threads.")
@click.option(
    "--threshold",
    callback=_check_threshold,
    help="Default threshold of requests: val, eer, fpr1, fpr5 or a number. Default: the head's (val, or 0.5).",
)
@click.option("--crop", type=click.Choice(CROPS), default="center", help="Default crop of requests.")
@click.option(
    "--auto-min-side",
    type=click.IntRange(1),
    default=None,
    help="crop=auto: shorter side from which an image gets ten crops. Default: twice the crop.",
)
@DEVICE_OPTION
@click.option(
    "--dtype",
    default="auto",
    type=click.Choice(("auto", "float32", "float16", "bfloat16")),
    help="Backbone compute dtype; auto = float16 on GPU, float32 on CPU.",
)
@click.option("--model", default=None, help="Another backbone than the head's (needs --allow-other-backbone).")
@click.option("--allow-other-backbone", is_flag=True, help="Serve even when the backbone is not the head's.")
@click.option(
    "--drain-seconds",
    type=click.FloatRange(0),
    default=30.0,
    help="On SIGTERM, how long requests in flight may take before the server stops anyway.",
)
def serve_command(head: str, **options) -> None:
    """Serve a detector over HTTP: POST /v1/score, GET /v1/detector, /healthz, /readyz, /v1/stats and a page at /.

    \b
    Concurrent requests share forward passes (dynamic batching); the queue is
    bounded (503 + Retry-After when full); uploads stay in memory. Listens on
    127.0.0.1 unless --host says otherwise. SIGTERM answers the requests in
    flight and exits 0. Needs the serve extra: pip install 'rine-pipeline[serve]'.
    Endpoints, limits and answers: docs/serve.md.
    """
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise PipelineError(
            f"pipeline serve needs {', '.join(missing)}: pip install 'rine-pipeline[serve]' (starlette, uvicorn, "
            "python-multipart)"
        )
    from ..serve import ServeConfig, run_serve

    path = Path(head)
    config = ServeConfig(head=path if path.exists() else head, **options)
    run_serve(config, log=lambda line: click.echo(line, err=True))
