"""Shared fixtures: one local Ray and one storage root for the whole session.

Unit tests use none of these. Integration tests take ``ray_session``; tests that
talk HTTP take ``serve_url`` (one Serve instance on a free loopback port).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# Fewer seconds per Ray Train report; read when a trainer starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every Ray process pushes its metrics to the Prometheus endpoint this often (10 s by
# default, 1 s at the least): tests/serve/test_metrics.py sees its traffic within seconds.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_example_file(relative: str):
    """Import ``examples/{relative}`` under a unique module name."""
    import importlib.util

    name = "example_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """Import ``examples/{name}/run.py``."""
    return load_example_file(f"{name}/run.py")


@pytest.fixture(scope="session")
def maas_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's storage root, exported as MAAS_HOME for code that reads it."""
    root = str(tmp_path_factory.mktemp("maas-home"))
    old = os.environ.get("MAAS_HOME")
    os.environ["MAAS_HOME"] = root
    yield root
    if old is None:
        os.environ.pop("MAAS_HOME", None)
    else:
        os.environ["MAAS_HOME"] = old


@pytest.fixture(scope="session")
def ray_session(maas_home: str) -> Iterator[None]:
    """One local Ray for every integration test; 4 logical CPUs on 2 cores so
    fractional trainers, data tasks and Serve replicas fit side by side."""
    import ray

    from maas_ray.runtime import free_agent_port, private_temp_dir, quiet_ray_data

    # The dashboard hosts Ray's job submission API, which fine-tuning jobs run through.
    # Other Rays (test clusters) may run beside this one: the node agent gets a free
    # port and the session a folder of its own (see maas_ray.runtime).
    free_agent_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), logging_level="WARNING",
             _temp_dir=private_temp_dir(), runtime_env={"env_vars": {"MAAS_HOME": maas_home}})
    quiet_ray_data()
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def regression_model(ray_session: None, maas_home: str):
    """The regression example trained once: (TrainResult, the example module)."""
    example = load_example("regression")
    return example.main(maas_home), example


@pytest.fixture(scope="session")
def llm_home(maas_home: str) -> str:
    """The session registry with SmolLM2 and MiniLM imported once (~30 s: the GGUF is
    dequantised), so in-process tests and the Serve app use the same versions."""
    from maas_ray.registry import Registry
    from maas_ray.registry.importer import ensure_base_models

    ensure_base_models(Registry(maas_home))
    return maas_home


@pytest.fixture(scope="session")
def llm_dirs(llm_home: str) -> dict[str, str]:
    """``{name: local model folder}`` of the base models."""
    from maas_ray.registry import Registry
    from maas_ray.registry.importer import BASE_MODELS

    registry = Registry(llm_home)
    return {name: str(registry.local_dir(registry.get(name))) for name in BASE_MODELS}


@pytest.fixture(scope="session")
def taught_adapters(llm_dirs: dict[str, str], tmp_path_factory) -> dict[str, Path]:
    """``{tenant: adapter folder}``: SmolLM2 LoRAs that each know a secret word (tests/lora_facts.py)."""
    from tests.lora_facts import SECRETS, train_adapter

    root = tmp_path_factory.mktemp("taught-adapters")
    return {name: train_adapter(llm_dirs["smollm2-135m-instruct"], word, root / name)
            for name, word in SECRETS.items()}


@pytest.fixture(scope="session")
def serve_url(ray_session: None, maas_home: str) -> str:
    """The maas app on a free loopback port, deployed once for the session."""
    from ray import serve

    from maas_ray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(session_app_args(maas_home)), name="maas", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def session_app_args(maas_home: str) -> dict:
    """The test app's arguments (tests that redeploy it use the same)."""
    # The base chat model is pinned to transformers: tests compare it with in-process
    # transformers; tests/serve/test_llamacpp_service.py serves GGUF copies with llama.cpp.
    llm = {"model_engines": {"smollm2-135m-instruct": "transformers"}}
    # A cold model load on a busy 2-core CI machine can pass the 60 s default wait.
    return {"storage": maas_home, "max_body_bytes": 64 * 1024, "llm": llm, "request_timeout_s": 180.0}


GGUF_CHAT = "smollm2-135m-instruct-gguf"  # the base chat model's GGUF alone: llama.cpp by default


@pytest.fixture(scope="session")
def gguf_model(llm_home: str) -> str:
    """The base chat version as a GGUF-only version (what `maas models import X.gguf
    --weights gguf` publishes): its q8_0 file, tokenizer and configs, without safetensors.
    The session app serves it with llama.cpp ("auto")."""
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (make install LLAMACPP=0)")
    import shutil

    from maas_ray.registry import Registry

    registry = Registry(llm_home)
    if registry.versions(GGUF_CHAT):
        return registry.get(GGUF_CHAT).id
    base = registry.get("smollm2-135m-instruct")
    src = registry.local_dir(base)
    folder = Path(str(src) + "-gguf-only")
    folder.mkdir()
    try:
        for name in base.card["files"]:
            if name != "model.safetensors":
                shutil.copy2(src / name, folder / name)
        card = {k: v for k, v in base.card.items() if k not in ("files", "name", "created_at")}
        mv = registry.publish(GGUF_CHAT, folder, dict(card, format="gguf", formats=["gguf"]))
    finally:
        shutil.rmtree(folder)
    return mv.id
