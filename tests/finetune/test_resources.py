"""Jobs fit the CPUs that are free: auto-sized workers, a bounded wait that says what it waits
for, and a failure that names what was needed and what was free.

The sizing and waiting run against made-up clusters (no Ray, a fake clock); one job runs for
real on the shared Ray with a CPU held, to see the whole path from spec to failed job.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from maas_ray.train.resources import (AUTO_MIN_CPUS, ClusterCpus, InsufficientResources, Need,
                                      startup_retries, wait_for_cpus)
from tests.conftest import REPO

LAPTOP = ClusterCpus(free=(0.9,), total=(2.0,))  # `maas up` on 2 CPUs: the app holds 1.1


@pytest.mark.parametrize("view, need, expected", [
    (LAPTOP, Need(None, 1), 0.9),                                 # what is free, up to 1
    (ClusterCpus((3.5,), (4.0,)), Need(None, 1), 1.0),
    (LAPTOP, Need(None, 2), 0.45),                                # shared between workers
    (ClusterCpus((0.45, 0.45), (1.0, 1.0)), Need(None, 1), 0.45),  # a worker lives on one node
    (ClusterCpus((0.6, 0.3), (1.0, 1.0)), Need(None, 2), 0.3),
    (ClusterCpus((0.2,), (2.0,)), Need(None, 1), None),           # under the floor: wait
    (LAPTOP, Need(1.0, 1), None),                                 # asked for: exactly that
    (LAPTOP, Need(0.5, 1), 0.5),
])
def test_workers_are_sized_to_the_free_cpus(view: ClusterCpus, need: Need, expected: float | None) -> None:
    assert need.size(view) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_wait_is_bounded_says_what_it_waits_for_and_names_the_need() -> None:
    clock, said = FakeClock(), []
    with pytest.raises(InsufficientResources) as err:
        wait_for_cpus(Need(1.0, 1), 30, said.append, view=lambda: ClusterCpus((0.35,), (2.0,)),
                      clock=clock, sleep=clock.sleep)
    assert "needs 1 CPU per worker × 1 worker; the cluster has 0.35 CPU free of 2" in str(err.value)
    assert clock.now == 30
    # Said once when the wait began; nothing changed after, and a minute never passed.
    assert said == ["Waiting for free CPUs (up to 30 s): needs 1 CPU per worker × 1 worker; "
                    "the cluster has 0.35 CPU free of 2"]


def test_the_wait_ends_when_cpus_come_free() -> None:
    clock, said = FakeClock(), []
    views = iter([ClusterCpus((0.1,), (2.0,))] * 15 + [ClusterCpus((0.7,), (2.0,))])
    cpus = wait_for_cpus(Need(None, 1), 600, said.append, view=lambda: next(views),
                         clock=clock, sleep=clock.sleep)
    assert cpus == 0.7 and clock.now == 15
    assert said[0].endswith(f"needs {AUTO_MIN_CPUS} to 1 CPU per worker × 1 worker; "
                            "the cluster has 0.1 CPU free of 2")


def test_a_need_the_cluster_can_never_hold_fails_at_once() -> None:
    clock = FakeClock()
    with pytest.raises(InsufficientResources, match=r"needs 64 CPU per worker × 1 worker; the "
                       r"cluster has 0.9 CPU free of 2, and it can never hold that"):
        wait_for_cpus(Need(64.0, 1), 600, view=lambda: LAPTOP, clock=clock, sleep=clock.sleep)
    with pytest.raises(InsufficientResources, match="2 workers"):  # two of 1.5 on one 2-CPU node
        wait_for_cpus(Need(1.5, 2), 600, view=lambda: ClusterCpus((2.0,), (2.0,)), clock=clock,
                      sleep=clock.sleep)
    assert clock.now == 0


def test_an_autoscaling_cluster_is_left_to_ray_trains_request() -> None:
    said: list[str] = []
    cloud = ClusterCpus((0.0,), (4.0,), ceiling=64.0)
    assert wait_for_cpus(Need(None, 4), 600, said.append, view=lambda: cloud) == 1.0
    assert said[0].startswith("Waiting for the autoscaler: needs")


def test_startup_retries_keep_ray_trains_wait_near_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert [startup_retries(s) for s in (0, 60, 61, 600)] == [0, 0, 1, 9]


@pytest.mark.integration
def test_a_job_that_cannot_fit_fails_after_its_wait_saying_why(ray_session: None, llm_home: str,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker as big as the whole cluster while something holds half a CPU: the job waits
    its 2 s, fails naming the need and what is free, and its tokenizer actor is gone.

    The file goes through Ray Data (read task + tokenizer actor), as a large one does: the
    other jobs' files are small enough for the driver to tokenize."""
    import ray

    from maas_ray.config.finetune import FineTuneSpec
    from maas_ray.finetune.files import FileStore
    from maas_ray.finetune.jobs import JobService
    from maas_ray.finetune.runner import run_job
    from maas_ray.train.resources import fmt_cpus

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m-instruct").symlink_to(
        Path(llm_home) / "models" / "smollm2-135m-instruct")
    root = str(tmp_path)
    data = (REPO / "examples" / "finetune" / "chat.jsonl").read_bytes()
    file_id = FileStore(root).create("chat.jsonl", data, "fine-tune").id
    total = fmt_cpus(ray.cluster_resources()["CPU"])
    spec = FineTuneSpec(base_model="smollm2-135m-instruct", training_file=file_id,
                        scaling={"cpus_per_worker": float(total), "resource_wait_s": 2})

    @ray.remote(num_cpus=0.5)
    class Holder:
        def ready(self) -> bool:
            return True

    monkeypatch.setattr("maas_ray.train.finetune.TOKENIZE_IN_DRIVER_MAX_BYTES", 0)
    holder = Holder.remote()
    jobs = JobService(root)
    try:
        ray.get(holder.ready.remote(), timeout=60)
        job_id = jobs.create(spec, submit=False)["id"]
        started = time.monotonic()
        assert run_job(job_id, root) == 1
        assert time.monotonic() - started < 120
    finally:
        ray.kill(holder)
    job = jobs.get(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "insufficient_resources"
    assert re.search(rf"after waiting 2 s: needs {total} CPU per worker × 1 worker; the cluster has "
                     rf"[\d.]+ CPU free of {total}\.", job["error"]["message"]), job["error"]
    events = [e["message"] for e in jobs.events(job_id, limit=50)[0]]
    assert any(m.startswith(f"Waiting for free CPUs (up to 2 s): needs {total} CPU per worker")
               for m in events), "\n".join(events)
    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    assert not [a["ActorClassName"] for a in alive if "TokenizeLM" in a["ActorClassName"]]
