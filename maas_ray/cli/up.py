"""``maas up``: the whole service in the foreground on an embedded (or joined) Ray."""

from __future__ import annotations

import os
import signal
import threading
from typing import Annotated

import typer
from rich.panel import Panel

from maas_ray.cli.common import AddressOpt, StorageOpt, console, user_errors


@user_errors
def up(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    metrics_port: Annotated[int, typer.Option(
        help="Prometheus metrics port of the embedded Ray (Ray's metrics_export_port).")] = 8080,
    storage: StorageOpt = None,
    address: AddressOpt = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for an embedded Ray [default: all].")] = None,
    import_base: Annotated[bool, typer.Option(
        help="Import the offline base models (SmolLM2, MiniLM) if the registry lacks them.")] = True,
    auth: Annotated[str, typer.Option(
        help="API keys on /v1 and /v2: auto (on unless --host is loopback), on, off.")] = "auto",
) -> None:
    """Start Ray (embedded unless --address), the maas app, and serve until Ctrl-C.

    Example: maas up --port 8000, then curl http://127.0.0.1:8000/v1/models
    """
    from ray import serve

    from maas_ray import storage as st
    from maas_ray.runtime import joins, quiet_ray_data, ray_session
    from maas_ray.serve.app import build_app
    from maas_ray.serve.settings import AppArgs

    if auth not in ("auto", "on", "off"):
        raise typer.BadParameter(f"{auth!r}: expected auto, on or off", param_hint="--auth")
    root = st.storage_root(storage)
    app_args = AppArgs(storage=root, auth=auth, http_host=host)  # type: ignore[arg-type]
    os.environ["MAAS_HOME"] = root  # training jobs started from here use the same root
    if not joins(address) and not _port_free(host, metrics_port):
        raise typer.BadParameter(f"port {metrics_port} is in use; choose another", param_hint="--metrics-port")
    if import_base:
        from maas_ray.cli.progress import import_progress
        from maas_ray.registry import Registry
        from maas_ray.registry.importer import BASE_MODELS, ensure_base_models

        registry = Registry(root)
        with import_progress(sum(1 for n in BASE_MODELS if not registry.versions(n))) as progress:
            versions = ensure_base_models(registry, progress=progress)
        for mv in versions:
            console.print(f"base model {mv.id} ({mv.task})")
    init: dict = {} if joins(address) else {
        "_metrics_export_port": metrics_port, "num_cpus": num_cpus,
        # The dashboard hosts Ray's job server, which fine-tuning jobs run through.
        "include_dashboard": True}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ray_session(address, **{k: v for k, v in init.items() if v is not None}):
        quiet_ray_data()
        serve.start(http_options={"host": host, "port": port})
        try:
            with console.status("deploying the maas application...", spinner="dots"):
                serve.run(build_app(app_args), name="maas", route_prefix="/")
            base = f"http://{host}:{port}"
            metrics_url = f"http://{host}:{_metrics_port(metrics_port)}/metrics"
            console.print(Panel.fit(
                f"[bold]maas is up[/] — storage {root}\n"
                f"  API        {base}/v1/models   (OpenAI-compatible)\n"
                f"  OIP        {base}/v2/models/{{name}}/infer\n"
                f"  docs       {base}/docs\n"
                f"  health     {base}/healthz\n"
                f"  console    {base}/\n"
                f"  metrics    {metrics_url}   (Prometheus)\n\n"
                f"  curl {base}/v1/models\n"
                "  maas train examples/regression/spec.yaml   # in another shell\n"
                f"  curl -s {base}/v1/models/diabetes-linear/predict -H 'content-type: application/json' \\\n"
                "       -d '{\"inputs\": [[59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.86, 87]]}'\n\n"
                f"{_auth_hint(app_args, host)}\n\n"
                "Ctrl-C stops everything.", title="maas_ray"))
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            console.print("stopping...")
            serve.shutdown()


def _auth_hint(app_args: object, host: str) -> str:
    """Whether keys are required, and how to turn them on when they are not."""
    if app_args.auth_enabled():  # type: ignore[attr-defined]
        return ("  API keys   required: maas keys create --tenant NAME, then send "
                "'Authorization: Bearer <key>'")
    return (f"  API keys   off (listening on {host} only). Turn them on with --auth on "
            "(or any non-loopback --host) after `maas keys create --tenant NAME`")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", port))
        except OSError:
            return False
    return True


def _metrics_port(requested: int) -> int:
    """The Prometheus port of this node's Ray (a joined cluster chose its own)."""
    import ray

    here = ray.util.get_node_ip_address()
    ports = [n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")
             and n.get("NodeManagerAddress") == here]
    return int(ports[0]) if ports and ports[0] else requested
