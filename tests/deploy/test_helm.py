"""The Helm chart, rendered by the real Helm (v4, through ``helm_python``), linted strict, and every
rendered manifest validated against the Kubernetes API schemas (``kubernetes_validate``, offline).

The ServiceMonitor is a CRD (monitoring.coreos.com/v1) whose schema kubernetes_validate does not
ship: it is checked against the minimal schema below instead, and only it.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import tomllib

import helm_python as helm
import jsonschema
import msgspec
import kubernetes_validate
import pytest
import yaml

from bridge.config import Settings, describe

ROOT = pathlib.Path(__file__).parents[2]
CHART = ROOT / "helm" / "epsignal-bridge"
HERE = pathlib.Path(__file__).parent
RELEASE, NAMESPACE = "rel", "telephony"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with bundled
# schemas in kubernetes_validate.
KUBE_VERSIONS = ["1.25", "1.37"]
SECRET_SETTINGS = {"EPSIGNAL_PBX_PASSWORD", "EPSIGNAL_AMQP_URL"}

SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port", "path"],
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "relabelings": {"type": "array", "items": {"type": "object"}},
                        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                    }}},
            },
        },
    },
}


def values_file(name: str) -> dict:
    return helm.values_from_yaml((HERE / name).read_text())


FULL = values_file("values-full.yaml")


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


class Rendered:
    def __init__(self, manifests: dict[str, str]) -> None:
        self.docs = [d for path, text in sorted(manifests.items()) if path.endswith(".yaml")
                     for d in yaml.safe_load_all(text) if d]
        self.notes = next((t for p, t in manifests.items() if p.endswith("NOTES.txt")), "")

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
        return found[0]

    @property
    def pod(self) -> dict:
        return self.one("Deployment")["spec"]["template"]

    @property
    def container(self) -> dict:
        (c,) = self.pod["spec"]["containers"]
        return c

    def env(self) -> dict:
        return {e["name"]: e for e in self.container.get("env", [])}


def render(chart, values: dict | None = None) -> Rendered:
    return Rendered(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        _deep_update(out, copy.deepcopy(layer))
    return out


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


# --------------------------------------------------------------------------- lint + API schemas
@pytest.mark.parametrize("values", [{}, FULL], ids=["default", "full"])
def test_helm_lint_strict_is_clean(values):
    report = helm.lint(CHART, values, strict=True, kube_version="v1.37.0")
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended"): nothing at warning (2) or error (3).
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [{}, FULL], ids=["default", "full"])
def test_every_manifest_is_valid_kubernetes(chart, values, kube):
    r = render(chart, values)
    checked = []
    for doc in r.docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)  # a CRD: the minimal check above
        else:
            kubernetes_validate.validate(doc, kube, strict=True)
        checked.append(doc["kind"])
    expected = (["ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount"] if not values else
                ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "Service", "Service", "ServiceAccount", "ServiceMonitor"])
    assert sorted(checked) == expected


def test_the_kubernetes_validation_is_not_vacuous(chart):
    dep = render(chart).one("Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)
    dep = render(chart).one("Deployment")
    dep["spec"]["replicas"] = "1"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------- values schema
@pytest.mark.parametrize("name, needles", [
    ("values-bad-type.yaml", ["/replicas", "got string, want integer", "/config/EPSIGNAL_PREFETCH"]),
    ("values-bad-key.yaml", ["'enable' not allowed", "'EPSIGNAL_AMQP_URL' not allowed"]),
])
def test_bad_values_files_are_refused(chart, name, needles):
    bad = values_file(name)
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(bad)
    for needle in needles:
        assert needle in str(e.value)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, bad, strict=True)
    assert report["errors"], report
    assert any(m["severity"] == 3 for m in report["messages"])


@pytest.mark.parametrize("bad", [
    {"replicas": 1.5},
    {"service": {"port": "http"}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"config": {"EPSIGNAL_PBX_MODE": "proxy"}},
    {"config": {"EPSIGNAL_ATTACH_TIMEOUT_S": 0}},
    {"config": {"EPSIGNAL_PBX_URL": "http://pbx/"}},
    {"secrets": {"amqpUrl": "rabbitmq:5672"}},
    {"securityContext": {"readOnlyRootFilesystem": "yes"}},
    {"podSecurityContext": {"runAsUsr": 10001}},
    {"livenessProbe": {"path": "/other"}},
    {"resources": {"request": {"cpu": "1"}}},
    {"serviceMonitor": {"interval": "often"}},
    {"autoscaling": {"minReplicas": 0}},
    {"podAntiAffinity": "always"},
], ids=lambda v: json.dumps(v))
def test_schema_refuses_wrong_types_and_unknown_keys(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)


def test_schema_closes_every_object_it_defines():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path or "/")
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    # extraEnv items are Kubernetes EnvVar objects: only `name` is pinned down.
    assert open_objects == ["/properties/extraEnv/items"]
    # values.yaml itself passes (also with a second, independent validator).
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


# --------------------------------------------------------------------------- settings
def test_config_holds_every_non_secret_setting_with_the_bridge_defaults(chart):
    bridge = {name: default for name, default, _ in describe()}
    values = chart.values["config"]
    schema = chart.schema["properties"]["config"]["properties"]
    assert set(schema) == set(values)
    non_secret = set(bridge) - SECRET_SETTINGS
    assert set(values) == non_secret
    data = render(chart).one("ConfigMap")["data"]
    assert set(data) == set(values)
    # The rendered defaults are the bridge's: parsed by the bridge, they give its default Settings.
    rendered = msgspec.structs.asdict(Settings.from_env(data, instance_id="x"))
    defaults = msgspec.structs.asdict(Settings.from_env({}, instance_id="x"))
    assert rendered == defaults


def test_the_bridge_reads_the_rendered_settings(chart):
    r = render(chart, FULL)
    env = dict(r.one("ConfigMap")["data"])
    env.update(EPSIGNAL_PBX_PASSWORD="pw", EPSIGNAL_AMQP_URL="amqp://u:p@rabbitmq/")
    s = Settings.from_env(env)
    assert s.buffer_max_events == 1_000_000  # rendered "1000000", not "1e+06"
    assert s.attach_timeout_s == 2.5
    assert s.pbx_mode == "server" and s.pbx_listen == "0.0.0.0:9443"
    assert s.device_list == ["009033400001", "009033400002"]
    assert s.instance_id  # empty in the ConfigMap: the bridge makes one per process
    assert s.pbx_tls_verify is False and s.pbx_ca_file == "/etc/epsignal/pbx-ca/ca.crt"
    defaults = Settings.from_env(render(chart).one("ConfigMap")["data"])
    assert defaults.reconnect_max_s == 32.0 and defaults.prefetch == 64


def test_secrets_come_from_the_chart_secret_by_default(chart):
    r = render(chart, {"secrets": {"pbxPassword": "s3cret", "amqpUrl": "amqp://u:pw@mq:5672/"}})
    secret = r.one("Secret")
    import base64
    assert base64.b64decode(secret["data"]["EPSIGNAL_PBX_PASSWORD"]) == b"s3cret"
    assert base64.b64decode(secret["data"]["EPSIGNAL_AMQP_URL"]) == b"amqp://u:pw@mq:5672/"
    env = r.env()
    for var in SECRET_SETTINGS:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": var}
    assert "s3cret" not in json.dumps(r.one("ConfigMap")) + json.dumps(r.one("Deployment"))


def test_existing_secret_is_referenced_and_not_rendered(chart):
    r = render(chart, FULL)
    assert r.all("Secret") == []
    env = r.env()
    assert env["EPSIGNAL_PBX_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "epsignal-credentials", "key": "pbx-password"}
    assert env["EPSIGNAL_AMQP_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "epsignal-credentials", "key": "amqp-url"}


def test_checksums_roll_the_pods_when_config_or_secret_change(chart):
    def sums(values):
        ann = render(chart, values).pod["metadata"]["annotations"]
        return ann["checksum/config"], ann["checksum/secret"]

    base = sums({})
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in base)
    assert sums({}) == base  # stable
    cfg = sums({"config": {"EPSIGNAL_LOG_LEVEL": "DEBUG"}})
    assert cfg[0] != base[0] and cfg[1] == base[1]
    sec = sums({"secrets": {"pbxPassword": "other"}})
    assert sec[0] == base[0] and sec[1] != base[1]
    ext = sums({"secrets": {"existingSecret": "a"}})
    assert ext[1] != base[1]
    assert sums({"secrets": {"existingSecret": "b"}})[1] != ext[1]
    assert sums({"secrets": {"existingSecret": "a", "amqpUrlKey": "url"}})[1] != ext[1]


# --------------------------------------------------------------------------- the pod
def dockerfile_user() -> tuple[int, int]:
    text = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    return int(user[0]), int(user[1])


def test_security_context(chart):
    uid, gid = dockerfile_user()
    r = render(chart)
    pod_sc = r.pod["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert (uid, gid) == (10001, 10001)
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"], pod_sc["fsGroup"]) == (uid, gid, gid)
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = r.container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert r.pod["spec"]["automountServiceAccountToken"] is False
    # The read-only root filesystem leaves /tmp writable, as an emptyDir.
    (mount,) = r.container["volumeMounts"]
    (vol,) = r.pod["spec"]["volumes"]
    assert mount == {"name": vol["name"], "mountPath": "/tmp"} and "emptyDir" in vol


def test_uids_can_be_left_to_the_platform(chart):
    """OpenShift assigns uids: null removes them, the rest of the securityContext stays."""
    r = render(chart, {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
                       "securityContext": {"runAsUser": None, "runAsGroup": None}})
    assert r.pod["spec"]["securityContext"] == {"runAsNonRoot": True,
                                                "seccompProfile": {"type": "RuntimeDefault"}}
    sc = r.container["securityContext"]
    assert "runAsUser" not in sc and "runAsGroup" not in sc
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}


def test_probes_ports_resources_and_image(chart):
    r = render(chart)
    c = r.container
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert re.search(r"^EXPOSE 8080$", (ROOT / "Dockerfile").read_text(), re.M)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert c["resources"]["limits"] == {"memory": "512Mi"}
    assert c["image"] == "epsignal-bridge:0.1.0"
    assert c["args"] == ["run", "--grace", "10"]
    assert "command" not in c  # the image's ENTRYPOINT (epsignal-bridge) stays
    svc = r.one("Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == r.one("Deployment")["spec"]["selector"]["matchLabels"]

    full = render(chart, FULL)
    assert full.container["image"] == ("registry.example.com/telephony/epsignal-bridge@sha256:"
                                       "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert full.container["ports"][0] == {"name": "http", "containerPort": 9000, "protocol": "TCP"}
    assert full.one("ConfigMap")["data"]["EPSIGNAL_HTTP_PORT"] == "9000"


def test_grace_period_exceeds_the_bridge_grace(chart):
    for values in ({}, FULL):
        r = render(chart, values)
        args = r.container["args"]
        grace = float(args[args.index("--grace") + 1])
        assert r.pod["spec"]["terminationGracePeriodSeconds"] > grace
    with pytest.raises(helm.HelmRenderError, match="must be larger than shutdownGraceSeconds"):
        render(chart, {"shutdownGraceSeconds": 30, "terminationGracePeriodSeconds": 30})


def test_anti_affinity(chart):
    r = render(chart)
    anti = r.pod["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        r.one("Deployment")["spec"]["selector"]["matchLabels"]
    hard = render(chart, {"podAntiAffinity": "hard"}).pod["spec"]["affinity"]["podAntiAffinity"]
    assert list(hard) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    assert "affinity" not in render(chart, {"podAntiAffinity": "none"}).pod["spec"]
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    assert render(chart, {"affinity": own}).pod["spec"]["affinity"] == own


def test_the_tracing_benchmark_measures_the_charts_sampler(chart):
    from bridge.bench.scenarios import DEPLOYED_SAMPLER

    env = render(chart, {"otel": {"enabled": True}}).env()
    assert (env["OTEL_TRACES_SAMPLER"]["value"], env["OTEL_TRACES_SAMPLER_ARG"]["value"]) == DEPLOYED_SAMPLER


def test_otel(chart, monkeypatch):
    env = render(chart).env()
    assert env["OTEL_SDK_DISABLED"]["value"] == "true"
    assert not {k for k in env if k.startswith("OTEL_")} - {"OTEL_SDK_DISABLED"}
    env = render(chart, FULL).env()
    assert {k: v["value"] for k, v in env.items() if k.startswith("OTEL_")} == {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_SERVICE_NAME": "epsignal-bridge-prod",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_RESOURCE_ATTRIBUTES":
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),deployment.environment=production",
    }
    names = list(env)
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")  # $(POD_NAME) resolves
    default_name = render(chart, {"otel": {"enabled": True}}).env()["OTEL_SERVICE_NAME"]["value"]
    assert default_name == f"{RELEASE}-epsignal-bridge"

    # The bridge and the OpenTelemetry SDK understand what the chart sets.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import sampling

    from bridge import tracing

    pod = {"POD_NAME": "bridge-7d9f-abcde", "POD_NAMESPACE": NAMESPACE}
    for k, v in env.items():
        if k.startswith("OTEL_"):
            monkeypatch.setenv(k, re.sub(r"\$\((\w+)\)", lambda m: pod[m.group(1)], v["value"]))
    sampler = sampling._get_from_env_or_default()
    assert isinstance(sampler, sampling.ParentBased) and "0.25" in sampler.get_description()
    attrs = Resource.create().attributes
    assert attrs["service.name"] == "epsignal-bridge-prod"
    assert attrs["k8s.pod.name"] == "bridge-7d9f-abcde" and attrs["deployment.environment"] == "production"
    monkeypatch.setattr(tracing, "ENABLED", tracing.ENABLED)
    monkeypatch.setattr(tracing, "_tracer", tracing._tracer)
    assert tracing.configure() is True
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing.disable()
    assert tracing.configure() is False


# --------------------------------------------------------------------------- replicas, HPA, PDB
def test_hpa_leaves_replicas_out(chart):
    r = render(chart, {"replicas": 3,
                       "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 7}})
    assert "replicas" not in r.one("Deployment")["spec"]
    hpa = r.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": r.one("Deployment")["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 7)
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert render(chart, {"replicas": 3}).one("Deployment")["spec"]["replicas"] == 3
    assert render(chart).all("HorizontalPodAutoscaler") == []
    full = render(chart, FULL).one("HorizontalPodAutoscaler")["spec"]
    assert [m["resource"]["name"] for m in full["metrics"]] == ["cpu", "memory"]
    assert full["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 300}}
    with pytest.raises(helm.HelmRenderError, match="minReplicas"):
        render(chart, {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}})


@pytest.mark.parametrize("values, pdb", [
    ({}, False),
    ({"replicas": 2}, True),
    ({"replicas": 2, "podDisruptionBudget": {"enabled": False}}, False),
    ({"replicas": 5, "autoscaling": {"enabled": True, "minReplicas": 1}}, False),
    ({"autoscaling": {"enabled": True, "minReplicas": 2}}, True),
])
def test_pdb_only_with_more_than_one_replica(chart, values, pdb):
    r = render(chart, values)
    if not pdb:
        assert r.all("PodDisruptionBudget") == []
        return
    spec = r.one("PodDisruptionBudget")["spec"]
    assert spec == {"maxUnavailable": 1,
                    "selector": {"matchLabels": r.one("Deployment")["spec"]["selector"]["matchLabels"]}}


# --------------------------------------------------------------------------- Services
def test_server_mode_adds_the_pbx_service(chart):
    r = render(chart, {"config": {"EPSIGNAL_PBX_MODE": "server"}})
    pbx = r.one("Service", f"{RELEASE}-epsignal-bridge-pbx")
    assert pbx["spec"]["ports"] == [{"name": "pbx", "port": 8090, "targetPort": "pbx", "protocol": "TCP"}]
    assert pbx["spec"]["type"] == "ClusterIP"
    assert {"name": "pbx", "containerPort": 8090, "protocol": "TCP"} in r.container["ports"]

    full = render(chart, FULL)
    spec = full.one("Service", "bridge-pbx")["spec"]
    assert spec["type"] == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local"
    assert spec["loadBalancerSourceRanges"] == ["192.0.2.10/32"]
    assert spec["ports"] == [{"name": "pbx", "port": 443, "targetPort": "pbx", "protocol": "TCP",
                              "nodePort": 30443}]
    assert {"name": "pbx", "containerPort": 9443, "protocol": "TCP"} in full.container["ports"]

    client = render(chart)
    assert [s["metadata"]["name"] for s in client.all("Service")] == [f"{RELEASE}-epsignal-bridge"]
    assert [p["name"] for p in client.container["ports"]] == ["http"]


def test_service_monitor_scrapes_the_metrics_service(chart):
    assert render(chart).all("ServiceMonitor") == []
    r = render(chart, FULL)
    sm = r.one("ServiceMonitor")
    assert sm["metadata"]["namespace"] == "monitoring"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"], ep["interval"], ep["scrapeTimeout"]) == ("http", "/metrics", "15s", "5s")
    selected = [s for s in r.all("Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["bridge"]
    assert [p["name"] for p in selected[0]["spec"]["ports"]] == ["http"]
    plain = render(chart, {"serviceMonitor": {"enabled": True}}).one("ServiceMonitor")
    assert plain["metadata"]["namespace"] == NAMESPACE and "namespaceSelector" not in plain["spec"]


# --------------------------------------------------------------------------- chart metadata + docs
def test_chart_app_version_is_the_package_version(chart):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart.metadata["appVersion"] == project["version"]
    assert re.search(rf'^ARG VERSION={re.escape(project["version"])}$',
                     (ROOT / "Dockerfile").read_text(), re.M)


# Objects passed to Kubernetes as they are: documented as one key.
OPAQUE = {"resources", "podSecurityContext", "securityContext", "strategy", "livenessProbe",
          "readinessProbe", "startupProbe"}


def leaf_keys(values: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path not in OPAQUE:
            out += leaf_keys(v, path + ".")
        else:
            out.append(path)
    return out


def test_chart_readme_documents_every_value(chart):
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    assert set(leaf_keys(chart.values)) == documented


def test_extra_volumes_mount_a_ca_bundle_next_to_tmp(chart):
    r = render(chart, FULL)
    mounts = {m["mountPath"]: m["name"] for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod["spec"]["volumes"]}
    assert mounts == {"/tmp": "tmp", "/etc/epsignal/pbx-ca": "pbx-ca"}
    assert volumes["pbx-ca"] == {"name": "pbx-ca", "configMap": {"name": "pbx-ca"}}
    ca_file = r.one("ConfigMap")["data"]["EPSIGNAL_PBX_CA_FILE"]
    assert ca_file.startswith("/etc/epsignal/pbx-ca/")


@pytest.mark.parametrize(("values", "leases"), [
    ({}, "false"),
    ({"config": {"EPSIGNAL_LEASES": True}}, "true"),
    ({"replicas": 3}, "true"),
    ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}, "true"),
])
def test_more_than_one_replica_turns_leases_on(chart, values, leases):
    """Replicas must share the devices through leases (docs/SCALING.md), whatever config says."""
    assert render(chart, values).one("ConfigMap")["data"]["EPSIGNAL_LEASES"] == leases
