"""What ``pipeline serve`` runs with: the detector to load, where to listen, the batching and the limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError
from ..names import (
    CENTER,
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


class ServeError(PipelineError, RuntimeError):
    """The service cannot start with these options (or its detector cannot be loaded)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``pipeline serve`` needs, resolved from the command line."""

    head: Path | str  # run folder, exported detector folder, head.safetensors, the authors' .pth (or a hub id)
    host: str = DEFAULT_SERVE_HOST
    port: int = DEFAULT_SERVE_PORT  # 0: a free port, printed when listening
    batch_size: int = DEFAULT_SERVE_BATCH
    max_wait_ms: float = DEFAULT_SERVE_MAX_WAIT_MS
    max_queue: int = DEFAULT_SERVE_MAX_QUEUE
    max_upload_mb: float = DEFAULT_SERVE_MAX_UPLOAD_MB
    max_images: int = DEFAULT_SERVE_MAX_IMAGES
    max_pixels: int = DEFAULT_SERVE_MAX_PIXELS
    decode_workers: int = 2
    token: str | None = None  # None: read SERVE_TOKEN_ENV; "" or unset there: no token required
    threshold: str | None = None  # a request's default: the head's (val, or 0.5)
    crop: str = CENTER  # a request's default
    auto_min_side: int | None = None
    model: str | None = None
    allow_other_backbone: bool = False
    device: str = "auto"
    dtype: str = "auto"
    drain_seconds: float = 30.0  # SIGTERM: how long in-flight requests may take before the server stops anyway

    def validate(self) -> None:
        if self.crop not in CROPS:
            raise ServeError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if min(self.batch_size, self.max_queue, self.max_images, self.max_pixels, self.decode_workers) < 1:
            raise ServeError("batch size, max queue, max images, max pixels and decode workers must be at least 1")
        if self.max_upload_mb <= 0 or self.max_wait_ms < 0 or not 0 <= self.port <= 65535:
            raise ServeError("max upload must be positive, max wait at least 0 and the port in 0..65535")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def bearer_token(self) -> str:
        """The token requests must send (``Authorization: Bearer ...``); empty: none required."""
        return self.token if self.token is not None else os.environ.get(SERVE_TOKEN_ENV, "")
