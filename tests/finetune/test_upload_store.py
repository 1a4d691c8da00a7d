"""Uploads stream into storage with bounded memory, and only a complete, valid one is ever
visible (no Ray: a FileStore on a temporary root). Issue 14, item 4."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from maas_ray.finetune.files import FileRejected, FileStore

LINE = (json.dumps({"messages": [{"role": "user", "content": "q" * 4000},
                                 {"role": "assistant", "content": "a" * 4000}]}) + "\n").encode()


def chunks(total_bytes: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """``total_bytes`` of JSONL in chunks that cut lines anywhere, made as they are asked for."""
    data = LINE * (size // len(LINE) + 2)
    sent = 0
    while sent < total_bytes:
        offset = sent % len(LINE)
        chunk = data[offset:offset + min(size, total_bytes - sent)]
        sent += len(chunk)
        yield chunk


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "files").iterdir()) if (root / "files").exists() else []


def test_memory_per_upload_does_not_grow_with_its_size(tmp_path: Path) -> None:
    """16 MiB of fine-tune data goes through validation and into storage while the Python
    heap peaks at a few chunks: reading the upload whole, as before, peaked past 16 MiB."""
    store = FileStore(str(tmp_path))
    total = 16 * len(LINE) * 128  # whole lines: ~16 MiB
    tracemalloc.start()
    try:
        stored = store.create("big.jsonl", chunks(total), "fine-tune")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (stored.bytes, stored.rows, stored.data_format) == (total, total // len(LINE), "chat")
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.0f} MiB upload"
    assert b"".join(store.open(stored.id)) == LINE * (total // len(LINE))


def test_a_bad_line_in_the_middle_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))

    def with_bad_line() -> Iterator[bytes]:
        yield LINE * 100
        yield b'{"messages": [}\n'
        yield LINE * 100

    with pytest.raises(FileRejected, match=r"x\.jsonl: line 101: not valid JSON"):
        store.create("x.jsonl", with_bad_line(), "fine-tune")
    assert store.list() == [] and leftovers(tmp_path) == []


def test_an_aborted_upload_is_never_visible(tmp_path: Path) -> None:
    """Bytes go to a hidden temporary object; only commit renames it and lists the file."""
    store = FileStore(str(tmp_path))
    with pytest.raises(ConnectionError):
        with store.upload("x.jsonl", "fine-tune") as upload:
            upload.write(LINE * 10)
            assert [name.startswith(".file-") for name in leftovers(tmp_path)] == [True]
            assert store.list() == []
            raise ConnectionError("client went away")
    assert store.list() == [] and leftovers(tmp_path) == []


def test_purpose_after_the_file_is_validated_from_storage(tmp_path: Path) -> None:
    """A form may send ``purpose`` after ``file`` (curl -F does, in the order given): the bytes
    are stored first and validated from storage, in chunks, once the purpose is known."""
    store = FileStore(str(tmp_path))
    with store.upload("x.jsonl", None) as upload:
        upload.write(LINE * 3)
        assert upload.commit("fine-tune").rows == 3
    with pytest.raises(FileRejected, match="line 2: not valid JSON"):
        with store.upload("y.jsonl", None) as upload:
            upload.write(LINE + b"{\n")
            upload.commit("fine-tune")
    with pytest.raises(FileRejected, match="no purpose given"):
        with store.upload("z.jsonl", None) as upload:
            upload.write(LINE)
            upload.commit(None)
    assert len(store.list()) == 1 and leftovers(tmp_path) == [store.list()[0].id]


def test_uploads_on_object_storage_appear_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On ``s3://`` (a real S3 server over HTTP, moto's server mode) the bytes go to a hidden
    key and are moved into place on commit; a rejected upload leaves no key behind."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
    from s3_server import S3Server

    with S3Server(bucket="maas-uploads") as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MAAS_DATABASE_URL", f"sqlite:///{tmp_path}/maas.db")
        store = FileStore(f"s3://{server.bucket}/home")
        stored = store.create("a.jsonl", iter([LINE * 50, LINE * 50]), "fine-tune")
        with pytest.raises(FileRejected, match="line 11: not valid JSON"):
            store.create("b.jsonl", iter([LINE * 10, b"{\n", LINE]), "fine-tune")
        assert [k for k in server.keys("home/files/") if not k.endswith("/")] == [f"home/files/{stored.id}"]
        assert b"".join(store.open(stored.id)) == LINE * 100
