"""Fine-tuning beside the running app on this machine, as a user does it: plain `maas up`
(an embedded Ray on the machine's real CPUs, the default app config, SmolLM2 on llama.cpp),
the official openai SDK, one small job, and a chat with its result.

On a 2-CPU machine the app's replicas hold ~1.1 CPU. Jobs used to ask Ray for whole CPUs
(a Ray Data read task, a 1-CPU training worker) and stayed queued forever; the shared test
Ray (4 logical CPUs, tests/conftest.py) hid it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from test_entrypoints import stop, wait_for

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
BASE = "smollm2-135m-instruct"


def test_a_job_fits_beside_maas_up_on_this_machines_cpus(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    log_path = tmp_path / "up.log"
    # RAY_ADDRESS=local: a private Ray, never the test session's.
    env = {**os.environ, "MAAS_HOME": str(tmp_path / "home"), "RAY_ADDRESS": "local",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(BIN / "maas"), "up", "--port", str(port), "--metrics-port", str(metrics)],
        cwd=REPO, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200,
                 240, proc, "maas up to answer /healthz")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        data = (REPO / "examples" / "finetune" / "chat.jsonl").read_bytes()  # 16 chats
        training = client.files.create(file=("chat.jsonl", data), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=BASE, training_file=training.id,
                                             hyperparameters={"n_epochs": 1, "batch_size": 8})

        def ended() -> bool:
            return client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed",
                                                                       "cancelled")

        wait_for(ended, 300, proc, f"job {job.id} to end")
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
        assert job.status == "succeeded", f"{job.error}\n" + "\n".join(events)
        # Its worker took what was free (at most 1 CPU), not more than the app left.
        sized = [re.search(r"^Training with 1 worker × ([\d.]+) CPU", m) for m in events]
        cpus = [float(m.group(1)) for m in sized if m]
        assert len(cpus) == 1 and 0.25 <= cpus[0] <= 1, events

        reply = client.chat.completions.create(
            model=job.fine_tuned_model, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of Zorbex?"}])
        assert reply.model == f"{job.fine_tuned_model}:1"  # the version that answered
        assert (reply.choices[0].message.content or "").strip()
    finally:
        stop(proc)
