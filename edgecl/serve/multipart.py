"""A multipart/form-data reader that spools every file part to disk from its first byte.

Starlette keeps each file part in RAM until it passes 1 MB (``SpooledTemporaryFile``), and spills to the
system temp dir, often a tmpfs (RAM again). On an 8 GB Jetson a 400 MB upload of 1 MB images would sit in
memory, so here file parts go straight to unnamed files (``O_TMPFILE``) in the data dir's ``staging/``:
the memory an upload holds while it is read is the parser's chunk (at most 64 KB) plus its text fields
(bounded by ``max_field_bytes`` in total), whatever its size. The files have no name, so a daemon killed
mid-upload leaves nothing behind. The streaming parser is ``python-multipart``'s (the one Starlette uses).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO, Any

import anyio
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
except ImportError:  # python-multipart < 0.0.13
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]
    from multipart.multipart import (  # type: ignore[no-redef]
        MultipartParser,
        MultipartState,
        parse_options_header,
    )

__all__ = ["read_form"]


class _Part:
    """The part being parsed: its headers, then either a spool file or its text."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.name = ""
        self.file: IO[bytes] | None = None
        self.upload: UploadFile | None = None
        self.text = bytearray()


class _Reader:
    """python-multipart callbacks: text fields into memory (bounded), file parts into spool files."""

    def __init__(self, spool_dir: Path, max_files: int, max_fields: int, max_field_bytes: int) -> None:
        self.spool_dir = spool_dir
        self.max_files = max_files
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.items: list[tuple[str, str | UploadFile]] = []
        self.files: list[IO[bytes]] = []
        self.field_bytes = 0
        self.fields = 0
        self.pending: list[tuple[IO[bytes], bytes]] = []
        """(spool file, bytes) to write after the current chunk, in a worker thread."""
        self.error: HTTPException | None = None
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def fail(self, status: int, detail: str) -> None:
        if self.error is None:
            self.error = HTTPException(status, detail)
        raise FormParserError(detail)

    def on_part_begin(self) -> None:
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        part = self._part
        disposition = next((v for k, v in part.headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            self.fail(400, "a multipart part has no name (Content-Disposition: form-data; name=...)")
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if len(self.files) >= self.max_files:
                self.fail(413, f"more than {self.max_files} files in one request")
            part.file = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115 - closed with the form
            self.files.append(part.file)
            part.upload = UploadFile(
                file=part.file,  # type: ignore[arg-type]
                size=0,
                filename=options[b"filename"].decode("utf-8", "replace"),
                headers=Headers(raw=part.headers),
            )
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                self.fail(413, f"more than {self.max_fields} form fields in one request")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.file is not None:
            assert part.upload is not None
            part.upload.size = (part.upload.size or 0) + (end - start)
            self.pending.append((part.file, bytes(data[start:end])))
            return
        self.field_bytes += end - start
        if self.field_bytes > self.max_field_bytes:
            self.fail(413, f"the form's text fields pass {self.max_field_bytes} bytes")
        part.text += data[start:end]

    def on_part_end(self) -> None:
        part = self._part
        if part.upload is not None:
            self.items.append((part.name, part.upload))
            return
        try:
            self.items.append((part.name, part.text.decode("utf-8")))
        except UnicodeDecodeError:
            self.fail(400, f"form field '{part.name}' is not UTF-8 text")

    def write_pending(self) -> None:
        for fh, data in self.pending:
            fh.write(data)
        self.pending.clear()

    def close(self) -> None:
        for fh in self.files:
            fh.close()


async def read_form(
    request: Request,
    spool_dir: Path,
    *,
    max_files: int,
    max_fields: int = 16,
    max_field_bytes: int = 2 * 2**20,
) -> FormData:
    """Parse the request's multipart body; file parts are spooled to unnamed files in ``spool_dir``.

    Raises ``HTTPException`` 415 (not multipart), 400 (malformed) or 413 (too many files or fields, text
    fields over ``max_field_bytes``). Close the returned form (``await form.close()``) to free the files.
    """
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise HTTPException(415, "send multipart/form-data (curl -F ...)")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart body without a boundary in its Content-Type")
    reader = _Reader(spool_dir, max_files, max_fields, max_field_bytes)
    callbacks: Any = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if reader.pending:
                await anyio.to_thread.run_sync(reader.write_pending)
        parser.finalize()
        if parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
            raise HTTPException(400, "the multipart body ends before its closing boundary")
        for _, value in reader.items:
            if isinstance(value, UploadFile):
                value.file.seek(0)
    except FormParserError as err:
        reader.close()
        raise reader.error or HTTPException(400, f"malformed multipart body: {err}") from None
    except BaseException:
        reader.close()
        raise
    return FormData(reader.items)
