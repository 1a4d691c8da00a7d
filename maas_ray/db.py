"""The project database: uploaded files, fine-tuning jobs, their events and checkpoints, batches.

SQLite under the storage root by default (``{storage}/maas.db``); any SQLAlchemy
URL in ``$MAAS_DATABASE_URL`` instead (``postgresql://...`` for a cluster, where
several nodes write and the storage root may be an object store that cannot
hold a SQLite file). Tables are created on first use; later issues add their
own tables to the same :data:`Base`. A column added to an existing table must be
nullable or have a ``server_default``: the first process that opens an older
database adds it (:func:`add_missing_columns`), so old databases keep working.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (JSON, BigInteger, Float, ForeignKey, Integer, String, Text, create_engine,
                        event, inspect)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from maas_ray import job_secrets, storage

URL_ENV = "MAAS_DATABASE_URL"


class DatabaseConfigError(RuntimeError):
    """No usable database for this storage root."""


def database_url(storage_root: str | None = None) -> str:
    """``$MAAS_DATABASE_URL``, else a SQLite file under a local storage root."""
    job_secrets.load()  # a fine-tune job gets the URL this way, not in its environment
    url = os.environ.get(URL_ENV)
    if url:
        return url
    root = storage.storage_root(storage_root)
    if not storage.is_local(root):
        raise DatabaseConfigError(
            f"storage root {root} is an object store, which cannot hold the SQLite database: "
            f"set {URL_ENV} (e.g. postgresql://user:pass@host/maas)")
    path = storage.local_path(root)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'maas.db'}"


class Base(DeclarativeBase):
    pass


def now() -> int:
    return int(time.time())


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True, default="default")
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # Lists are newest first: seconds alone cannot order rows made in one second.
    created_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)
    uri: Mapped[str] = mapped_column(Text)
    data_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)


class JobRow(Base):
    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True, default="default")
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    ray_job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    created_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class EventRow(Base):
    __tablename__ = "fine_tuning_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"),
                                        index=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "fine_tuning_checkpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"),
                                        index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    uri: Mapped[str] = mapped_column(Text)


class BatchRow(Base):
    """A Batch API batch (``/v1/batches``, :mod:`maas_ray.batches`)."""

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True, default="default")
    status: Mapped[str] = mapped_column(String(32), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # how it runs: engines, workers, batch sizes
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the client's metadata
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    ray_job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    created_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)
    # When it entered each later status (OpenAI's *_at fields); None until it does.
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


@functools.lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    """One engine per URL per process; tables created on first use."""
    if url.startswith("sqlite"):
        # Several processes (ingress replicas, job drivers, the CLI) share the file:
        # WAL lets readers run beside one writer; writers wait instead of failing.
        eng = create_engine(url, connect_args={"timeout": 30},
                            json_serializer=lambda o: json.dumps(o, default=str))

        @event.listens_for(eng, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        eng = create_engine(url, pool_pre_ping=True,
                            json_serializer=lambda o: json.dumps(o, default=str))
    Base.metadata.create_all(eng)
    add_missing_columns(eng)
    return eng


def add_missing_columns(eng: Engine) -> list[str]:
    """Add the columns this version declares that an existing table lacks; return them as
    ``table.column``. ``create_all`` makes missing tables but never alters existing ones."""
    added = []
    for table in Base.metadata.sorted_tables:
        inspector = inspect(eng)  # fresh: another process may have migrated meanwhile
        if not inspector.has_table(table.name):
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable and column.server_default is None:
                raise DatabaseConfigError(
                    f"table {table.name} lacks column {column.name}, which has no server default "
                    "to add it with: give it one (server_default=...) or make it nullable")
            quote = eng.dialect.identifier_preparer.quote
            ddl = f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} " \
                  f"{column.type.compile(dialect=eng.dialect)}"
            if column.server_default is not None:
                ddl += f" DEFAULT {column.server_default.arg.text}"  # type: ignore[attr-defined]
            if not column.nullable:
                ddl += " NOT NULL"
            try:
                with eng.begin() as conn:
                    conn.exec_driver_sql(ddl)
            except DBAPIError:  # a concurrent process added it first
                if column.name not in {c["name"] for c in inspect(eng).get_columns(table.name)}:
                    raise
            added.append(f"{table.name}.{column.name}")
    return added


@contextmanager
def session(storage_root: str | None = None) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on error."""
    factory = sessionmaker(engine(database_url(storage_root)), expire_on_commit=False)
    with factory.begin() as s:
        yield s
