"""deploy/k8s: the kustomization renders (deploy/k8s/render.py), every Kubernetes object validates
against the Kubernetes OpenAPI schemas (kubernetes-validate, offline: it ships them), KEDA's
ScaledObjects against the fields of KEDA's CRD, and the manifests agree with the code: queues,
settings, probe routes, grace periods, node pinning."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from core.settings import Settings
from core.targets import QUEUES

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
K8S_VERSION = "1.30.0"

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")


def _renderer():
    spec = importlib.util.spec_from_file_location("k8s_render", ROOT / "deploy" / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return _renderer().render(BASE)


def _by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(deployment):
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _string_map():
    return {"type": "object", "additionalProperties": {"type": "string"}}


# The fields of KEDA's ScaledObject CRD (keda.sh/v1alpha1) these manifests use, as KEDA's CRD types them.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}, "envSourceContainerName": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer"},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "name": {"type": "string"}, "behavior": {"type": "object"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"}, "metadata": _string_map(),
                                   "authenticationRef": {"type": "object"}, "metricType": {"type": "string"}}}},
            },
        },
    },
}
# KEDA's redis (list) scaler: its documented metadata keys
REDIS_SCALER_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "passwordFromEnv",
                     "usernameFromEnv", "databaseIndex", "listName", "listLength", "activationListLength",
                     "enableTLS", "unsafeSsl"}


def test_every_kubernetes_object_validates_against_the_schemas(objects):
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Deployment", "Deployment", "Job", "Namespace",
                     "ScaledObject", "ScaledObject", "ScaledObject", "Service"]
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            jsonschema.validate(obj, SCALED_OBJECT)
            for trigger in obj["spec"]["triggers"]:
                assert trigger["type"] == "redis" and set(trigger["metadata"]) <= REDIS_SCALER_KEYS
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_secret_example_validates_and_only_names_known_settings():
    secret = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    for key in secret["stringData"]:
        assert key.startswith("KEDA_") or key.removeprefix("FEATHERWEIGHT_").lower() in Settings.model_fields, key


def test_a_broken_manifest_is_caught(objects):
    """The validation can fail: a port as text and an unknown field are refused."""
    service = dict(_by_kind(objects, "Service")["featherweight-api"])
    service["spec"] = {**service["spec"], "ports": [{"name": "http", "port": "eighty"}]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}, SCALED_OBJECT)


def test_configmap_names_only_known_settings(objects):
    config = _by_kind(objects, "ConfigMap")["featherweight"]["data"]
    settings = Settings(**{k.removeprefix("FEATHERWEIGHT_").lower(): v for k, v in config.items()
                           if k.startswith("FEATHERWEIGHT_") and k != "FEATHERWEIGHT_ENV"})
    for key in config:
        assert key.startswith("KEDA_") or key.removeprefix("FEATHERWEIGHT_").lower() in Settings.model_fields, key
    assert settings.storage == "s3"


def test_one_worker_deployment_and_one_scaler_per_queue(objects):
    deployments, scaled = _by_kind(objects, "Deployment"), _by_kind(objects, "ScaledObject")
    workers = {_container(d)["command"][-1]: d for d in deployments.values() if "worker" in _container(d)["command"]}
    assert sorted(workers) == sorted(QUEUES)
    for queue, deployment in workers.items():
        assert _container(deployment)["command"] == ["featherweight", "worker", "--queue", queue]
        [scaler] = [s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert scaler["spec"]["triggers"][0]["metadata"]["listName"] == queue   # Celery's Redis list is the queue's name
    config = _by_kind(objects, "ConfigMap")["featherweight"]["data"]
    secret = yaml.safe_load((BASE / "secret.example.yaml").read_text())["stringData"]
    for scaler in scaled.values():
        meta = scaler["spec"]["triggers"][0]["metadata"]
        assert meta["addressFromEnv"] in config and meta["passwordFromEnv"] in secret


def test_workers_are_pinned_to_their_hardware(objects):
    deployments = _by_kind(objects, "Deployment")
    arm = deployments["featherweight-worker-cpu-arm"]["spec"]["template"]["spec"]
    x86 = deployments["featherweight-worker-cpu-x86"]["spec"]["template"]["spec"]
    gpu = deployments["featherweight-worker-gpu"]["spec"]["template"]["spec"]
    assert arm["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    assert x86["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    resources = gpu["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert gpu["containers"][0]["image"].split(":")[0].endswith("worker-gpu")


def test_a_worker_is_given_time_to_finish_its_job(objects):
    hard_limit = int(_by_kind(objects, "ConfigMap")["featherweight"]["data"]["FEATHERWEIGHT_TASK_HARD_TIME_LIMIT"])
    for name, deployment in _by_kind(objects, "Deployment").items():
        if "worker" in name:
            assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > hard_limit, name


def test_api_probes_use_routes_the_api_serves(objects, api_client):
    api = _container(_by_kind(objects, "Deployment")["featherweight-api"])
    probes = [api[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert probes == ["/health", "/health", "/ready"]
    for path in set(probes):
        assert api_client.get(path).status_code == 200, path
    assert api_client.get("/no-such-probe").status_code == 404
    service = _by_kind(objects, "Service")["featherweight-api"]
    assert service["spec"]["selector"] == _by_kind(objects, "Deployment")["featherweight-api"]["spec"]["selector"]["matchLabels"]


def test_render_applies_namespace_labels_images_and_refuses_what_it_does_not_implement(objects, tmp_path):
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "featherweight"
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "featherweight"
    images = [c["image"] for o in objects if o["kind"] in ("Deployment", "Job")
              for c in o["spec"]["template"]["spec"]["containers"]]
    assert images and all(image.startswith("ghcr.io/example/featherweight-") and image.endswith(":0.1.0") for image in images)
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    renderer = _renderer()
    with pytest.raises(renderer.RenderError, match="patches"):
        renderer.render(tmp_path)
