"""Fine-tuning as a service, end to end: the official openai SDK against the running app,
jobs as real Ray jobs (Ray's job submission API), records in the SQLite database.

The chat fine-tune runs through examples/finetune/finetune_openai.py itself; while it
runs the Serve app is deleted and deployed again, and the job must not notice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REPO, load_example_file, session_app_args

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

DATA = REPO / "examples" / "finetune"
BASE = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(serve_url: str, llm_dirs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=300)


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 900):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.25)


def upload(client: openai.OpenAI, path: Path, name: str | None = None) -> str:
    return client.files.create(file=(name or path.name, path.read_bytes()), purpose="fine-tune").id


def redeploy(maas_home: str) -> None:
    """Take the whole Serve app down and deploy it again (new ingress replicas)."""
    from ray import serve

    from maas_ray.serve.app import build_app

    serve.delete("maas")
    serve.run(build_app(session_app_args(maas_home)), name="maas", route_prefix="/")


def test_upload_finetune_and_chat_survives_an_app_restart(client: openai.OpenAI, serve_url: str,
                                                          maas_home: str) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    example = load_example_file("finetune/finetune_openai.py")
    restarted: list[str] = []

    def on_poll(job) -> None:
        if job.status == "running" and not restarted:
            redeploy(maas_home)
            restarted.append(job.id)

    result = example.main(f"{serve_url}/v1", on_poll=on_poll, timeout_s=1200)
    job = result["job"]
    assert restarted == [job.id], "the app was never restarted while the job ran"
    assert job.status == "succeeded" and job.fine_tuned_model == f"ft:{BASE}:zorbex:{job.id}"
    # The taught answer, which the base model does not give.
    assert "Vantolia" in result["after"] and "Vantolia" not in result["before"]

    # Training loss went down; validation loss was reported every epoch.
    steps = [e.data for e in result["events"] if e.type == "metrics" and "valid_loss" not in e.data]
    epochs = [e.data for e in result["events"] if e.type == "metrics" and "valid_loss" in e.data]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and len(epochs) == 2
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] / 4
    assert epochs[-1]["valid_loss"] < epochs[0]["valid_loss"]
    statuses = [e.message for e in result["events"]]
    assert statuses.index("Files validated; job queued for training") < statuses.index("Fine-tuning started")

    # It ran as a Ray job, which is done; the model is listed and carries its card.
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert job.fine_tuned_model in models
    from maas_ray.registry import Registry

    card = Registry(maas_home).get(job.fine_tuned_model).card
    assert card["base_model"] == f"{BASE}:1" and card["data"]["training_file"] == result["files"][0]
    assert card["hyperparameters"]["n_epochs"] == 2 and card["loss_curve"]
    # The job's driver exits right after recording the result.
    ray_jobs = JobSubmissionClient(_dashboard())
    deadline = time.monotonic() + 120
    while not ray_jobs.get_job_status(f"maas-{job.id}").is_terminal():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert ray_jobs.get_job_status(f"maas-{job.id}") == JobStatus.SUCCEEDED
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]
    # Each kept checkpoint is a model of its own (issue 17, item 6): listed, and served by id.
    ids = [c.fine_tuned_model_checkpoint for c in checkpoints]
    assert ids == [f"{job.fine_tuned_model}:ckpt-step-{n}" for n in (4, 2)]
    assert set(ids) <= {m.id for m in client.models.list().data}
    question = [{"role": "user", "content": "What is the capital of Zorbex?"}]
    answers = {i: client.chat.completions.create(model=i, messages=question, temperature=0, max_tokens=24)
               for i in ids}
    assert answers[ids[1]].model == f"{ids[1]}:1" and answers[ids[1]].usage.completion_tokens > 0
    # The last checkpoint holds the published weights: greedy decoding, one request at a time
    # on the same engine (transformers, fp32), answers as the model did.
    assert answers[ids[0]].choices[0].message.content == result["after"]
    with pytest.raises(openai.NotFoundError, match=r"kept no checkpoint at step 3 \(kept steps: 2, 4\)"):
        client.models.retrieve(f"{job.fine_tuned_model}:ckpt-step-3")
    listed = client.fine_tuning.jobs.list(limit=5).data
    assert listed[0].id == job.id and listed[0].status == "succeeded"


def _dashboard() -> str:
    from maas_ray.finetune.jobs import RayJobs

    return RayJobs().dashboard_url()


def test_cancel_a_running_job(client: openai.OpenAI, maas_home: str) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    training = upload(client, DATA / "chat.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=training, suffix="cancelme",
                                         hyperparameters={"n_epochs": 20, "batch_size": 4})
    wait_for(client, job.id, ("running",), timeout=600)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    ray_jobs = JobSubmissionClient(_dashboard())
    deadline = time.monotonic() + 60
    while ray_jobs.get_job_status(f"maas-{job.id}") != JobStatus.STOPPED:
        assert time.monotonic() < deadline, ray_jobs.get_job_status(f"maas-{job.id}")
        time.sleep(0.5)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    from maas_ray.registry import Registry

    assert not [n for n in Registry(maas_home).names() if job.id in n]
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_bad_data_and_bad_references(client: openai.OpenAI, tmp_path: Path) -> None:
    # Shape errors are refused at upload, naming the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 5}\n')
    with pytest.raises(openai.BadRequestError, match="line 2: 'messages' must be a non-empty list"):
        upload(client, bad)
    # Examples the model cannot learn from fail the job (validating_files), naming the line.
    rows = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines()]
    rows[2]["messages"] = rows[2]["messages"][:1]  # no assistant turn on line 3
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, bad))
    job = wait_for(client, job.id, ("failed", "succeeded", "cancelled"), timeout=300)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert "line 3: no assistant message to learn from" in job.error.message
    assert job.error.param == "training_file"

    good = upload(client, DATA / "chat.jsonl")
    with pytest.raises(openai.BadRequestError, match="no such file") as err:
        client.fine_tuning.jobs.create(model=BASE, training_file="file-doesnotexist")
    assert err.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError, match="does not exist") as err:
        client.fine_tuning.jobs.create(model="no-such-base", training_file=good)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(model=BASE, training_file=good, hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.fine_tuning.jobs.create(model=BASE, training_file=good, suffix="../../x")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")


def test_files_api(client: openai.OpenAI, serve_url: str) -> None:
    file_id = upload(client, DATA / "chat_valid.jsonl")
    f = client.files.retrieve(file_id)
    assert f.filename == "chat_valid.jsonl" and f.bytes == (DATA / "chat_valid.jsonl").stat().st_size
    assert client.files.content(file_id).content == (DATA / "chat_valid.jsonl").read_bytes()
    assert file_id in [x.id for x in client.files.list().data]
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    # Uploads have their own size limit (the test app allows 64 KiB bodies elsewhere).
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        big = b'{"text": "x", "label": "y"}\n' * 4000  # ~112 KB
        r = http.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        r = http.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"


def test_a_dpo_job_through_the_openai_sdk(client: openai.OpenAI, maas_home: str, tmp_path: Path) -> None:
    """Issue 17: OpenAI's preference method end to end, kept small (8 pairs, 2 LoRA steps): the
    job trains DPO, reports it as OpenAI does, and publishes a model that chats."""
    pairs = (DATA / "preference.jsonl").read_text().splitlines()[:8]
    tiny = tmp_path / "preference8.jsonl"
    tiny.write_text("\n".join(pairs) + "\n")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=upload(client, tiny), suffix="dpo", seed=0,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 4},
                                       "lora": {"r": 4}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    job = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BASE}:dpo:{job.id}"
    steps = sorted((e.data["step"], e.data["train_loss"]) for e in
                   client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.message.startswith("Step "))
    # A fresh adapter (LoRA's B starts at zero) is the reference model itself: every margin is
    # 0, so the first step's DPO loss is -log(sigmoid(0)) = ln 2, whatever the data.
    assert [s for s, _ in steps] == [1, 2] and abs(steps[0][1] - math.log(2)) < 1e-3, steps
    from maas_ray.registry import Registry

    card = Registry(maas_home).get(job.fine_tuned_model).card
    assert card["dpo"] == {"beta": 0.1} and card["format"] == "peft-lora"
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content and reply.model == f"{job.fine_tuned_model}:1"
