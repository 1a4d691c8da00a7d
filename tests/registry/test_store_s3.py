"""Publishing on an ``s3://`` storage root (a real S3 server over HTTP, moto's server mode):
concurrent publishers of one name each get a version of their own (issue 14, item 12)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from s3_server import S3Server  # noqa: E402

from maas_ray.registry import Registry  # noqa: E402

PUBLISHERS = 8


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with S3Server(bucket="maas-registry") as server:
        mp = pytest.MonkeyPatch()
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.setenv("MAAS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield f"s3://{server.bucket}/home"
        mp.undo()


def test_concurrent_publishers_of_one_name_never_share_a_version(s3_root: str, tmp_path: Path) -> None:
    sources = []
    for i in range(PUBLISHERS):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "weights.bin").write_bytes(f"publisher {i} ".encode() * (1000 + i))
        sources.append(src)
    start = threading.Barrier(PUBLISHERS)
    got: dict[int, int] = {}
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            registry = Registry(s3_root)  # each its own client, as separate processes would be
            start.wait()
            got[i] = registry.publish("racy", sources[i], {"task": "regression", "publisher": i}).version
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(got.values()) == list(range(1, PUBLISHERS + 1)), got
    registry = Registry(s3_root)
    for i, version in got.items():
        mv = registry.get(f"racy:{version}")
        assert mv.card["publisher"] == i  # its own card, not another publisher's
        folder = registry.local_dir(mv)  # its own files: checksums match the card
        assert (folder / "weights.bin").read_bytes().startswith(f"publisher {i} ".encode())
        assert json.loads((folder / "card.json").read_text())["publisher"] == i
