"""The storage root: one URI under which registry, runs, files and database live.

A plain path means the local disk; ``s3://`` and ``gs://`` URIs go through
pyarrow's filesystems, so a cluster can share one root. Everything that touches
storage goes through :func:`filesystem` so both kinds behave the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from maas_ray import job_secrets

DEFAULT_HOME = "~/.maas"
ENV_VAR = "MAAS_HOME"


def storage_root(explicit: str | None = None) -> str:
    """Resolve the storage root: ``--storage`` beats ``$MAAS_HOME`` beats ``~/.maas``."""
    root = explicit or os.environ.get(ENV_VAR) or DEFAULT_HOME
    if is_local(root):
        return str(Path(root).expanduser().resolve())
    return root.rstrip("/")


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The local path of a local URI (raises for remote ones)."""
    if not is_local(uri):
        raise ValueError(f"{uri!r} is not on the local disk")
    return Path(uri.removeprefix("file://"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a storage URI with ``/``."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri``.

    S3 endpoints and credentials come from the usual environment variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` for S3-compatible servers such as MinIO, ``AWS_REGION``).
    """
    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    job_secrets.load()  # a fine-tune job's credentials come this way, not in its environment
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if uri.startswith("s3://") and endpoint:
        scheme, _, host = endpoint.partition("://")
        fs = pafs.S3FileSystem(
            endpoint_override=(host or endpoint).rstrip("/"),
            scheme=scheme if host else "https",
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            # S3-compatible servers are usually addressed by path, not bucket subdomain.
            force_virtual_addressing=False,
        )
        return fs, uri.removeprefix("s3://").rstrip("/")
    return pafs.FileSystem.from_uri(uri)
