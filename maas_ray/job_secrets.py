"""Credentials for Ray jobs, passed outside the job's environment.

Ray shows a job's runtime environment, ``env_vars`` included, to anyone who can open
the dashboard or list jobs. So a fine-tune job gets no credentials in its environment:
the submitter puts them in the cluster's internal key-value store (the GCS, which the
dashboard does not show) under a random name, and the job's environment carries only
that name (``MAAS_SECRETS_REF``). Every process of the job (the driver, Ray Train
workers, Ray Data tasks) reads them back on first use of storage or the database
(:func:`load`, called by :func:`maas_ray.storage.filesystem` and
:func:`maas_ray.db.database_url`); the runner deletes the entry when the job ends.

Who can reach the GCS can read the entry, as they could run code on the cluster anyway;
what changes is that a dashboard viewer or a ``ray job list`` no longer sees secrets.
This module imports nothing from maas_ray: storage and db call into it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading

logger = logging.getLogger(__name__)

# Values that grant access: never in a job's environment.
SECRET_ENVS = ("MAAS_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Where to connect, not secret: these still travel in the job's environment.
PLAIN_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
REF_ENV = "MAAS_SECRETS_REF"
GCS_ENV = "MAAS_RAY_GCS"  # set by the submitter: the cluster whose GCS holds the entry
NAMESPACE = b"maas_secrets"

_loaded: set[str] = set()
_lock = threading.Lock()


class _Kv:
    """The GCS key-value store: through the connected Ray, else a client of ``address``
    (a job's driver reads its secrets before it connects, to open the database)."""

    def __init__(self, address: str | None = None) -> None:
        import ray

        if ray.is_initialized():
            from ray.experimental import internal_kv

            self._get = lambda k: internal_kv._internal_kv_get(k, namespace=NAMESPACE)
            self._put = lambda k, v: internal_kv._internal_kv_put(k, v, namespace=NAMESPACE)
            self._del = lambda k: internal_kv._internal_kv_del(k, namespace=NAMESPACE)
            return
        if not address:
            raise RuntimeError("no Ray cluster to read the job's secrets from "
                               f"(neither a connected Ray nor ${GCS_ENV})")
        from ray._raylet import GcsClient

        client = GcsClient(address=address)
        self._get = lambda k: client.internal_kv_get(k, NAMESPACE)
        self._put = lambda k, v: client.internal_kv_put(k, v, True, NAMESPACE)
        self._del = lambda k: client.internal_kv_del(k, False, NAMESPACE)


def job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a job gets from its submitter: the plain settings by value and,
    when there are credentials, only the name of their entry in the GCS.

    Credentials are passed only by a submitter connected to Ray (a service replica); a
    CLI that submits through the dashboard's HTTP API passes none, and the cluster's own
    environment (node variables, instance roles) must provide them.
    """
    import ray

    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in PLAIN_ENVS if environ.get(k)}
    found = {k: environ[k] for k in SECRET_ENVS if environ.get(k)}
    if found and ray.is_initialized():
        ref = secrets.token_hex(16)
        _Kv()._put(ref.encode(), json.dumps(found).encode())
        env[REF_ENV] = ref
    elif found:
        logger.info("not connected to Ray: %s are not passed to the job; the cluster's "
                    "environment must provide them", ", ".join(sorted(found)))
    return env


def load() -> None:
    """Put this job's credentials into ``os.environ`` (once per process; values already
    set win). A no-op outside a job that was given some."""
    ref = os.environ.get(REF_ENV)
    if not ref or ref in _loaded:
        return
    with _lock:
        if ref in _loaded:
            return
        raw = _Kv(os.environ.get(GCS_ENV))._get(ref.encode())
        if raw is None:
            raise RuntimeError(f"the credentials of this job ({REF_ENV}={ref}) are gone from the "
                               "cluster: the job ended or the cluster restarted; resubmit it")
        for key, value in json.loads(raw).items():
            os.environ.setdefault(key, value)
        _loaded.add(ref)


def drop() -> None:
    """Delete this job's entry (its runner calls this when the job ends)."""
    ref = os.environ.get(REF_ENV)
    if ref:
        try:
            _Kv(os.environ.get(GCS_ENV))._del(ref.encode())
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            logger.warning("could not delete the job's credentials entry %s", ref)
