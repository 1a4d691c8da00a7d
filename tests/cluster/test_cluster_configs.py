"""The files under cluster/ are what Ray and KubeRay will accept, and run maas.

Cluster launcher YAMLs go through Ray's own autoscaler validation (defaults
merged as `ray up` does, then the JSON schema and cross-field checks). KubeRay
manifests go through the conversion the in-cluster Ray autoscaler applies to a
RayCluster spec (which ends in the same validation), plus checks of the CRD
fields KubeRay requires. Negative cases show each check rejects a broken file.
No Ray cluster and no network: only parsing and validation.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_APP_CONFIG = REPO / "apps" / "maas.yaml"

CLOUD_CONFIGS = ("aws-minimal.yaml", "aws.yaml", "gcp-minimal.yaml", "gcp.yaml")
LAUNCHER_CONFIGS = (*CLOUD_CONFIGS, "local.yaml")
KUBERAY_MANIFESTS = ("raycluster.yaml", "rayservice.yaml", "rayjob.yaml")
STORAGE_SCHEME = {"aws": "s3", "gcp": "gs"}  # provider type -> MAAS_HOME scheme
METRICS_FLAG = "--metrics-export-port=8080"  # DESIGN.md: metrics on port 8080
LOCAL_START = (
    "RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 ray start --head --port 6379"
    " --num-cpus=1 --autoscaling-config=cluster/local.yaml"
)


# --- helpers ---------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a YAML mapping, got {type(data).__name__}"
    return data


def resolve_launcher_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a cluster launcher config the way Ray does; return what Ray would use.

    Cloud providers: `prepare_config` merges Ray's defaults.yaml for the provider
    (one top-level key at a time) and the per-type min/max workers, then
    `validate_config` checks the schema and cross-field rules, as `ray up` does
    (minus the cloud API calls that follow). fake_multinode: Ray's wheel lacks that
    provider's defaults file and the autoscaler reads the YAML as it is, so the
    file itself must validate.
    """
    config = copy.deepcopy(raw)
    if config.get("provider", {}).get("type") != "fake_multinode":
        config = prepare_config(config)
    validate_config(config)
    return config


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a (possibly multi-document) YAML file."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path}: no YAML documents"
    return docs


