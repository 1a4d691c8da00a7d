"""Credentials reach a fine-tune job without being in its environment, which Ray's
dashboard shows to anyone (issue 14, item 11): a real Ray job through the real job API."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import ray

from maas_ray import job_secrets

pytestmark = [pytest.mark.integration]

SECRET = "s3cr3t-" + uuid.uuid4().hex
DB_URL = "postgresql://maas:pw-" + uuid.uuid4().hex + "@db.invalid/maas"


@ray.remote(num_cpus=0)
def _read_in_worker() -> tuple[str | None, str | None]:
    job_secrets.load()
    import os

    return os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("MAAS_DATABASE_URL")


def test_job_env_carries_a_reference_and_workers_read_the_secrets(ray_session: None, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MAAS_DATABASE_URL", DB_URL)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env = job_secrets.job_env()
    assert SECRET not in json.dumps(env) and DB_URL not in json.dumps(env)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"  # where to connect is not secret
    got = ray.get(_read_in_worker.options(runtime_env={"env_vars": env}).remote())
    assert got == (SECRET, DB_URL)


def test_a_submitted_job_shows_no_secret_and_its_entry_is_deleted_at_the_end(
        ray_session: None, maas_home: str, monkeypatch) -> None:
    from maas_ray.finetune.jobs import RayJobs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    jobs = RayJobs()
    job_id = "ftjob-" + uuid.uuid4().hex[:16]  # no such job: the runner starts, reads its secrets, ends
    ray_job = jobs.submit(job_id, maas_home)
    deadline = time.monotonic() + 120
    while (status := jobs.status(ray_job)[0]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(0.5)
    info = jobs.client().get_job_info(ray_job)
    ref = info.runtime_env["env_vars"][job_secrets.REF_ENV]
    # What the dashboard serves about the job, as a viewer would fetch it.
    client = jobs.client()  # its headers carry the cluster's token, as a viewer's browser would
    shown = httpx.get(f"{jobs.dashboard_url()}/api/jobs/{ray_job}", headers=client._headers, timeout=30).text
    assert ref in shown and SECRET not in shown
    assert "no such job" in client.get_job_logs(ray_job)  # it ran, and got as far as the database
    assert job_secrets._Kv()._get(ref.encode()) is None  # the runner deleted the entry
