"""A local S3-compatible server (moto's server mode) over real HTTP on 127.0.0.1.

Clients reach it the way they reach MinIO or any S3-compatible store: through
``AWS_ENDPOINT_URL`` and the usual credential variables (:attr:`S3Server.env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from local_cluster import free_ports


class S3Server:
    def __init__(self, bucket: str = "maas-test") -> None:
        self.bucket = bucket
        (self.port,) = free_ports(1)
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._server = None

    def __enter__(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    @contextlib.contextmanager
    def client_env(self) -> Iterator[None]:
        """This process talks to the server (``storage.filesystem`` reads the env)."""
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
