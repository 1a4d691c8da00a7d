"""Fitting a training job to the CPUs a cluster has free, and waiting a bounded time for them.

On a small machine that already serves the app (``maas up`` on a 2-CPU laptop:
its Serve replicas hold ~1.1 CPU) less than one CPU is free, and a Ray request
that cannot be placed waits forever without a word: a Ray Data task asking for
1 CPU stays pending, and Ray Train retries an unplaceable worker group without
end. So a job here sizes its workers to what is free when it is not told
(:data:`AUTO_MAX_CPUS` down to :data:`AUTO_MIN_CPUS` per worker), waits at most
``scaling.resource_wait_s`` for room while saying what it waits for, and then
fails naming what it needs and what is free.

A cluster with an autoscaler is different: only a pending request makes it add
nodes, so there the job does not wait here but lets Ray Train's placement group
ask, bounded by :func:`startup_retries`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

AUTO_MAX_CPUS = 1.0  # an auto-sized worker asks for one core at most (it trains with 1 thread)...
AUTO_MIN_CPUS = 0.25  # ...and waits rather than start on less than a quarter of one
CPU_STEP = 0.05  # auto sizes are multiples of this: stable numbers in events and errors
DATA_CPUS = 0.25  # one Ray Data read task or tokenizer actor; the data step runs one of each
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's; 60 s by default
_EPS = 1e-6  # Ray counts CPUs in 1/10000 units; sums of floats need a little slack


def fmt_cpus(cpus: float) -> str:
    """0.9, 1, 0.35: CPUs as people write them."""
    return f"{cpus:.2f}".rstrip("0").rstrip(".")


class InsufficientResources(RuntimeError):
    """What a job needs did not fit the cluster in time; the message says what and what is free."""


@dataclass(frozen=True)
class ClusterCpus:
    """CPUs of each alive node, as Ray accounts them (logical, fractions allowed)."""

    free: tuple[float, ...]
    total: tuple[float, ...]
    ceiling: float | None = None
    """The most CPUs an autoscaler may grow the cluster to; None when it cannot grow."""

    def fits(self, cpus: float, count: int, now: bool = True) -> bool:
        """Whether ``count`` units of ``cpus`` each fit on the nodes (a unit never spans nodes)."""
        nodes = self.free if now else self.total
        return sum(math.floor(c / cpus + _EPS) for c in nodes) >= count

    def can_grow(self) -> bool:
        return self.ceiling is not None and self.ceiling > sum(self.total) + _EPS

    def could_ever_fit(self, cpus: float, count: int) -> bool:
        if self.can_grow():
            return cpus * count <= (self.ceiling or 0.0) + _EPS
        return self.fits(cpus, count, now=False)

    def describe(self) -> str:
        return f"the cluster has {fmt_cpus(sum(self.free))} CPU free of {fmt_cpus(sum(self.total))}"


def cluster_cpus() -> ClusterCpus:
    """The connected cluster's CPUs per node (the public calls only give sums over nodes)."""
    import ray
    from ray._private import state

    try:
        total = state.total_resources_per_node()
        free = state.available_resources_per_node()
        # Ray leaves a resource out of a node's view when none of it is free.
        view = ClusterCpus(tuple(float(free.get(node, {}).get("CPU", 0.0)) for node in total),
                           tuple(float(r.get("CPU", 0.0)) for r in total.values()))
    except Exception:  # noqa: BLE001 - an older or trimmed Ray: one node holding the sums
        view = ClusterCpus((float(ray.available_resources().get("CPU", 0.0)),),
                           (float(ray.cluster_resources().get("CPU", 0.0)),))
    try:
        most = state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config to read
        most = None
    if most and most.get("CPU"):
        view = ClusterCpus(view.free, view.total, float(most["CPU"]))
    return view


@dataclass(frozen=True)
class Need:
    """``count`` units (workers, data tasks) of ``cpus`` each; ``cpus`` None sizes them to fit."""

    cpus: float | None
    count: int
    label: str = "worker"

    def describe(self) -> str:
        each = (f"{fmt_cpus(self.cpus)} CPU" if self.cpus is not None
                else f"{fmt_cpus(AUTO_MIN_CPUS)} to {fmt_cpus(AUTO_MAX_CPUS)} CPU")
        units = self.label if self.count == 1 else f"{self.label}s"
        return f"needs {each} per {self.label} × {self.count} {units}"

    def size(self, view: ClusterCpus) -> float | None:
        """CPUs per unit that fit the free CPUs now (the most, when auto), or None."""
        if self.cpus is not None:
            return self.cpus if view.fits(self.cpus, self.count) else None
        steps = round((AUTO_MAX_CPUS - AUTO_MIN_CPUS) / CPU_STEP)
        for i in range(steps + 1):
            cpus = round(AUTO_MAX_CPUS - i * CPU_STEP, 4)
            if view.fits(cpus, self.count):
                return cpus
        return None


