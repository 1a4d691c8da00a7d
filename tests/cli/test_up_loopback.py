"""`maas up` on loopback keeps Ray's Prometheus endpoint on loopback (issue 14, item 3).

An embedded Ray as `maas up --host 127.0.0.1` starts it, in a process of its own (the
switch is process-wide and the test session's Ray must not see it): its metrics port
listens on 127.0.0.1 only. This guards the Ray internals ``runtime.loopback_node`` relies
on across Ray upgrades.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import time

import psutil, ray
from maas_ray.runtime import loopback_node, ray_session
from tests.conftest import free_port


def listening(port):
    return sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port})


loopback_node()
port = free_port()
with ray_session(None, num_cpus=1, include_dashboard=False, _metrics_export_port=port):
    deadline = time.monotonic() + 60  # the node's agent starts its exporter after ray.init
    while not listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(ray.util.get_node_ip_address())
    print(listening(port))
"""


def test_embedded_ray_on_loopback_serves_metrics_on_loopback_only() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-3:-1] == ["127.0.0.1", "['127.0.0.1']"], out.stdout
