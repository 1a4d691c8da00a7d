"""Limits counted in memory and settled with the database in batches (issue 15, target 5):
two key stores on one database stand for two ingress replicas; the tolerances tested are
the ones :mod:`maas_ray.auth.ledger` and :mod:`maas_ray.auth.keys` state. The last test
revokes a key behind the auth-on app's back and times how long it keeps working."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from maas_ray.auth import AuthError, Denied, KeyStore
from maas_ray.auth.keys import VERIFIED_TTL_S, NeedsDatabase
from maas_ray.auth.ledger import lease_size
from tests.auth.conftest import bearer
from tests.cluster.local_cluster import wait_until

T0 = 1_800_000_000.0  # a minute boundary, so every admission below falls in one window


def test_replicas_together_never_pass_a_rate_limit(tmp_path: Path) -> None:
    a, b = KeyStore(str(tmp_path), flush_period_s=None), KeyStore(str(tmp_path), flush_period_s=None)
    key, _ = a.create("acme", rate="50/min")
    size = lease_size(50)  # 5: one database claim per 5 requests

    def admit(store: KeyStore) -> bool:
        try:
            store.admit(key, T0 + 1)
            return True
        except Denied as err:
            assert err.code == "rate_limit_exceeded" and err.retry_after == 59
            return False

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(admit, [a, b] * 40))
    # Claims never grant more than the window holds; a lease one replica holds unused is
    # what the other may miss: at most replicas × (lease − 1) short.
    assert 50 - 2 * (size - 1) <= sum(admitted) <= 50, sum(admitted)
    c = KeyStore(str(tmp_path), flush_period_s=None)  # a third replica finds nothing left
    with pytest.raises(Denied):
        c.admit(key, T0 + 2)


def test_a_lease_admits_in_memory_until_it_runs_out(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path), flush_period_s=None)
    key, _ = store.create("acme", rate="30/min")
    with pytest.raises(NeedsDatabase):
        store.admit(key, T0, memory_only=True)  # no lease yet
    store.admit(key, T0)  # claims 3, uses 1
    store.admit(key, T0 + 1, memory_only=True)
    store.admit(key, T0 + 2, memory_only=True)
    with pytest.raises(NeedsDatabase):
        store.admit(key, T0 + 3, memory_only=True)
    with pytest.raises(NeedsDatabase):
        store.admit(key, T0 + 61, memory_only=True)  # the next window needs a new lease
    for i in range(27):
        store.admit(key, T0 + 4 + i / 10)  # the window's other 27
    with pytest.raises(Denied):
        store.admit(key, T0 + 10)
    with pytest.raises(Denied):  # once the window has nothing left, refusing asks no one
        store.admit(key, T0 + 11, memory_only=True)


def test_a_budget_is_passed_by_at_most_what_other_replicas_had_not_flushed(tmp_path: Path) -> None:
    # Flushes by hand (no period): each flush is where a period would end.
    a, b = KeyStore(str(tmp_path), flush_period_s=None), KeyStore(str(tmp_path), flush_period_s=None)
    key, _ = a.create("acme", rate="1000/min", tokens_per_day=100)

    def spend(store: KeyStore, requests: int) -> int:
        """Requests of 10 tokens until ``requests`` are served or the budget refuses one."""
        served = 0
        for i in range(requests):
            try:
                store.admit(key, T0 + i)
            except Denied as err:
                assert err.code == "tokens_per_day_exceeded"
                break
            store.record(key, 4, 6, now=T0 + i)
            served += 1
        return served

    assert spend(a, 5) == 5
    a.ledger.flush()
    assert b.admit(key, T0) == 50  # b reads the total: a's 50 tokens
    assert spend(b, 3) == 3  # 30 tokens b has not flushed: a cannot see them ...
    assert spend(a, 10) == 5  # ... so a spends the 50 it thinks are left
    for store in (b, a, b):  # both written, then both re-read the total: 130
        store.ledger.flush()
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in KeyStore(str(tmp_path)).usage("acme"))
    assert used == 100 + 30  # the budget plus what the other replica had not flushed
    for store in (a, b):
        with pytest.raises(Denied):
            store.admit(key, T0 + 30)


def test_the_days_total_is_read_once_a_period_and_our_own_flushes_still_count(tmp_path: Path) -> None:
    a, b = KeyStore(str(tmp_path), flush_period_s=None), KeyStore(str(tmp_path), flush_period_s=None)
    key, _ = a.create("acme", rate="1000/min", tokens_per_day=100)
    assert a.admit(key, T0) == 100  # read from the database
    a.record(key, 4, 6, now=T0)
    assert a.admit(key, T0 + 0.5, memory_only=True) == 90  # kept total, unwritten usage: no read
    a.ledger.flush()  # our 10 tokens move into the kept total, not out of the count
    assert a.admit(key, T0 + 0.6, memory_only=True) == 90
    b.record(key, 20, 0, now=T0 + 0.6)
    b.ledger.flush()
    assert a.admit(key, T0 + 0.7, memory_only=True) == 90  # b's flush is not seen within the period ...
    with pytest.raises(NeedsDatabase):  # ... and after it the total must be read again
        a.admit(key, T0 + 1.6, memory_only=True)
    assert a.admit(key, T0 + 1.6) == 70


def test_usage_is_written_every_period_and_when_the_store_closes(tmp_path: Path) -> None:
    reader = KeyStore(str(tmp_path), flush_period_s=None)
    key, _ = reader.create("acme")
    periodic = KeyStore(str(tmp_path), flush_period_s=0.2)
    periodic.record(key, 3, 4)
    wait_until(lambda: bool(reader.usage("acme")), 10, "the periodic flush")
    closing = KeyStore(str(tmp_path), flush_period_s=3600)
    closing.record(key, 10, 20)
    assert reader.usage("acme")[0]["requests"] == 1  # an hour's period: still in memory
    closing.close()
    [row] = reader.usage("acme")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (2, 13, 24)
    periodic.close()


def test_a_verified_key_is_trusted_in_memory_only_for_its_ttl(tmp_path: Path) -> None:
    replica = KeyStore(str(tmp_path), verified_ttl_s=0.5)
    admin = KeyStore(str(tmp_path))
    key, secret = admin.create("acme")
    with pytest.raises(NeedsDatabase):
        replica.authenticate(secret, memory_only=True)  # never verified here
    assert replica.authenticate(secret).id == key.id
    assert replica.authenticate(secret, memory_only=True).id == key.id
    admin.revoke(key.id)  # another process's store: this replica still trusts its entry ...
    assert replica.authenticate(secret, memory_only=True).id == key.id
    time.sleep(0.5)  # ... for the rest of its TTL, and not a moment after
    with pytest.raises(AuthError):
        replica.authenticate(secret)


def test_a_key_revoked_elsewhere_stops_working_within_the_ttl(auth_url: str, keys) -> None:
    key, secret = keys.create("revoked-later", rate="1000/min")
    with httpx.Client(timeout=60) as c:
        # Both ingress replicas verify the key (requests spread over them).
        assert all(c.get(f"{auth_url}/v1/models", headers=bearer(secret)).status_code == 200 for _ in range(6))
        keys.revoke(key.id)  # the test process's store, not the replicas'
        time.sleep(VERIFIED_TTL_S)  # what the replicas may still trust the key for; then none does
        assert [c.get(f"{auth_url}/v1/models", headers=bearer(secret)).status_code for _ in range(6)] == [401] * 6
