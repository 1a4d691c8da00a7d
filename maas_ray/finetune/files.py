"""Uploaded files (``/v1/files``): content under ``{storage}/files/``, records in the database.

An upload streams: each chunk is validated (line by line, for fine-tune files)
and written to a temporary object as it arrives, so memory per upload is bounded
whatever its size. On success the temporary object is renamed into place and the
database row written last, so a file is listed only once its bytes are complete;
a rejected or aborted upload deletes its temporary object and leaves nothing.
Deleting goes the other way round: row first, then bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select

from maas_ray import db, storage
from maas_ray.finetune.formats import BatchLineValidator, DataFormatError, FileSummary, LineValidator
from maas_ray.tenancy import DEFAULT_TENANT, owns

PURPOSES = ("fine-tune", "batch", "user_data", "assistants", "evals")
# What the service writes itself (a batch's results), never what a client may upload as.
SERVICE_PURPOSES = ("batch_output",)
CHUNK_BYTES = 1 << 20  # read and written at a time (file contents, re-validation)


class FileNotFound(LookupError):
    """No such file (for this tenant)."""


class FileRejected(ValueError):
    """An upload that cannot be stored (bad purpose, name or content); ``param`` names the
    form field at fault."""

    def __init__(self, message: str, param: str = "file") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    uri: str
    data_format: str | None
    rows: int | None

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


def _stored(row: db.FileRow) -> StoredFile:
    return StoredFile(row.id, row.filename, row.purpose, row.bytes, row.created_at, row.uri,
                      row.data_format, row.rows)


class FileStore:
    """Files of one storage root; every call is scoped to a tenant."""

    def __init__(self, root: str | None = None) -> None:
        self.root = storage.storage_root(root)
        self.files_uri = storage.join(self.root, "files")

    def create(self, filename: str, content: BinaryIO | bytes | Iterable[bytes], purpose: str,
               tenant: str = DEFAULT_TENANT) -> StoredFile:
        """Validate (``fine-tune``, ``batch``) and store an upload; raise :class:`FileRejected`.
        ``content`` may be bytes, a binary file or an iterable of chunks (streamed)."""
        with self.upload(filename, purpose, tenant) as upload:
            for chunk in _chunks(content):
                upload.write(chunk)
            return upload.commit()

    def upload(self, filename: str, purpose: str | None, tenant: str = DEFAULT_TENANT) -> Upload:
        """Start a streamed upload (a context manager that aborts it on error). ``purpose``
        may be ``None`` when a form sends it after the file: give it to :meth:`Upload.commit`."""
        return Upload(self, filename, purpose, tenant)

    def output(self, filename: str, purpose: str, tenant: str) -> Upload:
        """A file the service writes for a tenant (``purpose`` in :data:`SERVICE_PURPOSES`),
        streamed and committed like an upload."""
        if purpose not in SERVICE_PURPOSES:
            raise ValueError(f"not a service purpose: {purpose!r}")
        upload = Upload(self, filename, None, tenant)
        upload.purpose = purpose
        return upload

    def get(self, file_id: str, tenant: str = DEFAULT_TENANT) -> StoredFile:
        with db.session(self.root) as s:
            row = s.get(db.FileRow, file_id)
            if not owns(row, tenant):
                raise FileNotFound(f"no such file: {file_id!r}")
            return _stored(row)

    def list(self, tenant: str = DEFAULT_TENANT, purpose: str | None = None,
             limit: int = 10_000, after: str | None = None, order: str = "desc") -> list[StoredFile]:
        with db.session(self.root) as s:
            q = select(db.FileRow).where(db.FileRow.tenant == tenant)
            if purpose:
                q = q.where(db.FileRow.purpose == purpose)
            key = (db.FileRow.created_ns, db.FileRow.id)
            q = q.order_by(*(k.desc() for k in key) if order == "desc" else key)
            rows = [_stored(r) for r in s.scalars(q)]
        if after:
            ids = [r.id for r in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return rows[:limit]

    def open(self, file_id: str, tenant: str = DEFAULT_TENANT) -> Iterator[bytes]:
        """The file's bytes in chunks (streams from object stores too)."""
        uri = self.get(file_id, tenant).uri
        fs, path = storage.filesystem(uri)

        def chunks() -> Iterator[bytes]:
            with fs.open_input_stream(path) as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
        return chunks()

    def lines(self, file_id: str, tenant: str = DEFAULT_TENANT) -> Iterator[bytes]:
        """The file's lines, streamed."""
        pending = b""
        for chunk in self.open(file_id, tenant):
            pending += chunk
            *done, pending = pending.split(b"\n")
            yield from done
        if pending:
            yield pending

    def delete(self, file_id: str, tenant: str = DEFAULT_TENANT) -> None:
        with db.session(self.root) as s:
            row = s.get(db.FileRow, file_id)
            if not owns(row, tenant):
                raise FileNotFound(f"no such file: {file_id!r}")
            uri = row.uri
            s.delete(row)
        fs, path = storage.filesystem(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


class Upload:
    """One file arriving in chunks: :meth:`write` each, then :meth:`commit` (or :meth:`abort`).

    Bytes go to a temporary object next to the final one (``files/.{id}.part``), which no
    listing shows: the file appears, renamed and with its database row, only on commit.
    """

    def __init__(self, store: FileStore, filename: str, purpose: str | None, tenant: str) -> None:
        self.store, self.tenant = store, tenant
        self.filename = Path(filename or "upload.jsonl").name[:512]  # never a path
        self.purpose: str | None = None
        self.id = f"file-{uuid.uuid4().hex[:24]}"
        self.uri = storage.join(store.files_uri, self.id)
        self.bytes = 0
        self._validator: LineValidator | None = None
        if purpose is not None:
            self._set_purpose(purpose)
        self._fs, self._tmp = storage.filesystem(storage.join(store.files_uri, f".{self.id}.part"))
        self._fs.create_dir(self._tmp.rsplit("/", 1)[0])
        self._out: Any = self._fs.open_output_stream(self._tmp)

    def _set_purpose(self, purpose: str | None) -> None:
        if purpose is None:
            raise FileRejected(f"no purpose given: send one of {list(PURPOSES)}", "purpose")
        if purpose not in PURPOSES:
            raise FileRejected(f"purpose must be one of {list(PURPOSES)} (got {purpose!r})", "purpose")
        if purpose in ("fine-tune", "batch"):
            if not self.filename.endswith(".jsonl"):
                raise FileRejected(f"{purpose} files must be JSONL (*.jsonl), got {self.filename!r}")
            self._validator = LineValidator() if purpose == "fine-tune" else BatchLineValidator()
        self.purpose = purpose

    def write(self, chunk: bytes) -> None:
        """Validate (fine-tune and batch files, line by line) and store one chunk."""
        if self._validator is not None:
            self._validate(self._validator.feed, chunk)
        self._out.write(chunk)
        self.bytes += len(chunk)

    def commit(self, purpose: str | None = None) -> StoredFile:
        """Finish: check the last line, move the bytes into place, then list the file."""
        self._out.close()
        summary: FileSummary | None = None
        if self.purpose is None:  # the form sent the file first: validate what was stored
            self._set_purpose(purpose)
            if self._validator is not None:
                with self._fs.open_input_stream(self._tmp) as fh:
                    while chunk := fh.read(CHUNK_BYTES):
                        self._validate(self._validator.feed, chunk)
        if self._validator is not None:
            summary = self._validate(self._validator.close)
        # A rename on local disk; a copy and delete on object stores (readers never see part
        # of an object either way, and no database row names it yet).
        final = storage.filesystem(self.uri)[1]
        self._fs.move(self._tmp, final)
        try:
            with db.session(self.store.root) as s:
                s.add(db.FileRow(id=self.id, tenant=self.tenant, filename=self.filename,
                                 purpose=self.purpose, bytes=self.bytes, uri=self.uri,
                                 data_format=summary.format if summary else None,
                                 rows=summary.rows if summary else None))
        except BaseException:
            self._fs.delete_file(final)  # no row, no bytes
            raise
        return self.store.get(self.id, self.tenant)

    def abort(self) -> None:
        """Drop what was written; the upload leaves nothing behind."""
        try:
            self._out.close()
        finally:
            try:
                self._fs.delete_file(self._tmp)
            except FileNotFoundError:
                pass

    def _validate(self, step: Any, *args: Any) -> Any:
        try:
            return step(*args)
        except DataFormatError as err:
            raise FileRejected(f"{self.filename}: {err}") from None

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self.abort()


def _chunks(content: BinaryIO | bytes | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(content, bytes):
        for start in range(0, len(content), CHUNK_BYTES):
            yield content[start:start + CHUNK_BYTES]
    elif hasattr(content, "read"):
        while chunk := content.read(CHUNK_BYTES):  # type: ignore[union-attr]
            yield chunk
    else:
        yield from content