def wait_for_cpus(need: Need, wait_s: float, on_wait: Callable[[str], None] | None = None,
                  view: Callable[[], ClusterCpus] = cluster_cpus, poll_s: float = 1.0,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> float:
    """CPUs per unit, once ``need`` fits the free CPUs; raises :class:`InsufficientResources`
    at once when the cluster can never hold it, or after ``wait_s`` seconds of waiting.

    ``on_wait`` (default: a warning in the log) hears what the job waits for when the
    wait starts, when what is free changes (at most every 10 s) and once a minute while
    nothing does.
    """
    report = on_wait or _log_wait
    seen = view()
    size = need.size(seen)
    if size is not None:
        return size
    smallest = need.cpus if need.cpus is not None else AUTO_MIN_CPUS
    if not seen.could_ever_fit(smallest, need.count):
        raise InsufficientResources(
            f"Not enough CPU: {need.describe()}; {seen.describe()}, and it can never hold that. "
            "Lower scaling.cpus_per_worker or scaling.num_workers.")
    if seen.can_grow():  # only a pending request makes an autoscaler add nodes: let Ray Train ask
        report(f"Waiting for the autoscaler: {need.describe()}; {seen.describe()}")
        return need.cpus if need.cpus is not None else AUTO_MAX_CPUS
    start = clock()
    said, said_at = "", -math.inf
    while True:
        waited = clock() - start
        text = f"Waiting for free CPUs (up to {wait_s:.0f} s): {need.describe()}; {seen.describe()}"
        gap = clock() - said_at
        if (text != said and gap >= 10.0) or gap >= 60.0:
            report(text)
            said, said_at = text, clock()
        if waited >= wait_s:
            raise InsufficientResources(
                f"Not enough free CPU after waiting {waited:.0f} s: {need.describe()}; "
                f"{seen.describe()}. Free some (other jobs, app replicas) or lower "
                "scaling.cpus_per_worker or scaling.num_workers.")
        sleep(max(0.0, min(poll_s, wait_s - waited)))
        seen = view()
        size = need.size(seen)
        if size is not None:
            logger.info("room for %s after %.1f s", need.describe(), clock() - start)
            return size


def _log_wait(text: str) -> None:
    logger.warning("%s", text)


def startup_retries(wait_s: float) -> int:
    """Ray Train retries a worker group whose placement group is not ready in its start
    timeout, by default without end; this many retries keep the whole wait near ``wait_s``."""
    try:
        timeout_s = float(os.environ.get(START_TIMEOUT_ENV, "60"))
    except ValueError:
        timeout_s = 60.0
    return max(0, math.ceil(wait_s / max(timeout_s, 1.0)) - 1)


def explain_start_failure(err: BaseException, need: Need) -> BaseException:
    """Ray Train's "worker group did not start in time" as :class:`InsufficientResources`
    naming the need and what is free now; any other error as it is."""
    try:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    except ImportError:  # Ray Train v1 has no such error
        return err
    cause = getattr(err, "controller_failure", None) or err.__cause__
    if not isinstance(cause, WorkerGroupStartupTimeoutError):
        return err
    try:
        free = cluster_cpus().describe()
    except Exception:  # noqa: BLE001 - the message matters more than the numbers
        free = "the cluster's free CPUs could not be read"
    explained = InsufficientResources(f"The training workers could not start: {need.describe()}; {free}")
    explained.__cause__ = err
    return explained


def wait_actors_gone(prefix: str, timeout_s: float = 10.0) -> bool:
    """Wait until this driver's actors whose class name starts with ``prefix`` have exited.

    Ray Data drops its actor pool when a dataset is materialized and lets reference
    counting end the actors; their CPUs count as taken until then. Asks the connected
    cluster's GCS (the state API would go looking for "the" Ray on this machine, and
    there may be several). True when none are left, or when the GCS cannot be asked.
    """
    import ray
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            alive = [a for a in state.actors(job_id=job, actor_state_name="ALIVE").values()
                     if str(a.get("ActorClassName", "")).startswith(prefix)]
        except Exception as err:  # noqa: BLE001 - an older or trimmed Ray: nothing to ask
            logger.debug("cannot list actors: %s", err)
            return True
        if not alive:
            return True
        if time.monotonic() > deadline:
            logger.warning("%d %s actor(s) still alive after %.0f s", len(alive), prefix, timeout_s)
            return False
        time.sleep(0.2)
