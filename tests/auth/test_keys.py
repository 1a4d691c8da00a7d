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
    KeyStore(str(tmp_path)).record(key, 7, 3)
    r = runner.invoke(app, ["usage", "--tenant", "acme"], env=env)
    assert r.exit_code == 0 and "acme" in r.output and "7" in r.output
