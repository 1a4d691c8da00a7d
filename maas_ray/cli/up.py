"""``maas up``: the whole service in the foreground on an embedded (or joined) Ray."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.panel import Panel

from maas_ray.cli.common import AddressOpt, StorageOpt, console, user_errors

if TYPE_CHECKING:
    import psutil

# From the first Ctrl-C to exit with every process gone, even when the orderly stop
# stalls (a loaded machine, a hung actor); under the 10 s a user waits before
# reaching for kill -9.
STOP_DEADLINE_S = 8.0
# How long in-flight requests may finish before Ray goes down. serve.shutdown()
# alone waits up to 30 s, and each replica drains for up to 20 s.
DRAIN_S = 3.0


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
    llm_engine: Annotated[str, typer.Option(
        help="Chat engine: auto (llama.cpp for models with GGUF weights on CPU, else "
        "transformers), transformers (serves LoRA fine-tunes as adapters on one base), "
        "llama.cpp.")] = "auto",
) -> None:
    """Start Ray (embedded unless --address), the maas app, and serve until Ctrl-C.

    Example: maas up --port 8000, then curl http://127.0.0.1:8000/v1/models
    """
    from ray import serve

    from maas_ray import storage as st
    from maas_ray.runtime import joins, loopback_node, quiet_ray_data, ray_session
    from maas_ray.serve.app import build_app
    from maas_ray.serve.settings import AppArgs, is_loopback

    if auth not in ("auto", "on", "off"):
        raise typer.BadParameter(f"{auth!r}: expected auto, on or off", param_hint="--auth")
    if llm_engine not in ("auto", "transformers", "llama.cpp"):
        raise typer.BadParameter(f"{llm_engine!r}: expected auto, transformers or llama.cpp",
                                 param_hint="--llm-engine")
    root = st.storage_root(storage)
    app_args = AppArgs(storage=root, auth=auth, http_host=host,  # type: ignore[arg-type]
                       llm={"engine": llm_engine})
    os.environ["MAAS_HOME"] = root  # training jobs started from here use the same root
    if not joins(address):
        # Ray's metrics agent listens on every interface unless its node is on loopback:
        # serving on loopback, the embedded Ray is a loopback node too.
        metrics_bind = "0.0.0.0"
        if is_loopback(host):
            loopback_node()
            metrics_bind = "127.0.0.1"
        for flag, bind, number in (("--port", host, port), ("--metrics-port", metrics_bind, metrics_port)):
            if not _port_free(bind, number):
                raise typer.BadParameter(f"port {number} is in use; choose another", param_hint=flag)
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
    with _Stopper() as stopper, ray_session(address, **{k: v for k, v in init.items() if v is not None}):
        stopper.install()  # after ray.init, which sets a SIGTERM handler of its own
        quiet_ray_data()
        try:
            serve.start(http_options={"host": host, "port": port})
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
                "Ctrl-C stops everything (a second Ctrl-C at once).", title="maas_ray"))
            threading.Event().wait()  # until Ctrl-C or SIGTERM raises KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        finally:
            stopper.begin()
            console.print("stopping... (Ctrl-C again to force)")
            _stop_serve(DRAIN_S)
    # Every process this command started is gone. Python's own teardown (unloading
    # torch & co.) has nothing left to do but takes 1-2 s, more on a busy machine,
    # out of the 10 s a Ctrl-C may take.
    _exit(0)


class _Stopper:
    """How ``maas up`` stops: in order on the first signal, at once on the second.

    The first SIGINT (Ctrl-C) or SIGTERM raises KeyboardInterrupt in the main thread;
    Serve then drains for ``DRAIN_S`` and Ray shuts down (``ray_session``). A second
    signal, or ``STOP_DEADLINE_S`` after the first, SIGKILLs every process of this
    Ray (``node_processes``; nothing else) and exits: 128 + signal for a second
    signal, 0 at the deadline (the user asked to stop, and everything stopped).
    """

    def __init__(self) -> None:
        self._stopping = False
        self._procs: list[psutil.Process] = []  # the Ray's processes when the stop began
        self._timer: threading.Timer | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _Stopper:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._timer:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def install(self) -> None:
        """Handle SIGINT and SIGTERM, except one the parent set to be ignored."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if previous is not signal.SIG_IGN:
                self._previous.setdefault(sig, previous)
                signal.signal(sig, self._on_signal)

    def begin(self) -> None:
        """The stop has begun: from now on a signal, or the deadline, forces it."""
        if self._stopping:
            return
        self._stopping = True
        from maas_ray.runtime import node_processes

        self._procs = node_processes()
        self._timer = threading.Timer(STOP_DEADLINE_S, self._force,
                                      (f"not stopped {STOP_DEADLINE_S:.0f} s after the signal", 0))
        self._timer.daemon = True
        self._timer.start()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            self.begin()
            raise KeyboardInterrupt
        self._force(f"{signal.Signals(signum).name} again", 128 + signum)

    def _force(self, why: str, code: int) -> NoReturn:
        """Kill this Ray's processes and exit now, wherever the main thread is."""
        from maas_ray.runtime import node_processes, stop_processes

        try:
            console.print(f"{why}: killing the local Ray's processes")
            procs = self._procs + node_processes()
        except Exception:  # noqa: BLE001 - the main thread may be tearing Ray down right now
            procs = self._procs
        stop_processes(procs, grace_s=0)
        # Not sys.exit: the main thread may sit in ray.shutdown(), and Ray's atexit
        # hook would wait for the lock it holds.
        _exit(code)


def _exit(code: int) -> NoReturn:
    """Exit now, output flushed, without Python's teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_serve(timeout_s: float) -> None:
    """``serve.shutdown()`` bounded by ``timeout_s`` rather than Serve's 30 s.

    Replicas drain in-flight requests meanwhile; what is still running after that is
    cut off when Ray shuts down (an embedded Ray) or by Serve itself (a joined cluster).
    ``serve.shutdown()`` has no timeout argument; its client's ``shutdown`` does
    (internal, as of Ray 2.60).
    """
    from ray.serve import context

    try:
        client = context._get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            client.shutdown(timeout_s=timeout_s)
        context._disconnect()
    except Exception as err:  # noqa: BLE001 - stopping goes on whatever Serve says
        console.print(f"Serve did not stop cleanly ({err}); stopping Ray")


def _auth_hint(app_args: object, host: str) -> str:
    """Whether keys are required, and how to turn them on when they are not."""
    if app_args.auth_enabled():  # type: ignore[attr-defined]
        return ("  API keys   required: maas keys create --tenant NAME, then send "
                "'Authorization: Bearer <key>'")
    return (f"  API keys   off (listening on {host} only). Turn them on with --auth on "
            "(or any non-loopback --host) after `maas keys create --tenant NAME`")


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    With SO_REUSEADDR, as servers bind (uvicorn, Ray's metrics agent): a port whose
    only sockets are in TIME_WAIT (a closed connection, e.g. the last Prometheus
    scrape) is free, a listening socket still is not.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
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
