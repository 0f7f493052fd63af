"""Streams one file field of a ``multipart/form-data`` request to disk, with hard limits.

FastAPI's ``UploadFile`` would buffer the whole body before the route runs; this reads the request
stream chunk by chunk through python-multipart's push parser, writes the ``file`` part to a file
while hashing it, and stops with 413 the moment the file passes ``max_bytes``. Other parts are
counted and size-capped and their content dropped, so a flood of fields or a field that never ends
costs bounded memory. A client that stops sending for ``idle_timeout`` seconds gets 408.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from core.errors import BadRequest, InsufficientStorage, InvalidInput, PayloadTooLarge, RequestTimeout

MAX_HEADER_BYTES = 8 * 1024
MAX_HEADERS_PER_PART = 16
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    filename: str
    size: int
    sha256: str


class _FilePartSink:
    def __init__(self, field: str, out: BinaryIO, max_bytes: int, max_parts: int, max_field_bytes: int) -> None:
        self.field = field
        self.out = out
        self.max_bytes = max_bytes
        self.max_parts = max_parts
        self.max_field_bytes = max_field_bytes
        self.parts = 0
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[str, bytes] = {}
        self.header_bytes = 0
        self.in_file = False
        self.part_bytes = 0
        self.found = False
        self.filename = ""
        self.size = 0
        self.digest = hashlib.sha256()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise BadRequest(f"too many multipart parts (more than {self.max_parts})")
        self.headers = {}
        self.header_bytes = 0
        self.in_file = False
        self.part_bytes = 0

    def _header_budget(self, length: int) -> None:
        self.header_bytes += length
        if self.header_bytes > MAX_HEADER_BYTES:
            raise BadRequest("multipart part headers are too large")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_budget(end - start)
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_budget(end - start)
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if len(self.headers) >= MAX_HEADERS_PER_PART:
            raise BadRequest("too many headers in a multipart part")
        self.headers[bytes(self.header_field).decode("latin-1").lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self.headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition == b"form-data" and name == self.field:
            if self.found:
                raise BadRequest(f"more than one {self.field!r} part")
            self.found = True
            self.in_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")[:255]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        length = end - start
        if self.in_file:
            self.size += length
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"the file is larger than the upload limit of {self.max_bytes} bytes",
                                      [{"loc": ["body", self.field], "msg": "too large"}])
            chunk = data[start:end]
            self.digest.update(chunk)
            self.out.write(chunk)
        else:
            self.part_bytes += length
            if self.part_bytes > self.max_field_bytes:
                raise BadRequest(f"a multipart field is larger than {self.max_field_bytes} bytes")

    def on_part_end(self) -> None:
        self.in_file = False


async def receive_file(
    request: Request, path: Path, *, field: str, max_bytes: int, max_parts: int, max_field_bytes: int,
    idle_timeout: float = 30.0,
) -> ReceivedFile:
    """Write the ``field`` part of the multipart request body to ``path``; return its size and sha256."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise BadRequest("expected a multipart/form-data body with a boundary",
                         [{"loc": ["header", "content-type"], "msg": "not multipart/form-data"}])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"the request is larger than the upload limit of {max_bytes} bytes",
                              [{"loc": ["body", field], "msg": "too large"}])
    try:
        with open(path, "wb") as out:
            sink = _FilePartSink(field, out, max_bytes, max_parts, max_field_bytes)
            parser = MultipartParser(options[b"boundary"], sink.callbacks())
            try:
                chunks = request.stream().__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(chunks.__anext__(), idle_timeout)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        raise RequestTimeout(f"the upload sent nothing for {idle_timeout:g} s") from None
                    parser.write(chunk)
                parser.finalize()
            except MultipartParseError as exc:
                raise BadRequest(f"malformed multipart body: {exc}") from exc
            except ClientDisconnect as exc:
                raise BadRequest("the client disconnected during the upload") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the server has no disk space left for this upload") from exc
        raise
    if not sink.found:
        raise InvalidInput(f"the multipart body has no {field!r} file part",
                           [{"loc": ["body", field], "msg": "Field required"}])
    return ReceivedFile(path=path, filename=sink.filename, size=sink.size, sha256=sink.digest.hexdigest())
