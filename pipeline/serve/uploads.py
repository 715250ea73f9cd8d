"""A scoring request's images and fields, read into memory (never to disk) within the upload limit.

The body is either ``multipart/form-data`` (file parts are images, other parts are option fields) or the bytes
of one image (any other content type: ``image/*``, ``application/octet-stream``). Problems raise
:class:`RequestError` with the HTTP status to answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import PipelineError

DISCARD_LIMIT = 64 * 1024 * 1024  # an oversized body is read and dropped up to this much, so that clients see the 413


class RequestError(PipelineError):
    """A client's request answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Upload:
    name: str  # the part's file name (or "image" for a raw body), for the answer only: never a path opened
    data: bytes


@dataclass
class Uploads:
    images: list[Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


async def read_body(content_length: str | None, stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The body, or ``RequestError(413)`` once it passes ``max_bytes`` (the rest is read and dropped)."""
    too_large = RequestError(413, f"the upload is larger than the limit of {max_bytes} bytes (--max-upload-mb)")
    declared = int(content_length) if content_length and content_length.isdigit() else None
    chunks: list[bytes] = []
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if declared is not None and declared > max_bytes or total > max_bytes:
            chunks.clear()
            if total > max_bytes + DISCARD_LIMIT:
                break
            continue
        chunks.append(chunk)
    if declared is not None and declared > max_bytes or total > max_bytes:
        raise too_large
    return b"".join(chunks)


def parse_body(body: bytes, content_type: str, max_images: int) -> Uploads:
    """The images and fields of a body (see the module doc); more than ``max_images`` images: 413."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type or "application/octet-stream")
    if kind == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise RequestError(400, "a multipart/form-data body needs a boundary in its Content-Type")
        uploads = parse_multipart(body, boundary)
    elif kind in (b"application/x-www-form-urlencoded", b"text/plain", b"application/json"):
        raise RequestError(400, "send images as multipart/form-data file parts, or one image as the raw body")
    else:
        uploads = Uploads([Upload("image", body)])
    if not uploads.images:
        raise RequestError(400, "the request holds no image (send file parts, or one image as the body)")
    if len(uploads.images) > max_images:
        raise RequestError(
            413, f"{len(uploads.images)} images in one request; the limit is {max_images} (--max-images)"
        )
    return uploads


def parse_multipart(body: bytes, boundary: bytes) -> Uploads:
    """File parts and fields of a multipart body, in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    uploads = Uploads()
    part: dict[str, object] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"] += data[start:end]

    def on_part_end() -> None:
        disposition, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            uploads.images.append(Upload(options[b"filename"].decode("utf-8", "replace"), bytes(part["data"])))
        elif disposition == b"form-data" and name:
            uploads.fields[name] = bytes(part["data"]).decode("utf-8", "replace")

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except Exception as error:  # python-multipart's parse errors
        raise RequestError(400, f"malformed multipart body ({error})") from None
    return uploads
