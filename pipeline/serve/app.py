"""The service's routes (Starlette): scoring, the detector's description, health, readiness, counters, the page.

:class:`Service` holds the detector once loaded (in a thread, so that ``/healthz`` answers meanwhile), the
batcher and the decode threads; :func:`build_app` wires the routes. Every answer is JSON except the page;
``/v1/*`` needs the bearer token when one is set. Nothing here reads a path from a request or writes an
upload to disk. The endpoints and their answers: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..names import CROPS, REENCODINGS, THRESHOLD_RULES
from .batcher import Batcher, QueueFull
from .config import ServeConfig
from .uploads import RequestError, Upload, parse_body, read_body

if TYPE_CHECKING:
    from ..detector import Detector

TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
LOADING_RETRY_AFTER = "5"


@dataclass(frozen=True)
class Options:
    """A scoring request's options (query parameters or form fields), checked against the detector."""

    threshold: float
    threshold_name: str
    crop: str
    robust: bool


@dataclass(frozen=True)
class Decoded:
    upload: Upload
    pixels: np.ndarray | None
    width: int | None
    height: int | None
    format: str | None
    error: str | None


class Service:
    """The detector, its batcher and the decode threads of one server process."""

    def __init__(self, config: ServeConfig, on_loaded: Callable[[str], None] = lambda failure: None) -> None:
        self.config = config
        self.token = config.bearer_token()
        self.detector: Detector | None = None
        self.batcher: Batcher | None = None
        self.failure = ""
        self.on_loaded = on_loaded  # called once loading ends, with the reason it failed or ""
        self.decoders = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self._loading: asyncio.Task | None = None

    # ------------------------------------------------------------------ life

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self._loading = asyncio.get_running_loop().create_task(self._load())
        try:
            yield
        finally:
            self._loading.cancel()
            if self.batcher is not None:
                await self.batcher.stop()
            self.decoders.shutdown(wait=False)

    async def _load(self) -> None:
        from ..detector import Detector
        from ..errors import PipelineError

        config = self.config
        try:
            detector = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: Detector.load(
                    config.head,
                    model=config.model,
                    allow_other_backbone=config.allow_other_backbone,
                    device=config.device,
                    dtype=config.dtype,
                    threshold=config.threshold,
                ),
            )
        except (PipelineError, OSError, ValueError) as error:
            self.failure = str(error)
            self.on_loaded(self.failure)
            return
        batcher = Batcher(
            lambda images, crops: detector.score_arrays(images, crops, batch_size=config.batch_size),
            config.batch_size,
            config.max_wait_ms / 1000,
            config.max_queue,
        )
        batcher.start()
        self.detector, self.batcher = detector, batcher
        self.on_loaded("")

    # ------------------------------------------------------------------ checks

    def check_token(self, request: Request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise RequestError(
                401, "missing or wrong token: send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )

    def ready_detector(self) -> Detector:
        if self.detector is None:
            if self.failure:
                raise RequestError(503, f"the detector could not be loaded: {self.failure}")
            raise RequestError(503, "the detector is still loading", {"Retry-After": LOADING_RETRY_AFTER})
        return self.detector

    def options(self, detector: Detector, values: dict[str, str]) -> Options:
        from ..detector import FIXED, parse_threshold

        unknown = sorted(set(values) - {"threshold", "crop", "robust"})
        if unknown:
            raise RequestError(422, f"unknown option(s) {', '.join(unknown)}; the options are threshold, crop, robust")
        threshold, name = detector.threshold, detector.threshold_name
        if values.get("threshold"):
            try:
                parsed = parse_threshold(values["threshold"])
            except ValueError as error:
                raise RequestError(422, str(error)) from None
            if isinstance(parsed, str):
                if parsed not in detector.thresholds:
                    raise RequestError(422, f"threshold {parsed}: this head carries no val thresholds; give a number")
                threshold, name = detector.thresholds[parsed], parsed
            else:
                threshold, name = parsed, FIXED
        crop = values.get("crop") or self.config.crop
        if crop not in CROPS:
            raise RequestError(422, f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        robust = values.get("robust", "").strip().lower()
        if robust not in TRUE + FALSE:
            raise RequestError(422, f"robust must be true or false, got {robust!r}")
        return Options(threshold, name, crop, robust in TRUE)

    # ------------------------------------------------------------------ scoring

    def decode(self, upload: Upload) -> Decoded:
        from ..features import ImageDecodeError, decode_image_bytes, describe_file

        header = describe_file(io.BytesIO(upload.data), len(upload.data)) if upload.data else None
        size = (header.width, header.height, header.format) if header and not header.error else (None, None, None)
        try:
            pixels = decode_image_bytes(upload.data, self.config.max_pixels)
        except ImageDecodeError as error:
            return Decoded(upload, None, *size, str(error).replace("--max-pixels", "the server's --max-pixels"))
        return Decoded(upload, pixels, *size, None)

    async def score(self, request: Request) -> Response:
        self.check_token(request)
        detector = self.ready_detector()
        body = await read_body(request.headers.get("content-length"), request.stream(), self.config.max_upload_bytes)
        uploads = parse_body(body, request.headers.get("content-type", ""), self.config.max_images)
        options = self.options(detector, {**request.query_params, **uploads.fields})
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(self.decoders, self.decode, u) for u in uploads.images))
        usable = [d for d in decoded if d.pixels is not None]
        crops = [
            detector.crop_of(options.crop, d.pixels.shape[0], d.pixels.shape[1], self.config.auto_min_side)
            for d in usable
        ]
        scores = await self.run_job(request, detector, [d.pixels for d in usable], crops, options.robust)
        return JSONResponse(answer(decoded, crops, scores, options))

    async def run_job(
        self, request: Request, detector: Detector, images: list[np.ndarray], crops: list[str], robust: bool
    ) -> np.ndarray:
        """Scores (N, 1 + copies) of the images through the batcher; a client that goes away frees its slot."""
        from ..detector import with_copies

        copies = 1 + len(REENCODINGS) if robust else 1
        if not images:
            return np.empty((0, copies))
        if robust:
            images, crops = with_copies(images, crops)
        try:
            job = self.batcher.submit(images, crops)
        except QueueFull as full:
            raise RequestError(503, str(full), {"Retry-After": str(full.retry_after)}) from None
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            self.batcher.cancel(job)
            raise RequestError(499, "the client closed the connection")
        if job.future.exception() is not None:
            raise RequestError(500, f"scoring failed: {job.future.exception()!r}")
        return np.asarray(job.future.result(), dtype=np.float64).reshape(-1, copies)

    # ------------------------------------------------------------------ descriptions

    def describe(self, request: Request) -> Response:
        self.check_token(request)
        return JSONResponse(describe_detector(self.ready_detector(), self.config))

    def stats(self, request: Request) -> Response:
        self.check_token(request)
        self.ready_detector()
        return JSONResponse(self.batcher.counters.as_json())

    def ready(self, request: Request) -> Response:
        if self.detector is not None:
            return JSONResponse({"status": "ready"})
        status = {"status": "failed", "error": self.failure} if self.failure else {"status": "loading"}
        return JSONResponse(status, 503, headers={} if self.failure else {"Retry-After": LOADING_RETRY_AFTER})


async def client_gone(request: Request) -> None:
    """Return once the client has closed the connection (the body has been read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def answer(decoded: Sequence[Decoded], crops: Sequence[str], scores: np.ndarray, options: Options) -> dict[str, Any]:
    """The JSON of a scoring request: one entry per image, in order (an undecodable one with its error)."""
    from ..detector import robust_scores

    robust = robust_scores(scores, options.threshold) if options.robust and len(scores) else None
    entries, row = [], 0
    for item in decoded:
        entry: dict[str, Any] = {
            "name": item.upload.name,
            "score": None,
            "label": None,
            "threshold": options.threshold,
            "threshold_name": options.threshold_name,
            "crop": None,
            "width": item.width,
            "height": item.height,
            "format": item.format,
            "error": item.error,
        }
        if options.robust:
            entry.update(score_min=None, score_max=None, verdict=None)
        if item.pixels is not None:
            score = float(scores[row, 0])
            entry.update(score=score, label="fake" if score >= options.threshold else "real", crop=crops[row])
            if robust is not None:
                entry.update(
                    score_min=float(robust.score_min[row]),
                    score_max=float(robust.score_max[row]),
                    verdict=robust.verdict[row],
                )
            row += 1
        entries.append(entry)
    return {"images": entries}


def describe_detector(detector: Detector, config: ServeConfig) -> dict[str, Any]:
    """What the model card says, as JSON: backbone, head, thresholds with their val operating points, defaults."""
    import torch
    import transformers

    from .. import __version__

    spec = detector.spec
    calibration = spec.calibration
    points = {} if calibration is None else calibration.thresholds
    return {
        "backbone": {
            "model": detector.backbone.config.model,
            "revision": detector.backbone.revision,  # hub commit, or local-sha256:<content hash>
            "head_expects": {"model": spec.model, "revision": spec.revision},
            "other_backbone": detector.other_backbone or None,
            "tap": spec.tap,
            "blocks": spec.block_selection,
            "crop_size": detector.backbone.crop_size,
        },
        "head": {"origin": spec.origin, "store_dtype": spec.store_dtype, "temperature": spec.temperature},
        "threshold": {"name": detector.threshold_name, "value": detector.threshold},
        "thresholds": {
            name: {key: finite(value) for key, value in points[name].as_dict().items()}
            for name in THRESHOLD_RULES
            if name in points
        },
        "val_split": None if calibration is None else calibration.val_split,
        "crop": config.crop,
        "crops": list(CROPS),
        "robust_reencodings": list(REENCODINGS),
        "limits": {
            "batch_size": config.batch_size,
            "max_wait_ms": config.max_wait_ms,
            "max_queue": config.max_queue,
            "max_upload_mb": config.max_upload_mb,
            "max_images": config.max_images,
            "max_pixels": config.max_pixels,
        },
        "token_required": bool(config.bearer_token()),
        "versions": {
            "rine-pipeline": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def build_app(service: Service) -> Starlette:
    """The routes of ``service``; errors answer JSON ``{"error": ...}`` with their status."""

    async def guarded(handler, request: Request) -> Response:
        try:
            result = handler(request)
            return await result if asyncio.iscoroutine(result) else result
        except RequestError as error:
            return JSONResponse({"error": error.message}, error.status, headers=error.headers)

    def route(path: str, handler, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            return await guarded(handler, request)

        return Route(path, endpoint, methods=methods)

    async def http_error(request: Request, error: HTTPException) -> Response:
        return JSONResponse({"error": error.detail}, error.status_code, headers=error.headers)

    html = page()
    routes = [
        Route("/", lambda request: HTMLResponse(html), methods=["GET"]),
        Route("/healthz", lambda request: JSONResponse({"status": "alive"}), methods=["GET"]),
        route("/readyz", service.ready, ["GET"]),
        route("/v1/detector", service.describe, ["GET"]),
        route("/v1/stats", service.stats, ["GET"]),
        route("/v1/score", service.score, ["POST"]),
    ]
    return Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
