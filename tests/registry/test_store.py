"""Registry: versions appear whole or not at all, numbers never collide."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maas_ray.registry import InvalidModelName, ModelNotFound, ModelRef, Registry, TamperedModel
from maas_ray.registry import store


def _model_dir(tmp_path: Path, payload: bytes = b"weights") -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "model.safetensors").write_bytes(payload)
    (src / "config.json").write_text("{}")
    return src


def test_publish_get_list_remove(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "home"))
    src = _model_dir(tmp_path)
    v1 = reg.publish("m", src, {"task": "regression"})
    v2 = reg.publish("m", src, {"task": "regression"})
    assert (v1.version, v2.version) == (1, 2)
    assert reg.get("m").version == 2 and reg.get("m:1").version == 1
    assert reg.names() == ["m"]
    assert [mv.id for mv in reg.all_versions()] == ["m:1", "m:2"]
    assert v2.card["files"]["model.safetensors"] == store.sha256_file(src / "model.safetensors")
    reg.remove("m:2")
    assert reg.versions("m") == [1]
    # numbers are never reused, even after removal of the latest
    assert reg.publish("m", src, {"task": "regression"}).version in (2, 3)
    reg.remove("m")
    with pytest.raises(ModelNotFound):
        reg.get("m")


def test_unknown_model_and_version(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path))
    with pytest.raises(ModelNotFound, match="does not exist"):
        reg.get("nope")
    reg.publish("m", _model_dir(tmp_path), {})
    with pytest.raises(ModelNotFound, match="no version 7"):
        reg.get("m:7")


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "", "x" * 200, "a b"])
def test_names_cannot_escape_storage(bad: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelRef.parse(bad)


def test_model_ids() -> None:
    assert ModelRef.parse("m:3") == ModelRef("m", 3)
    assert ModelRef.parse("m") == ModelRef("m", None)
    assert ModelRef.parse("ft:smollm2:pirate:ftjob-abc") == ModelRef("ft:smollm2:pirate:ftjob-abc")
    assert ModelRef.parse("ft:smollm2:pirate:ftjob-abc:2").version == 2


def test_failure_midway_leaves_no_visible_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(str(tmp_path / "home"))

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_json", boom)
    with pytest.raises(OSError):
        reg.publish("m", _model_dir(tmp_path), {})
    assert reg.versions("m") == []
    assert not list((tmp_path / "home" / "models" / "m").iterdir())  # temp folder cleaned
    monkeypatch.undo()
    assert reg.publish("m", _model_dir(tmp_path), {}).version == 1


def test_killed_publisher_leaves_no_visible_version(tmp_path: Path) -> None:
    """SIGKILL a publisher while it copies a large file: nothing half-visible."""
    home = tmp_path / "home"
    src = _model_dir(tmp_path, os.urandom(1024))
    code = textwrap.dedent(f"""
        import shutil, sys, time
        from maas_ray.registry import Registry, store
        real_tree = shutil.copytree
        def slow(a, b, **k):
            print("copying", flush=True)
            time.sleep(60)
            return shutil.copy2(a, b, **k)
        def slow_tree(src, dst, **k):
            return real_tree(src, dst, copy_function=slow, **k)
        store.shutil.copytree = slow_tree
        Registry({str(home)!r}).publish("m", __import__("pathlib").Path({str(src)!r}), {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "copying"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    reg = Registry(str(home))
    assert reg.versions("m") == []
    assert reg.names() == []
    assert reg.publish("m", src, {}).version == 1


def _publish_one(home: str, src: str, barrier: mp.Barrier) -> int:
    barrier.wait()
    return Registry(home).publish("m", Path(src), {"task": "x"}).version


def test_concurrent_publishes_get_distinct_versions(tmp_path: Path) -> None:
    src = _model_dir(tmp_path)
    n = 6
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            versions = pool.starmap(_publish_one, [(str(tmp_path / "home"), str(src), barrier)] * n)
    assert sorted(versions) == list(range(1, n + 1))
    assert Registry(str(tmp_path / "home")).versions("m") == list(range(1, n + 1))


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "home"))
    mv = reg.publish("m", _model_dir(tmp_path), {})
    path = reg.local_dir(mv)
    (path / "model.safetensors").write_bytes(b"evil")
    with pytest.raises(TamperedModel, match="model.safetensors"):
        reg.local_dir(reg.get("m"))


def test_card_is_json_with_lineage_fields(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "home"))
    before = time.time()
    mv = reg.publish("m", _model_dir(tmp_path), {"task": "regression", "metrics": {"mse": 1.0}})
    card = json.loads((Path(mv.uri) / "card.json").read_text())
    assert card["name"] == "m" and card["task"] == "regression"
    assert card["created_at"] >= before
