"""The key store and the ``maas keys`` / ``maas usage`` CLI on a real SQLite project database (no Ray)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maas_ray.auth import AuthError, Denied, KeyStore, parse_rate
from maas_ray.cli import app


def test_rates_parse_and_bad_ones_name_the_problem() -> None:
    assert (parse_rate("60/min").requests, parse_rate("60/min").window_s) == (60, 60)
    assert parse_rate("10/s").window_s == 1 and parse_rate("5/day").window_s == 86400
    # Unicode digits and out-of-range counts are refused too (issue 14, item 10).
    for bad in ("", "0/min", "ten/min", "5/fortnight", "5", "٣/min", "9999999999/min"):
        with pytest.raises(ValueError, match="N/unit"):
            parse_rate(bad)


def test_keys_verify_revoke_and_are_stored_only_hashed(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    key, secret = store.create("acme", rate="3/min")
    assert store.authenticate(secret).tenant == "acme"
    assert KeyStore(str(tmp_path)).authenticate(secret).id == key.id  # a fresh process verifies the hash
    for wrong in ("", "maas-nope", secret[:-1] + ("a" if secret[-1] != "a" else "b"), secret + "\n"):
        with pytest.raises(AuthError):
            store.authenticate(wrong)
    dump = "\n".join(sqlite3.connect(tmp_path / "maas.db").iterdump())
    assert secret.split("-", 2)[2] not in dump and key.id in dump
    store.revoke(key.id)
    with pytest.raises(AuthError):
        store.authenticate(secret)
    with pytest.raises(KeyError):
        store.revoke("0000000000000000")


def test_fixed_window_rate_limit_and_daily_token_budget(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    key, _ = store.create("acme", rate="2/min", tokens_per_day=100)
    t0 = 1_800_000_000.0  # a minute boundary: 1_800_000_000 = 30_000_000 * 60
    store.admit(key, t0)
    store.admit(key, t0 + 10)
    with pytest.raises(Denied) as denied:
        store.admit(key, t0 + 15)
    assert denied.value.retry_after == 45 and denied.value.code == "rate_limit_exceeded"
    store.admit(key, t0 + 60)  # the next window
    store.record(key, 60, 50, now=t0 + 61)
    with pytest.raises(Denied) as denied:
        store.admit(key, t0 + 125)
    assert denied.value.code == "tokens_per_day_exceeded" and denied.value.retry_after > 0
    [row] = store.usage("acme")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (1, 60, 50)


def test_cli_creates_lists_revokes_and_reports_usage(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"MAAS_HOME": str(tmp_path)}
    r = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--rate", "5/min"], env=env)
    assert r.exit_code == 0, r.output
    [secret] = re.findall(r"^(maas-[0-9a-f]{16}-\S+)$", r.output, re.MULTILINE)  # Ray may log into output
    key = KeyStore(str(tmp_path)).authenticate(secret)
    r = runner.invoke(app, ["keys", "ls"], env=env)
    assert r.exit_code == 0 and key.id[:6] in r.output and secret.split("-", 2)[2] not in r.output
    assert runner.invoke(app, ["keys", "create", "--tenant", "a b"], env=env).exit_code == 2
    assert runner.invoke(app, ["keys", "create", "--tenant", "x", "--rate", "1/week"], env=env).exit_code == 2
    assert runner.invoke(app, ["keys", "revoke", "nope"], env=env).exit_code == 2
    assert runner.invoke(app, ["keys", "revoke", key.id], env=env).exit_code == 0
    writer = KeyStore(str(tmp_path))
    writer.record(key, 7, 3)  # buffered in memory ...
    writer.close()  # ... and written when the process stops serving
    r = runner.invoke(app, ["usage", "--tenant", "acme"], env=env)
    assert r.exit_code == 0 and "acme" in r.output and "7" in r.output


def test_unknown_revoked_and_wrong_keys_cost_the_same_hash(tmp_path: Path, monkeypatch) -> None:
    # Timing would tell which key ids exist if only real ids paid for PBKDF2; count the
    # hashes instead of timing them (a timing test is flaky on a shared machine).
    from maas_ray.auth import keys as keys_module

    store = KeyStore(str(tmp_path))
    live, good = store.create("acme")
    gone, revoked = store.create("acme")
    store.revoke(gone.id)
    hashes: list[bytes] = []
    real_hash = keys_module._hash
    monkeypatch.setattr(keys_module, "_hash", lambda secret, salt: hashes.append(salt) or real_hash(secret, salt))
    wrong = good[:-1] + ("a" if good[-1] != "a" else "b")
    unknown = f"maas-{'0' * 16}-{good.split('-', 2)[2]}"
    for key in (wrong, unknown, revoked):
        hashes.clear()
        with pytest.raises(AuthError, match="invalid or revoked API key"):
            store.authenticate(key)
        assert len(hashes) == 1, key  # one PBKDF2 of the same iterations, whatever the cause
    hashes.clear()
    assert store.authenticate(good).id == live.id and len(hashes) == 1
    assert store.authenticate(good).id == live.id and len(hashes) == 1  # verified: no second hash
    store.revoke(live.id)
    with pytest.raises(AuthError):
        store.authenticate(good)  # revoking through this store forgets its verification at once


def test_failed_checks_are_throttled_per_key_id_and_per_address_before_hashing(tmp_path: Path,
                                                                              monkeypatch) -> None:
    from maas_ray.auth import keys as keys_module
    from maas_ray.auth.guards import FailureThrottle

    clock = [1000.0]
    throttle = FailureThrottle(per_key_id=3, per_address=5, window_s=60, clock=lambda: clock[0])
    store = KeyStore(str(tmp_path))
    victim, good = store.create("acme")
    _, other = store.create("acme")
    store.authenticate(good)  # its owner verified the key before the attack
    hashes: list[int] = []
    real_hash = keys_module._hash
    monkeypatch.setattr(keys_module, "_hash", lambda s, salt: hashes.append(1) or real_hash(s, salt))
    wrong = good[:-1] + ("a" if good[-1] != "a" else "b")

    def attempt(key: str, address: str) -> str:
        try:
            store.authenticate(key, lambda key_id: throttle.check(key_id, address))
            return "ok"
        except AuthError:
            throttle.fail(keys_module.split_key(key)[0], address)
            return "401"
        except Denied as err:
            assert err.code == "too_many_failed_attempts" and 1 <= err.retry_after <= 60
            return "429"

    assert [attempt(wrong, "10.0.0.1") for _ in range(4)] == ["401"] * 3 + ["429"]
    assert len(hashes) == 3  # the refused attempt computed nothing
    assert attempt(wrong, "10.0.0.2") == "429"  # per key id, from any address
    assert attempt(good, "10.0.0.2") == "ok"  # the owner's verified key needs no hash: still served
    assert attempt(other, "10.0.0.1") == "ok"  # another id from the same address
    unknown = f"maas-{'f' * 16}-{'x' * 43}"
    assert [attempt(unknown, "10.0.0.1") for _ in range(3)] == ["401", "401", "429"]  # address: 5 failures
    assert attempt(other, "10.0.0.1") == "ok"  # verified before: no hash, no throttle
    clock[0] += 60  # the next window
    assert attempt(wrong, "10.0.0.1") == "401" and victim.id


def test_concurrency_limit_counts_requests_in_flight_per_key(tmp_path: Path) -> None:
    from maas_ray.auth.guards import ConcurrencyLimit

    key, _ = KeyStore(str(tmp_path)).create("acme", max_concurrent=2)
    limit = ConcurrencyLimit()
    limit.acquire(key)
    limit.acquire(key)
    with pytest.raises(Denied) as denied:
        limit.acquire(key)
    assert denied.value.code == "too_many_concurrent_requests" and denied.value.retry_after == 1
    limit.release(key)
    limit.acquire(key)
    assert limit.inflight(key.id) == 2


def test_a_database_from_before_max_concurrent_keeps_working(tmp_path: Path) -> None:
    # The api_keys table as the first release made it: no max_concurrent column.
    con = sqlite3.connect(tmp_path / "maas.db")
    con.execute("CREATE TABLE api_keys (id VARCHAR(32) NOT NULL PRIMARY KEY, tenant VARCHAR(128) NOT NULL, "
                "salt VARCHAR(64) NOT NULL, hash VARCHAR(128) NOT NULL, display VARCHAR(64) NOT NULL, "
                "rate_limit INTEGER NOT NULL, rate_window_s INTEGER NOT NULL, tokens_per_day BIGINT, "
                "admin BOOLEAN NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT)")
    con.execute("INSERT INTO api_keys VALUES ('00000000000000aa', 'old', '00', 'x', 'maas-00…', 60, 60, "
                "NULL, 0, 1, NULL)")
    con.commit()
    con.close()
    store = KeyStore(str(tmp_path))
    [old] = store.list()
    assert old.tenant == "old" and old.max_concurrent == 16
    made, _ = store.create("new", max_concurrent=3)
    assert {k.id: k.max_concurrent for k in store.list()} == {old.id: 16, made.id: 3}
    with pytest.raises(ValueError, match="between 1 and 100000"):
        store.create("new", max_concurrent=0)
    r = CliRunner().invoke(app, ["keys", "create", "--tenant", "cli", "--max-concurrent", "4"],
                           env={"MAAS_HOME": str(tmp_path)})
    assert r.exit_code == 0 and "concurrent 4" in r.output, r.output
