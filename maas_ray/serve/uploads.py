"""``multipart/form-data`` parsed as it streams, straight into a :class:`~maas_ray.finetune.files.Upload`.

Starlette's ``request.form()`` reads the whole body before a route runs; here each
chunk of the ``file`` part is validated and written to storage as it arrives
(python-multipart's push parser calls back per piece), so an upload of any size
holds one chunk, one JSONL line and a few form fields in memory.
"""

from __future__ import annotations

from typing import Any

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from maas_ray.finetune.files import FileRejected, FileStore, StoredFile, Upload

MAX_FIELD_BYTES = 1024  # a form field other than the file (``purpose``) is short

# The body the route documents (it reads the stream itself, so FastAPI cannot derive it).
OPENAPI_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "The file (JSONL for fine-tune)."},
        "purpose": {"type": "string", "description": "fine-tune, batch, user_data, assistants or evals."},
    }}}}}}


class FormUpload:
    """One multipart upload: :meth:`write` each body chunk (blocking: storage I/O), then
    :meth:`finish`; :meth:`abort` on any error. Raises :class:`FileRejected` for a
    malformed form or a file that fails validation."""

    def __init__(self, content_type: str | None, store: FileStore, tenant: str) -> None:
        kind, options = parse_options_header((content_type or "").encode("latin-1"))
        boundary = options.get(b"boundary")
        if kind.lower() != b"multipart/form-data" or not boundary:
            raise FileRejected("upload the file as multipart/form-data with fields 'file' and 'purpose'")
        self.store, self.tenant = store, tenant
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self._done = False  # the file part ended
        self._part: dict[str, Any] = {}
        self._header = [b"", b""]
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data,
            "on_part_end": self._end})

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as err:
            raise FileRejected(f"malformed multipart body: {err}") from None

    def finish(self) -> StoredFile:
        try:
            self._parser.finalize()
        except MultipartParseError as err:
            raise FileRejected(f"malformed multipart body: {err}") from None
        if self.upload is None or not self._done:
            raise FileRejected("the form has no complete 'file' field")
        return self.upload.commit(self.fields.get("purpose"))

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()

    # -- parser callbacks (on the thread that called write) ---------------------
    def _begin(self) -> None:
        self._part = {"disposition": b"", "data": bytearray()}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._part["disposition"] = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part["disposition"])
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part["name"] = name
        if b"filename" not in options:
            return
        if name != "file" or self.upload is not None:
            raise FileRejected(f"expected one file, in the field 'file' (got a file in {name!r})")
        filename = options[b"filename"].decode("utf-8", "replace")
        # The purpose decides whether lines are validated as they stream; a form that sends
        # the file first has it validated from storage once the purpose arrives.
        self.upload = self.store.upload(filename, self.fields.get("purpose"), self.tenant)
        self._part["file"] = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part.get("file"):
            self.upload.write(data[start:end])  # type: ignore[union-attr]
            return
        self._part["data"] += data[start:end]
        if len(self._part["data"]) > MAX_FIELD_BYTES:
            raise FileRejected(f"form field {self._part.get('name')!r} is over {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if self._part.get("file"):
            self._done = True
        elif self._part.get("name"):
            self.fields[self._part["name"]] = self._part["data"].decode("utf-8", "replace")
