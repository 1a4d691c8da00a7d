"""Keys, rate windows and usage on a real PostgreSQL server (``$MAAS_DATABASE_URL``), the
database a cluster shares: the same atomic counters as SQLite, through Postgres's upsert.

A throwaway server is started from the machine's PostgreSQL binaries on a free loopback
port and stopped through its own ``pg_ctl``; without those binaries the tests skip, saying so.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import free_port

pytest.importorskip("psycopg", reason="psycopg not installed (the postgres/test extra)")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr or done.stdout}")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
    # Not under pytest's tmp folders: their parents are private to us, not to postgres.
    base = Path(tempfile.mkdtemp(prefix="maas-pg-"))
    data, port = base / "data", free_port()
    # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(base, "postgres")
        os.chmod(base, 0o700)
    _run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "maas", "--no-sync"])
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    _run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"])
    try:
        yield f"postgresql+psycopg://maas@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def keys(postgres_url: str, monkeypatch: pytest.MonkeyPatch):
    from maas_ray.auth import KeyStore

    monkeypatch.setenv("MAAS_DATABASE_URL", postgres_url)
    return KeyStore(None)


def test_keys_live_hashed_in_postgres_and_revoke(keys, postgres_url: str) -> None:
    import sqlalchemy as sa

    from maas_ray.auth import AuthError

    key, secret = keys.create("pg-tenant", rate="100/min")
    assert keys.authenticate(secret).id == key.id
    with sa.create_engine(postgres_url).connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM api_keys WHERE id = :id"), {"id": key.id}).all()
    assert len(rows) == 1 and secret.split("-", 2)[2] not in repr(rows)
    keys.revoke(key.id)
    with pytest.raises(AuthError):
        keys.authenticate(secret)


def test_rate_limit_and_usage_counters_are_exact_under_concurrency(keys) -> None:
    from maas_ray.auth import Denied

    key, _ = keys.create("pg-rate", rate="10/hour")

    def admit(_: int) -> bool:
        try:
            keys.admit(key)
            return True
        except Denied:
            return False

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(admit, range(40)))
        list(pool.map(lambda _: keys.record(key, 3, 2), range(50)))
    assert sum(admitted) == 10  # one counter row, updated atomically: never 11, never 9
    [row] = keys.usage("pg-rate")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (50, 150, 100)


def test_an_older_postgres_database_gains_the_new_columns(keys, postgres_url: str) -> None:
    import sqlalchemy as sa

    from maas_ray import db

    key, _ = keys.create("pg-old")
    with sa.create_engine(postgres_url).begin() as conn:  # as a database from before max_concurrent
        conn.execute(sa.text("ALTER TABLE api_keys DROP COLUMN max_concurrent"))
    assert db.add_missing_columns(db.engine(postgres_url)) == ["api_keys.max_concurrent"]
    assert db.add_missing_columns(db.engine(postgres_url)) == []
    assert {k.id: k.max_concurrent for k in keys.list("pg-old")} == {key.id: 16}
