"""``pipeline serve``: a detector as an HTTP service (an application on top of the product).

``config`` holds :class:`ServeConfig` (limits and defaults from ``names``), ``batcher`` the dynamic batcher
(one model, a bounded queue of images, batches formed from concurrent requests, counters), ``uploads`` reads a
request's images into memory (never to disk), ``app`` the Starlette routes, ``page.html`` the offline page, and
``server`` runs it under uvicorn (loading, readiness, draining on SIGTERM). Needs the ``[serve]`` extra
(starlette, uvicorn, python-multipart). Endpoints and behaviour: docs/serve.md.
"""

from ..lazy import lazy_face

_MODULES = {
    "config": ("ServeConfig", "ServeError"),
    "server": ("run_serve",),
}
__all__, __getattr__, __dir__ = lazy_face(__name__, _MODULES)
