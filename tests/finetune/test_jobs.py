"""Files and job records on a real SQLite database (no Ray): validation, tenants,
pagination, cancel, and reconciling with a Ray job status."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from maas_ray import db
from maas_ray.config.finetune import FineTuneSpec
from maas_ray.finetune.files import FileNotFound, FileRejected, FileStore
from maas_ray.finetune.jobs import JobConflict, JobRejected, JobService, RayJobs, fine_tuned_name

CHAT = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'


@pytest.fixture()
def root(tmp_path: Path, llm_home: str) -> str:
    """A fresh storage root whose registry links the session's base models."""
    (tmp_path / "models").mkdir()
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        (tmp_path / "models" / name).symlink_to(Path(llm_home) / "models" / name)
    return str(tmp_path)


class FakeRay(RayJobs):
    """Stands in for the job server only where these tests need a Ray job's status."""

    def __init__(self, status: tuple[str | None, str]) -> None:
        super().__init__()
        self._status, self.stopped = status, []

    def status(self, ray_job_id: str) -> tuple[str | None, str]:
        return self._status

    def stop(self, ray_job_id: str) -> None:
        self.stopped.append(ray_job_id)


def test_files_round_trip_and_stay_with_their_tenant(root: str) -> None:
    store = FileStore(root)
    f = store.create("../../etc/chat.jsonl", CHAT * 3, "fine-tune", tenant="acme")
    assert f.filename == "chat.jsonl" and f.bytes == len(CHAT) * 3 and f.data_format == "chat"
    assert b"".join(store.open(f.id, "acme")) == CHAT * 3
    assert [x.id for x in store.list("acme")] == [f.id]
    assert store.list("other") == []
    with pytest.raises(FileNotFound):
        store.get(f.id, "other")
    store.delete(f.id, "acme")
    with pytest.raises(FileNotFound):
        store.get(f.id, "acme")
    assert not list((Path(root) / "files").iterdir())


@pytest.mark.parametrize("name, data, purpose, expected", [
    ("x.jsonl", CHAT + b'{"messages": "no"}\n', "fine-tune", "line 2: 'messages' must be a non-empty list"),
    ("x.jsonl", b"\xff\xfe", "fine-tune", "not UTF-8"),
    ("x.csv", CHAT, "fine-tune", "must be JSONL"),
    ("x.jsonl", CHAT, "nonsense", "purpose must be one of"),
])
def test_bad_uploads_are_rejected_and_not_stored(root: str, name: str, data: bytes, purpose: str,
                                                  expected: str) -> None:
    with pytest.raises(FileRejected, match=expected):
        FileStore(root).create(name, data, purpose)
    assert FileStore(root).list() == []


def test_job_creation_checks_references(root: str) -> None:
    files, jobs = FileStore(root), JobService(root)
    chat = files.create("c.jsonl", CHAT, "fine-tune")
    topics = files.create("t.jsonl", b'{"text": "a", "label": "x"}\n', "fine-tune")
    cases = [
        (dict(base_model="no-such-model", training_file=chat.id), "model", "does not exist"),
        (dict(base_model="smollm2-135m-instruct", training_file="file-nope"), "training_file", "no such file"),
        (dict(base_model="smollm2-135m-instruct", training_file=chat.id, validation_file="file-x"),
         "validation_file", "no such file"),
        (dict(base_model="smollm2-135m-instruct", training_file=topics.id), "training_file",
         "classification format, but a chat base model needs chat or completion"),
        (dict(base_model="all-minilm-l6-v2", training_file=chat.id), "training_file", "needs classification"),
    ]
    for fields, param, message in cases:
        with pytest.raises(JobRejected, match=message) as err:
            jobs.create(FineTuneSpec(**fields), submit=False)
        assert err.value.param == param
    with pytest.raises(JobRejected):  # another tenant's file does not exist for this one
        jobs.create(FineTuneSpec(base_model="smollm2-135m-instruct", training_file=chat.id),
                    tenant="other", submit=False)
    assert jobs.list()[0] == []


