"""Uploaded files (``/v1/files``): content under ``{storage}/files/``, records in the database.

The content is written first (temp name + rename on local disk), the database
row last, so a file is listed only once its bytes are complete; deleting goes
the other way round. Files meant for fine-tuning are validated on upload.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select

from maas_ray import db, storage
from maas_ray.finetune.formats import DataFormatError, FileSummary, validate_lines

PURPOSES = ("fine-tune", "batch", "user_data", "assistants", "evals")
DEFAULT_TENANT = "default"


class FileNotFound(LookupError):
    """No such file (for this tenant)."""


class FileRejected(ValueError):
    """An upload that cannot be stored (bad purpose, name or content)."""


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

    def create(self, filename: str, content: BinaryIO | bytes, purpose: str,
               tenant: str = DEFAULT_TENANT) -> StoredFile:
        """Validate (for ``fine-tune``) and store an upload; raise :class:`FileRejected`."""
        if purpose not in PURPOSES:
            raise FileRejected(f"purpose must be one of {list(PURPOSES)} (got {purpose!r})")
        filename = Path(filename or "upload.jsonl").name[:512]  # never a path
        data = content if isinstance(content, bytes) else content.read()
        summary: FileSummary | None = None
        if purpose == "fine-tune":
            if not filename.endswith(".jsonl"):
                raise FileRejected(f"fine-tune files must be JSONL (*.jsonl), got {filename!r}")
            try:
                summary = validate_lines(io.BytesIO(data))
            except UnicodeDecodeError as err:
                raise FileRejected(f"{filename}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            except DataFormatError as err:
                raise FileRejected(f"{filename}: {err}") from None
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        uri = storage.join(self.files_uri, file_id)
        _write_atomically(uri, data)
        with db.session(self.root) as s:
            s.add(db.FileRow(id=file_id, tenant=tenant, filename=filename, purpose=purpose,
                             bytes=len(data), uri=uri,
                             data_format=summary.format if summary else None,
                             rows=summary.rows if summary else None))
        return self.get(file_id, tenant)

    def get(self, file_id: str, tenant: str = DEFAULT_TENANT) -> StoredFile:
        with db.session(self.root) as s:
            row = s.get(db.FileRow, file_id)
            if row is None or row.tenant != tenant:
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
            if row is None or row.tenant != tenant:
                raise FileNotFound(f"no such file: {file_id!r}")
            uri = row.uri
            s.delete(row)
        fs, path = storage.filesystem(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def _write_atomically(uri: str, data: bytes) -> None:
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        tmp.rename(target)
        return
    # Object stores publish a whole object on close: readers never see half of it.
    fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as fh:
        fh.write(data)

