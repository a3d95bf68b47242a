"""docs/DEPLOY.md's recipe for a RabbitMQ cluster (the RabbitMQ Cluster Operator), checked as
written: its bridge values rendered by the chart (schema, lint, Kubernetes API schemas), its
`RabbitmqCluster` parsed and checked against the operator's CRD fields, and the two agreeing
(the hosts the bridge is given are the pods the operator makes).

The blocks are found by their first line: `# bridge-values.yaml...`, `# rabbitmq-cluster.yaml...`.
"""

from __future__ import annotations

import configparser
import pathlib
import re

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from bridge.amqp.leases import RENEW_S
from bridge.config import Settings
from tests.deploy.test_helm import CHART, KUBE_VERSIONS, render

DEPLOY = pathlib.Path(__file__).parents[2] / "docs" / "DEPLOY.md"

#: The fields of RabbitmqCluster v1beta1 `spec` (the operator's CRD,
#: config/crd/bases/rabbitmq.com_rabbitmqclusters.yaml, cluster-operator 2.22), typed where the
#: recipe uses them: a misspelt field fails here as the API server would refuse it.
RABBITMQ_CLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "rabbitmq.com/v1beta1"},
        "kind": {"const": "RabbitmqCluster"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **{k: {} for k in ("autoEnableAllFeatureFlags", "delayStartSeconds", "image",
                                   "imagePullSecrets", "override", "secretBackend", "service",
                                   "skipPostDeploySteps", "terminationGracePeriodSeconds", "tls",
                                   "tolerations")},
                "replicas": {"type": "integer", "minimum": 0},
                "resources": {"type": "object", "additionalProperties": False, "properties": {
                    "requests": {"type": "object"}, "limits": {"type": "object"}}},
                "persistence": {"type": "object", "additionalProperties": False, "properties": {
                    "storage": {"type": "string"}, "storageClassName": {"type": "string"},
                    "emptyDir": {"type": "object"}}},
                "affinity": {"type": "object"},
                "rabbitmq": {"type": "object", "additionalProperties": False, "properties": {
                    "additionalConfig": {"type": "string", "maxLength": 100000},
                    "additionalPlugins": {"type": "array"}, "advancedConfig": {"type": "string"},
                    "envConfig": {"type": "string"}, "erlangInetConfig": {"type": "string"}}},
            },
        },
    },
}


def block(first_line: str) -> str:
    """The one fenced block of DEPLOY.md whose first line starts with ``first_line``."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", DEPLOY.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"docs/DEPLOY.md: {len(found)} blocks starting with {first_line!r}"
    return found[0]


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="module")
def cluster() -> dict:
    doc = yaml.safe_load(block("# rabbitmq-cluster.yaml"))
    jsonschema.validate(doc, RABBITMQ_CLUSTER_SCHEMA)
    return doc


@pytest.fixture(scope="module")
def values() -> dict:
    return helm.values_from_yaml(block("# bridge-values.yaml"))


def test_the_rabbitmq_cluster(cluster):
    spec = cluster["spec"]
    assert spec["replicas"] == 3  # a majority survives one node
    assert {"requests", "limits"} <= set(spec["resources"]) and spec["persistence"]["storage"]
    term, = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": cluster["metadata"]["name"]}
    conf = configparser.ConfigParser()
    conf.read_string("[rabbitmq.conf]\n" + spec["rabbitmq"]["additionalConfig"])
    settings = dict(conf["rabbitmq.conf"])
    # a held lease token is renewed every RENEW_S: the consumer timeout must leave room for that
    assert int(settings["consumer_timeout"]) >= 1.5 * RENEW_S * 1000


def test_the_bridge_values_render(chart, values, cluster):
    chart.validate_schema(values)
    report = helm.lint(CHART, values, strict=True, kube_version="v1.37.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    r = render(chart, values)
    for kube in KUBE_VERSIONS:
        for doc in r.docs:
            kubernetes_validate.validate(doc, kube, strict=True)
    assert r.kinds() == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert r.one("Deployment")["spec"]["replicas"] == 2
    data = r.one("ConfigMap")["data"]
    assert (data["EPSIGNAL_LEASES"], data["EPSIGNAL_QUEUE_TYPE"]) == ("true", "quorum")
    # every node of the cluster by its pod's name: <name>-server-N.<name>-nodes.<namespace>
    name, ns = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert data["EPSIGNAL_AMQP_HOSTS"].split(",") == [
        f"{name}-server-{i}.{name}-nodes.{ns}" for i in range(cluster["spec"]["replicas"])]
    # the credentials come from the Secret step 3 builds, under the chart's default keys
    env = r.env()
    for var in ("EPSIGNAL_PBX_PASSWORD", "EPSIGNAL_AMQP_URL"):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "epsignal-credentials", "key": var}
    step3 = block("URL=$(kubectl")
    assert f"-n {ns} get secret {name}-default-user " in step3
    assert "create secret generic epsignal-credentials" in step3
    assert f"@{name}.{ns}.svc:5672/" in step3  # the operator's connection_string, by hand
    # and the bridge takes what was rendered (with the URL the operator's Secret holds)
    s = Settings.from_env({**data, "EPSIGNAL_PBX_PASSWORD": "pw",
                           "EPSIGNAL_AMQP_URL": f"amqp://default_user_x:pw@{name}.{ns}.svc:5672/"})
    assert s.leases is True and s.device_list == ["009033400001", "009033400002"]
