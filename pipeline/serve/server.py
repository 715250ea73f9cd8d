"""Run the service: bind the address, start uvicorn, load the detector, drain on SIGTERM, exit 0.

The address is bound before anything is loaded (so ``--port 0`` gets a free port, printed at once); the
detector loads in the background while ``/healthz`` answers; a detector that cannot be loaded stops the
server with :class:`ServeError`. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, answers the
requests in flight (up to ``drain_seconds``) and :func:`run_serve` returns.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

from .app import Service, build_app
from .config import ServeConfig, ServeError

BACKLOG = 2048  # uvicorn's default


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv4 or IPv6 by the host); an address in use is a ServeError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)  # connections wait here until uvicorn accepts them
    except OSError as error:
        raise ServeError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    sock.set_inheritable(True)
    return sock


def run_serve(config: ServeConfig, log: Callable[[str], object] = print) -> None:
    """Serve until SIGTERM or Ctrl-C; raises ServeError when the address or the detector cannot be used."""
    import uvicorn

    config.validate()
    sock = listening_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server: uvicorn.Server | None = None

    def loaded(failure: str) -> None:
        if failure:
            server.should_exit = True
        else:
            log(f"ready: {service.detector.describe()}".replace("\n", "\n  "))

    service = Service(config, on_loaded=loaded)
    uvicorn_config = uvicorn.Config(
        build_app(service),
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(config.drain_seconds),
    )
    server = uvicorn.Server(uvicorn_config)
    address = f"[{host}]" if ":" in host else host
    token = "a bearer token" if config.bearer_token() else "no token"
    log(f"listening on http://{address}:{port} ({token}); loading the detector {config.head} (GET /readyz: ready?)")
    # uvicorn raises a captured SIGTERM or SIGINT again once it has drained; handlers of ours then keep status 0.
    previous = {number: signal.signal(number, lambda *_: None) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        sock.close()
    if service.failure:
        raise ServeError(f"{config.head}: cannot serve this detector: {service.failure}")
    counters = service.batcher.counters if service.batcher else None
    if counters is not None:
        log(
            f"stopped: {counters.requests} requests, {counters.images} images in {counters.batches} batches, "
            f"{counters.rejected} refused (queue full), {counters.cancelled} cancelled by their client"
        )