def only_manifest(path: Path, kind: str) -> dict[str, Any]:
    """The single `kind` object in `path`, after checking it is a ray.io/v1 object."""
    found = [doc for doc in load_manifests(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path}: expected one {kind}, found {len(found)}"
    manifest = found[0]
    assert manifest.get("apiVersion") == "ray.io/v1", f"{path}: apiVersion must be ray.io/v1"
    assert manifest.get("metadata", {}).get("name"), f"{path}: {kind} needs metadata.name"
    return manifest


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a RayCluster spec (also RayService.rayClusterConfig, RayJob.rayClusterSpec).

    Checks the fields KubeRay requires, then converts the spec with the function
    the in-cluster Ray autoscaler uses, which validates the result against Ray's
    autoscaler schema. Returns that autoscaler config (node types with resources).
    """
    assert isinstance(spec, dict), f"{where}: missing"
    assert spec.get("rayVersion") == ray.__version__, (
        f"{where}.rayVersion is {spec.get('rayVersion')!r}; the project pins Ray {ray.__version__}"
    )
    groups = [("headGroupSpec", spec.get("headGroupSpec"))]
    groups += [
        (f"workerGroupSpecs[{i}]", group) for i, group in enumerate(spec.get("workerGroupSpecs") or [])
    ]
    assert len(groups) > 1, f"{where}.workerGroupSpecs: at least one worker group is needed"
    for name, group in groups:
        path = f"{where}.{name}"
        assert isinstance(group, dict), f"{path}: missing"
        params = group.get("rayStartParams")
        assert isinstance(params, dict), f"{path}.rayStartParams: required (may be {{}})"
        for key, value in params.items():
            # KubeRay's CRD types rayStartParams as map[string]string.
            assert isinstance(value, str), f"{path}.rayStartParams.{key}: quote it ({value!r})"
        containers = (group.get("template") or {}).get("spec", {}).get("containers") or []
        assert containers, f"{path}.template.spec.containers: required"
        image = containers[0].get("image")
        assert isinstance(image, str) and image, f"{path}.template.spec.containers[0].image: required"
        if name == "headGroupSpec":
            continue
        assert isinstance(group.get("groupName"), str) and group["groupName"], f"{path}.groupName: required"
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        assert isinstance(low, int) and isinstance(high, int), (
            f"{path}: minReplicas and maxReplicas must be integers, got {low!r} and {high!r}"
        )
        assert 0 <= low <= high, f"{path}: need 0 <= minReplicas ({low}) <= maxReplicas ({high})"
    cr = {"metadata": {"name": "test", "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(cr)


def serve_app_config() -> dict[str, Any] | None:
    """apps/maas.yaml, the Serve config that a RayService must agree with (if present)."""
    return load_yaml(SERVE_APP_CONFIG) if SERVE_APP_CONFIG.exists() else None


def start_commands(config: dict[str, Any]) -> list[str]:
    """The `ray start` commands of a resolved launcher config, head and workers."""
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [" ".join(cmd.split()) for cmd in commands if "ray start" in cmd]


# --- cluster launcher configs ----------------------------------------------------


@pytest.mark.cluster
def test_every_expected_config_exists() -> None:
    missing = [name for name in LAUNCHER_CONFIGS if not (CLUSTER / name).is_file()]
    missing += [f"kuberay/{name}" for name in KUBERAY_MANIFESTS if not (KUBERAY / name).is_file()]
    assert not missing, f"missing under cluster/: {missing}"


@pytest.mark.cluster
@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path: Path) -> None:
    config = resolve_launcher_config(load_yaml(path))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers, f"{path.name}: no worker node types"
    for name, node_type in workers.items():
        assert node_type["max_workers"] >= 1, f"{path.name}: worker type {name} can never start"


@pytest.mark.cluster
@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_config_runs_maas(name: str) -> None:
    raw = load_yaml(CLUSTER / name)
    config = resolve_launcher_config(raw)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert gpu_types, "needs a GPU worker type"
    assert len(gpu_types) < len(workers), "needs a CPU worker type"

    # Storage on the provider's object store, for every Ray process.
    scheme = STORAGE_SCHEME[config["provider"]["type"]]
    assert re.search(rf"MAAS_HOME={scheme}://[\w.-]+", yaml.safe_dump(raw)), f"MAAS_HOME must be a {scheme}:// URI"

    # The repo reaches every node and is installed there: CPU nodes against the
    # CPU constraints, GPU nodes without (they take CUDA torch).
    assert raw["file_mounts"] == {"~/maas_ray": "."}
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any("-e ~/maas_ray" in c and "constraints-cpu.txt" in c for c in config[role]), role
    for type_name, node_type in gpu_types.items():
        commands = node_type.get("worker_setup_commands", [])
        assert any("-e ~/maas_ray" in c for c in commands), f"{type_name} does not install maas_ray"
        assert not any("constraints-cpu.txt" in c for c in commands), f"{type_name} would get CPU torch"

    # Ray's defaults.yaml fills any list left out; its setup installs a nightly Ray.
    every_command = [c for key, value in config.items() if key.endswith("_commands") for c in value]
    assert not [c for c in every_command if "ray-wheels" in c], "Ray's default nightly-wheel setup leaked in"

    # Same Ray everywhere as on the machine running `ray up`.
    images = [config["docker"]["image"]]
    images += [t["docker"]["worker_image"] for t in workers.values() if "worker_image" in t.get("docker", {})]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image

    starts = start_commands(config)
    assert len(starts) == 2, starts
    assert all(METRICS_FLAG in cmd for cmd in starts), f"every `ray start` needs {METRICS_FLAG}"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts[0]


@pytest.mark.cluster
def test_local_config_is_the_fake_cluster_recipe() -> None:
    path = CLUSTER / "local.yaml"
    config = resolve_launcher_config(load_yaml(path))
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    for flag in ("use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check"):
        assert provider[flag] is True, flag
    assert config["max_workers"] == 2
    assert config["idle_timeout_minutes"] == 0.1
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 1}, "must match --num-cpus=1 of the start command"
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert [t["resources"] for t in workers] == [{"CPU": 1}]
    assert LOCAL_START in path.read_text(), "the header must show the start command"


def _drop_worker_resources(c: dict) -> None:
    del c["available_node_types"]["worker.cpu"]["resources"]


def _worker_max_as_text(c: dict) -> None:
    c["available_node_types"]["worker.cpu"]["max_workers"] = "two"


def _global_max_as_text(c: dict) -> None:
    c["max_workers"] = "3"


def _misspelt_key(c: dict) -> None:
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _unknown_head_type(c: dict) -> None:
    c["head_node_type"] = "head.missing"


def _min_workers_over_global_max(c: dict) -> None:
    c["available_node_types"]["worker.cpu"]["min_workers"] = c["max_workers"] + 1


BROKEN_CLOUD: list[tuple[Callable[[dict], None], type[Exception], str]] = [
    (_drop_worker_resources, jsonschema.ValidationError, "'resources' is a required property"),
    (_worker_max_as_text, jsonschema.ValidationError, "'two' is not of type 'integer'"),
    (_global_max_as_text, jsonschema.ValidationError, "'3' is not of type 'integer'"),
    (_misspelt_key, jsonschema.ValidationError, "idle_timeout_minute"),
    (_unknown_head_type, ValueError, "head_node_type"),
    (_min_workers_over_global_max, ValueError, "sum of `min_workers`"),
]


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("breaks", "error", "message"), BROKEN_CLOUD, ids=[b.__name__.strip("_") for b, _, _ in BROKEN_CLOUD]
)
def test_ray_validation_rejects_broken_config(
    breaks: Callable[[dict], None], error: type[Exception], message: str
) -> None:
    raw = load_yaml(CLUSTER / "aws-minimal.yaml")
    resolve_launcher_config(raw)  # the unbroken file passes
    breaks(raw)
    with pytest.raises(error, match=re.escape(message)):
        resolve_launcher_config(raw)


@pytest.mark.cluster
def test_local_config_needs_every_key() -> None:
    # No defaults are merged for fake_multinode: a key left out stays missing.
    raw = load_yaml(CLUSTER / "local.yaml")
    del raw["cluster_synced_files"]
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        resolve_launcher_config(raw)


# --- KubeRay manifests -----------------------------------------------------------


@pytest.mark.cluster
def test_raycluster_manifest() -> None:
    manifest = only_manifest(KUBERAY / "raycluster.yaml", "RayCluster")
    spec = manifest["spec"]
    assert spec.get("enableInTreeAutoscaling") is True
    autoscaling = check_ray_cluster_spec(spec, "RayCluster.spec")
    types = autoscaling["available_node_types"]
    assert types["cpu"]["resources"].get("GPU", 0) == 0
    assert types["gpu"]["resources"].get("GPU", 0) >= 1, "the gpu group must request nvidia.com/gpu"


@pytest.mark.cluster
def test_rayservice_manifest() -> None:
    manifest = only_manifest(KUBERAY / "rayservice.yaml", "RayService")
    spec = manifest["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own config schema
    app = serve_config["applications"][0]
    local = serve_app_config()
    if local is not None:
        local_app = local["applications"][0]
        assert app["import_path"] == local_app["import_path"], "serveConfigV2 and apps/maas.yaml disagree"
    # Both configs' args must be arguments the app builder accepts.
    from maas_ray.serve.settings import AppArgs

    AppArgs.model_validate(app.get("args") or {})
    if local is not None:
        AppArgs.model_validate(local["applications"][0].get("args") or {})
    assert re.fullmatch(r"[\w.]+:\w+", app["import_path"]), app["import_path"]
    check_ray_cluster_spec(spec.get("rayClusterConfig"), "RayService.spec.rayClusterConfig")


@pytest.mark.cluster
def test_rayjob_manifest() -> None:
    manifest = only_manifest(KUBERAY / "rayjob.yaml", "RayJob")
    spec = manifest["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["maas", "train"] and len(argv) >= 3, spec["entrypoint"]
    spec_file = REPO / argv[2]
    assert spec_file.is_file(), f"the entrypoint's spec {argv[2]} is not in the repo"
    assert isinstance(yaml.safe_load(spec_file.read_text()), dict), f"{argv[2]} is not a YAML mapping"
    assert spec.get("shutdownAfterJobFinishes") is True
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), "runtimeEnvYAML must be a mapping"
    check_ray_cluster_spec(spec.get("rayClusterSpec"), "RayJob.spec.rayClusterSpec")


@pytest.mark.cluster
def test_kuberay_image_is_built_on_the_pinned_ray() -> None:
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-" in dockerfile


def _group(spec: dict) -> dict:
    return spec["workerGroupSpecs"][0]


BROKEN_KUBERAY: list[tuple[Callable[[dict], None], type[Exception], str]] = [
    (lambda s: _group(s).pop("maxReplicas"), AssertionError, "maxReplicas must be integers"),
    (lambda s: _group(s).update(minReplicas=9), AssertionError, "<= maxReplicas"),
    (lambda s: s["headGroupSpec"].pop("rayStartParams"), AssertionError, "rayStartParams: required"),
    (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), AssertionError, "quote it"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), AssertionError, "image"),
    # Ray's conversion: a group whose CPU count cannot be found.
    (
        lambda s: _group(s)["template"]["spec"]["containers"][0].pop("resources"),
        ValueError,
        "failed to detect `CPU`",
    ),
]


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("breaks", "error", "message"),
    BROKEN_KUBERAY,
    ids=["no-max", "min-over-max", "no-start-params", "unquoted-param", "no-image", "no-cpu"],
)
def test_ray_cluster_check_rejects_broken_spec(
    breaks: Callable[[dict], None], error: type[Exception], message: str
) -> None:
    spec = only_manifest(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
    check_ray_cluster_spec(spec, "spec")  # the unbroken spec passes
    breaks(spec)
    with pytest.raises(error, match=re.escape(message)):
        check_ray_cluster_spec(spec, "spec")