def test_jobs_list_newest_first_with_pages_events_and_cancel(root: str) -> None:
    files, jobs = FileStore(root), JobService(root, FakeRay(("RUNNING", "")))
    chat = files.create("c.jsonl", CHAT, "fine-tune")
    spec = FineTuneSpec(base_model="smollm2-135m-instruct", training_file=chat.id, suffix="s")
    made = [jobs.create(spec, submit=False)["id"] for _ in range(5)]
    page1, more1 = jobs.list(limit=3)
    page2, more2 = jobs.list(after=page1[-1]["id"], limit=3)
    assert [j["id"] for j in page1 + page2] == made[::-1] and more1 and not more2
    job = jobs.get(made[0])
    assert job["status"] == "validating_files" and job["object"] == "fine_tuning.job"
    assert job["seed"] is not None and job["hyperparameters"]["n_epochs"] == 3
    assert jobs.list(tenant="other")[0] == []

    cancelled = jobs.cancel(made[0])
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    with pytest.raises(JobConflict, match="already cancelled"):
        jobs.cancel(made[0])
    events, _ = jobs.events(made[0])
    assert [e["message"] for e in events][:1] == ["Job cancelled by request"]
    assert fine_tuned_name("smollm2-135m-instruct:1", "s", "ftjob-1") == "ft:smollm2-135m-instruct:s:ftjob-1"


@pytest.mark.parametrize("ray_status, expected", [
    (("FAILED", "driver OOM-killed"), "failed"),
    (("STOPPED", ""), "cancelled"),
    (("SUCCEEDED", ""), "failed"),   # exited without recording a result
    (("RUNNING", ""), "validating_files"),
    ((None, "Job maas-x does not exist"), "failed"),
    ((None, "connection refused"), "validating_files"),  # dashboard away: leave it
])
def test_reading_a_job_reconciles_it_with_ray(root: str, ray_status, expected: str) -> None:
    files = FileStore(root)
    chat = files.create("c.jsonl", CHAT, "fine-tune")
    jobs = JobService(root, FakeRay(ray_status))
    job_id = jobs.create(FineTuneSpec(base_model="smollm2-135m-instruct", training_file=chat.id),
                         submit=False)["id"]
    with db.session(root) as s:
        s.get(db.JobRow, job_id).ray_job_id = "maas-x"
    job = jobs.get(job_id)
    assert job["status"] == expected
    if expected == "failed":
        assert job["error"]["message"]


def test_the_database_is_a_real_sqlite_file(root: str) -> None:
    FileStore(root).create("c.jsonl", CHAT, "fine-tune")
    con = sqlite3.connect(Path(root) / "maas.db")
    (count,) = con.execute("select count(*) from files").fetchone()
    assert count == 1
    assert json.loads(json.dumps(db.database_url(root))).startswith("sqlite:///")


def test_object_store_roots_need_a_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(db.URL_ENV, raising=False)
    with pytest.raises(db.DatabaseConfigError, match="MAAS_DATABASE_URL"):
        db.database_url("s3://bucket/maas")


@pytest.mark.parametrize("ray_address", ["local", "auto"])
def test_job_client_is_not_sent_looking_for_a_ray_by_a_vague_ray_address(
        monkeypatch: pytest.MonkeyPatch, ray_address: str) -> None:
    """Ray's client lets $RAY_ADDRESS override the URL it is given; `local` (which replicas of
    an embedded `maas up` inherit) made it search the machine and fail when two Rays ran."""
    import ray.job_submission

    seen: list[str | None] = []

    class Client:
        def __init__(self, address: str) -> None:
            seen.append(os.environ.get("RAY_ADDRESS"))
            self.address = address

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    assert RayJobs("http://127.0.0.1:8265").client().address == "http://127.0.0.1:8265"
    assert seen == [None] and os.environ["RAY_ADDRESS"] == ray_address
