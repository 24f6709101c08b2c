"""The kustomize manifests, as `kubectl kustomize` renders them, checked offline.

1. Every overlay (and the base) renders.
2. Every rendered object of a built-in kind validates against the Kubernetes 1.30 schemas
   (`kubernetes-validate --strict`: unknown fields are errors); every custom resource validates
   against the `openAPIV3Schema` of the upstream CRD vendored in tests/crds/ (made strict the same
   way). CEL rules and defaulting need an API server, which cannot run here. No PrometheusRule CRD is
   vendored: its structure is checked by the schema in tests/test_alert_rules.py.
3. A policy over the rendered objects (`policy_violations`): the security context of every
   container, requests and limits, secrets only by reference, serving probes on the Open Inference
   Protocol routes, GPUs in the gpu overlay only, the pipeline's RBAC exactly as allowed, and who may
   reach whom through the NetworkPolicies, evaluated on the labels of the rendered pods. The
   negative tests mutate one rendered object each and check that the policy reports it.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_alert_rules import prometheus_rule_errors

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CRDS = Path(__file__).resolve().parent / "crds"
NAMESPACE = "shopvision"
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ["overlays/local", "overlays/gpu", "overlays/kserve"]
RENDERED = ["base", *OVERLAYS]
ALERTS = "base/alerts"  # applied apart: its kind needs the Prometheus Operator
PROJECT_IMAGE = "shopvision"  # repository name of the project image in every overlay
CUSTOM_KINDS = {
    ("trainer.kubeflow.org", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
}
# The Secrets the operator creates (docs/cluster.md): the only ones a manifest may reference.
SECRETS = {
    "shopvision-postgres": {"username", "password"},
    "shopvision-s3": {"access-key-id", "secret-access-key", "endpoint-url"},
}
EXPECTED_RBAC = {
    ("trainer.kubeflow.org", "trainjobs", None): {"create", "get", "list", "watch", "delete"},
    ("kubeflow.org", "pytorchjobs", None): {"create", "get", "list", "watch", "delete"},
    ("apps", "deployments", "shopvision-serving"): {"get", "patch"},
    ("serving.kserve.io", "inferenceservices", "shopvision"): {"get", "patch"},
    ("", "pods", None): {"get", "list"},
    ("", "pods/log", None): {"get", "list"},
}
SERVING_ARGS = ["serve", "--model", "models:/shopvision@champion", "--host", "0.0.0.0", "--port", "8080"]
SECRETISH_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY", re.I)
URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@")
VAR_REFERENCE = re.compile(r"^\$\([A-Za-z_][A-Za-z0-9_]*\)$")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the 2 MB CRD in ~1 s instead of ~6 s


# --------------------------------------------------------------------------------------------
# Rendering and reading the objects


@functools.cache
def _render(path: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the manifests (kubectl kustomize); install it")
    done = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return tuple(obj for obj in yaml.load_all(done.stdout, Loader=YAML_LOADER) if obj)


def render(path: str) -> list[dict]:
    """A fresh deep copy of the rendered objects (tests may mutate it)."""
    return copy.deepcopy(list(_render(path)))


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_templates(obj: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod an object describes."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = obj["spec"]["template"]
        return [(f"{kind}/{name}", template.get("metadata") or {}, template["spec"])]
    if kind == "CronJob":
        template = obj["spec"]["jobTemplate"]["spec"]["template"]
        return [(f"{kind}/{name}", template.get("metadata") or {}, template["spec"])]
    if kind == "Pod":
        return [(f"Pod/{name}", obj["metadata"], obj["spec"])]
    if kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        out = []
        for job in obj["spec"]["template"]["spec"]["replicatedJobs"]:
            template = job["template"]["spec"]["template"]
            out.append((f"{kind}/{name} job {job['name']}", template.get("metadata") or {}, template["spec"]))
        return out
    if kind == "InferenceService":
        predictor = obj["spec"]["predictor"]
        meta = {"labels": predictor.get("labels") or {}, "annotations": predictor.get("annotations") or {}}
        return [(f"{kind}/{name} predictor", meta, predictor)]
    return []


def containers(spec: dict) -> list[dict]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def container(obj: dict, name: str) -> dict:
    for _, _, spec in pod_templates(obj):
        for c in containers(spec):
            if c["name"] == name:
                return c
    raise KeyError(f"{obj['kind']}/{obj['metadata']['name']} has no container {name}")


def flags(args: list[str]) -> dict[str, str]:
    """`--key value` and `--key=value` arguments as a dict."""
    out: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            else:
                key = arg[2:]
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
            out[key] = value
    return out


def env_value(c: dict, name: str) -> str | None:
    for env in c.get("env") or []:
        if env["name"] == name:
            return env.get("value")
    return None


def serving_pods(objects: list[dict]) -> tuple[str, dict, dict]:
    """The serving pod template: the Deployment's, or the InferenceService predictor's."""
    for obj in objects:
        if (obj["kind"], obj["metadata"]["name"]) in (
            ("Deployment", "shopvision-serving"),
            ("InferenceService", "shopvision"),
        ):
            return pod_templates(obj)[0]
    raise AssertionError("no serving workload (Deployment shopvision-serving or InferenceService shopvision)")


def serving_container(spec: dict) -> dict:
    matches = [c for c in spec.get("containers") or [] if (c.get("args") or [])[:1] == ["serve"]]
    assert len(matches) == 1, "expected one container running `shopvision serve`"
    return matches[0]


# --------------------------------------------------------------------------------------------
# Label selectors and NetworkPolicy semantics


def selects(selector: dict | None, labels: dict) -> bool:
    """Does a LabelSelector select these labels? (an empty selector selects everything)"""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admits(policies: list[dict], target: dict, source: dict, port: int) -> bool:
    """Would these NetworkPolicies let `source` open a TCP connection to `target`:port?

    target/source: {"namespace", "namespace_labels", "labels"}. Semantics of networking.k8s.io/v1:
    a pod selected by no Ingress policy is open; otherwise some rule of some selecting policy must
    match both the port and the peer.
    """
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == target["namespace"]
        and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
        and selects(p["spec"].get("podSelector"), target["labels"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(
                p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports
            ):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                namespace_ok = (
                    selects(peer["namespaceSelector"], source["namespace_labels"])
                    if "namespaceSelector" in peer
                    else source["namespace"] == target["namespace"]
                )
                if namespace_ok and (
                    "podSelector" not in peer or selects(peer["podSelector"], source["labels"])
                ):
                    return True
    return False


# Who may open connections to whom; every other pair must be refused.
REACH = {
    "serving": {"ingress-controller", "pipeline", "pipeline-in-kubeflow"},
    "mlflow": {"pipeline", "pipeline-in-kubeflow", "training", "serving"},
    "postgres": {"mlflow"},
    "minio": {"mlflow", "training", "pipeline", "pipeline-in-kubeflow"},
    "training": {"training"},
    "pipeline": set(),
}
PORTS = {
    "serving": 8080,
    "mlflow": 5000,
    "postgres": 5432,
    "minio": 9000,
    "training": 29500,
    "pipeline": 8888,
}


def network_parties(objects: list[dict]) -> dict[str, dict]:
    """The rendered workloads' pods, plus the pods the policies talk about that we do not ship."""
    namespace = find(objects, "Namespace", NAMESPACE)
    ns_labels = {**(namespace["metadata"].get("labels") or {}), "kubernetes.io/metadata.name": NAMESPACE}

    def ours(labels: dict) -> dict:
        return {"namespace": NAMESPACE, "namespace_labels": ns_labels, "labels": labels}

    def elsewhere(namespace: str, labels: dict, namespace_labels: dict | None = None) -> dict:
        return {
            "namespace": namespace,
            "namespace_labels": {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})},
            "labels": labels,
        }

    def labels_of(kind: str, name: str) -> dict:
        return pod_templates(find(objects, kind, name))[0][1].get("labels") or {}

    pipeline = {"shopvision.io/role": "pipeline"}
    return {
        "serving": ours(serving_pods(objects)[1].get("labels") or {}),
        "mlflow": ours(labels_of("Deployment", "mlflow")),
        "postgres": ours(labels_of("StatefulSet", "postgres")),
        "minio": ours(labels_of("Deployment", "minio")),
        "training": ours(labels_of("TrainingRuntime", "shopvision-torch-distributed")),
        "pipeline": ours(pipeline),
        # KFP standalone runs pipelines in `kubeflow`; docs/cluster.md has the operator label it.
        "pipeline-in-kubeflow": elsewhere("kubeflow", pipeline, {"shopvision.io/pipelines": "true"}),
        "pipeline-unmarked-namespace": elsewhere("team-x", pipeline),
        "ingress-controller": elsewhere("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
        "unlabelled-pod-here": ours({}),
        "stranger": elsewhere("default", {"app": "curl"}),
    }


# --------------------------------------------------------------------------------------------
# The policy


def check_containers(objects: list[dict], overlay: str) -> list[str]:
    problems = []
    for obj in objects:
        for where, _, spec in pod_templates(obj):
            pod_sc = spec.get("securityContext") or {}
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(key):
                    problems.append(f"{where}: {key} must not be set")
            if (
                spec.get("serviceAccountName") != "shopvision-pipeline"
                and spec.get("automountServiceAccountToken") is not False
            ):
                problems.append(f"{where}: automountServiceAccountToken must be false (no API access needed)")
            tmp_volumes = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
            for c in containers(spec):
                at = f"{where} container {c['name']}"
                sc = c.get("securityContext") or {}
                if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                    problems.append(f"{at}: runAsNonRoot must be true")
                if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                    problems.append(f"{at}: runAsUser must not be 0")
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{at}: readOnlyRootFilesystem must be true")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{at}: allowPrivilegeEscalation must be false")
                if sc.get("privileged"):
                    problems.append(f"{at}: privileged must not be set")
                capabilities = sc.get("capabilities") or {}
                if "ALL" not in (capabilities.get("drop") or []) or capabilities.get("add"):
                    problems.append(f"{at}: capabilities must drop ALL and add none")
                seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
                if seccomp.get("type") != "RuntimeDefault":
                    problems.append(f"{at}: seccompProfile must be RuntimeDefault")
                resources = c.get("resources") or {}
                for part in ("requests", "limits"):
                    missing = {"cpu", "memory"} - set(resources.get(part) or {})
                    if missing:
                        problems.append(f"{at}: resources.{part} must set {', '.join(sorted(missing))}")
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
                if PROJECT_IMAGE in c.get("image", "") and mounts.get("/tmp") not in tmp_volumes:
                    problems.append(
                        f"{at}: the project image needs an emptyDir at /tmp (read-only root filesystem)"
                    )
                problems += check_image(at, c.get("image", ""), overlay)
                problems += check_env(at, c)
    return problems


def check_image(at: str, image: str, overlay: str) -> list[str]:
    if overlay == "base":
        return []  # the base uses logical image names; every overlay sets registry and tag
    name = image.split("@", 1)[0]
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
    if "@sha256:" not in image and (tag is None or tag == "latest"):
        return [f"{at}: image {image!r} must carry a tag other than latest (or a digest)"]
    return []


def check_env(at: str, c: dict) -> list[str]:
    problems = []
    texts = [*(c.get("command") or []), *(c.get("args") or [])]
    for env in c.get("env") or []:
        if "value" in env:
            if SECRETISH_NAME.search(env["name"]):
                problems.append(
                    f"{at}: env {env['name']} has a literal value; reference a Secret (secretKeyRef)"
                )
            texts.append(str(env["value"]))
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref.get("key") not in SECRETS.get(ref.get("name"), set()):
            problems.append(
                f"{at}: env {env['name']} references {ref.get('name')}/{ref.get('key')}, not a documented Secret"
            )
    for source in c.get("envFrom") or []:
        if "secretRef" in source:
            problems.append(f"{at}: envFrom secretRef hides which keys are used; use secretKeyRef")
    for text in texts:
        for match in URL_CREDENTIALS.finditer(text):
            if not VAR_REFERENCE.match(match["password"]):
                problems.append(
                    f"{at}: credentials in {text!r}; build the URL from $(VARS) set by secretKeyRef"
                )
    return problems


def check_no_secrets(objects: list[dict]) -> list[str]:
    problems = []
    for obj in objects:
        if obj["kind"] == "Secret":
            problems.append(
                f"Secret/{obj['metadata']['name']} is rendered; Secrets are created by the operator (docs/cluster.md)"
            )
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data") or {}:
                if SECRETISH_NAME.search(key):
                    problems.append(f"ConfigMap/{obj['metadata']['name']} key {key} looks like a secret")
    return problems


def check_serving(objects: list[dict], overlay: str) -> list[str]:
    problems = []
    where, meta, spec = serving_pods(objects)
    labels = meta.get("labels") or {}
    c = serving_container(spec)
    if c.get("args") != SERVING_ARGS:
        problems.append(f"{where}: serving args must be {SERVING_ARGS}, got {c.get('args')}")
    routes = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
    for probe, path in routes.items():
        got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
        if got != path:
            problems.append(f"{where}: {probe} must GET {path} (Open Inference Protocol), got {got}")
    if "httpGet" not in (c.get("startupProbe") or {}):
        problems.append(f"{where}: startupProbe (httpGet) is required: loading a model takes a while")
    mlflow_service = f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"
    if env_value(c, "MLFLOW_TRACKING_URI") != mlflow_service:
        problems.append(f"{where}: MLFLOW_TRACKING_URI must be {mlflow_service}")

    pdbs = [
        o
        for o in objects
        if o["kind"] == "PodDisruptionBudget" and selects(o["spec"].get("selector"), labels)
    ]
    if not pdbs:
        problems.append(f"{where}: no PodDisruptionBudget selects the serving pods")
    if overlay == "overlays/kserve":
        isvc = find(objects, "InferenceService", "shopvision")
        if isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode") != "Standard":
            problems.append("InferenceService/shopvision: deploymentMode annotation must be Standard")
        predictor = isvc["spec"]["predictor"]
        if predictor.get("scaleMetric") != "cpu" or not predictor.get("minReplicas"):
            problems.append(
                "InferenceService/shopvision: CPU autoscaling (scaleMetric, minReplicas) required"
            )
        if any(o["kind"] == "Deployment" and o["metadata"]["name"] == "shopvision-serving" for o in objects):
            problems.append("overlays/kserve must not also render the serving Deployment")
        return problems
    deployment = find(objects, "Deployment", "shopvision-serving")
    rolling = deployment["spec"].get("strategy", {}).get("rollingUpdate") or {}
    if rolling.get("maxUnavailable") != 0:
        problems.append(
            "Deployment/shopvision-serving: maxUnavailable must be 0 (old pods serve until new ones are ready)"
        )
    if "replicas" in deployment["spec"]:
        problems.append("Deployment/shopvision-serving: leave replicas to the HorizontalPodAutoscaler")
    hpas = [
        o
        for o in objects
        if o["kind"] == "HorizontalPodAutoscaler"
        and o["spec"]["scaleTargetRef"]
        == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shopvision-serving"}
    ]
    if len(hpas) != 1 or hpas[0]["apiVersion"] != "autoscaling/v2":
        problems.append("Deployment/shopvision-serving: needs one autoscaling/v2 HorizontalPodAutoscaler")
    elif not any(
        m.get("type") == "Resource" and m["resource"]["name"] == "cpu"
        for m in hpas[0]["spec"].get("metrics") or []
    ):
        problems.append("HorizontalPodAutoscaler/shopvision-serving: must scale on CPU")
    services = [
        o
        for o in objects
        if o["kind"] == "Service"
        and o["spec"].get("selector")
        and selects({"matchLabels": o["spec"]["selector"]}, labels)
    ]
    if not any(p.get("port") == 8080 for s in services for p in s["spec"]["ports"]):
        problems.append("Deployment/shopvision-serving: no Service on port 8080 selects the serving pods")
    return problems


def check_gpu(objects: list[dict], overlay: str) -> list[str]:
    problems = []
    with_gpu = [
        f"{where} container {c['name']}"
        for obj in objects
        for where, _, spec in pod_templates(obj)
        for c in containers(spec)
        if "nvidia.com/gpu"
        in {
            **((c.get("resources") or {}).get("limits") or {}),
            **((c.get("resources") or {}).get("requests") or {}),
        }
    ]
    if overlay != "overlays/gpu":
        return [f"{at}: nvidia.com/gpu outside the gpu overlay" for at in with_gpu]
    where, _, spec = serving_pods(objects)
    c = serving_container(spec)
    if str((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")) != "1":
        problems.append(f"{where}: the gpu overlay must limit the serving container to nvidia.com/gpu: 1")
    if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
        problems.append(f"{where}: needs the nvidia.com/gpu toleration")
    if "nvidia.com/gpu.present" not in (spec.get("nodeSelector") or {}):
        problems.append(f"{where}: needs the nodeSelector nvidia.com/gpu.present")
    if not c["image"].endswith("-gpu"):
        problems.append(f"{where}: the gpu overlay must serve the CUDA image (tag ...-gpu), got {c['image']}")
    return problems


def check_rbac(objects: list[dict]) -> list[str]:
    problems = []
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(
                f"{obj['kind']}/{obj['metadata']['name']}: the pipeline gets a namespaced Role only"
            )
    roles = [o for o in objects if o["kind"] == "Role"]
    if [r["metadata"]["name"] for r in roles] != ["shopvision-pipeline"]:
        return [
            *problems,
            f"RBAC: expected exactly the Role shopvision-pipeline, got {[r['metadata']['name'] for r in roles]}",
        ]
    granted: dict[tuple, set] = {}
    for rule in roles[0].get("rules") or []:
        if rule.get("nonResourceURLs"):
            problems.append("RBAC: nonResourceURLs are not allowed")
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for name in rule.get("resourceNames") or [None]:
                    granted.setdefault((group, resource, name), set()).update(rule.get("verbs") or [])
    if granted != EXPECTED_RBAC:
        extra = {
            k: v - EXPECTED_RBAC.get(k, set()) for k, v in granted.items() if v - EXPECTED_RBAC.get(k, set())
        }
        missing = {
            k: v - granted.get(k, set()) for k, v in EXPECTED_RBAC.items() if v - granted.get(k, set())
        }
        problems.append(
            f"RBAC: Role shopvision-pipeline differs from what is allowed; extra {extra}, missing {missing}"
        )
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    expected_subjects = [{"kind": "ServiceAccount", "name": "shopvision-pipeline", "namespace": NAMESPACE}]
    if (
        len(bindings) != 1
        or bindings[0]["roleRef"]["name"] != "shopvision-pipeline"
        or bindings[0]["subjects"] != expected_subjects
    ):
        problems.append(
            "RBAC: one RoleBinding must bind Role shopvision-pipeline to ServiceAccount shopvision-pipeline only"
        )
    if not any(
        o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "shopvision-pipeline" for o in objects
    ):
        problems.append("RBAC: ServiceAccount shopvision-pipeline is missing")
    return problems


def check_network(objects: list[dict]) -> list[str]:
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    parties = network_parties(objects)
    problems = []
    for target, allowed in REACH.items():
        for source in parties:
            if source == target and target != "training":
                continue
            verdict = admits(policies, parties[target], parties[source], PORTS[target])
            if verdict and source not in allowed:
                problems.append(f"NetworkPolicy: {source} can reach {target}:{PORTS[target]}, must not")
            if not verdict and source in allowed:
                problems.append(f"NetworkPolicy: {source} cannot reach {target}:{PORTS[target]}, must")
    return problems


def check_tracking(objects: list[dict]) -> list[str]:
    problems = []
    c = container(find(objects, "Deployment", "mlflow"), "mlflow")
    args = flags(c.get("args") or [])
    if not args.get("artifacts-destination", "").startswith("s3://"):
        problems.append("mlflow: --artifacts-destination must be an s3:// URI")
    hosts = set(args.get("allowed-hosts", "").split(","))
    if not {f"mlflow.{NAMESPACE}.svc.cluster.local:*", "mlflow:*"} <= hosts:
        problems.append(f"mlflow: --allowed-hosts must allow the in-cluster names, got {sorted(hosts)}")
    if not args.get("workers"):
        problems.append("mlflow: --workers must be set")
    if env_value(c, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION") != "false":
        problems.append("mlflow: MLFLOW_SERVER_ENABLE_JOB_EXECUTION must be false")
    backend = env_value(c, "MLFLOW_BACKEND_STORE_URI") or ""
    if (
        not backend.startswith(
            "postgresql+psycopg2://"
        )  # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3
        or f"@postgres.{NAMESPACE}.svc.cluster.local:5432/" not in backend
    ):
        problems.append(f"mlflow: the backend store must be the postgres Service, got {backend!r}")
    postgres = find(objects, "StatefulSet", "postgres")
    claims = {t["metadata"]["name"] for t in postgres["spec"].get("volumeClaimTemplates") or []}
    pg_mounts = {m["name"] for m in container(postgres, "postgres").get("volumeMounts") or []}
    if not claims or not claims <= pg_mounts:
        problems.append("postgres: the StatefulSet must keep its data on a volumeClaimTemplate")
    minio = find(objects, "Deployment", "minio")
    pvcs = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    minio_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in minio["spec"]["template"]["spec"].get("volumes") or []
        if "persistentVolumeClaim" in v
    }
    if not minio_claims or not minio_claims <= pvcs:
        problems.append("minio: its data must be on a PersistentVolumeClaim of this kustomization")
    for name, port in (("mlflow", 5000), ("postgres", 5432), ("minio", 9000)):
        service = find(objects, "Service", name)
        labels = pod_templates(postgres if name == "postgres" else find(objects, "Deployment", name))[0][1][
            "labels"
        ]
        if (
            not selects({"matchLabels": service["spec"]["selector"]}, labels)
            or service["spec"]["ports"][0]["port"] != port
        ):
            problems.append(f"Service/{name}: must select the {name} pods on port {port}")
    return problems


def check_training(objects: list[dict]) -> list[str]:
    problems = []
    runtime = find(objects, "TrainingRuntime", "shopvision-torch-distributed")
    if "torch" not in runtime["spec"].get("mlPolicy", {}):
        problems.append("TrainingRuntime: mlPolicy.torch is required (torch-distributed)")
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    node = jobs.get("node")
    if (
        node is None
        or node["template"]["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step")
        != "trainer"
    ):
        return [*problems, "TrainingRuntime: needs the replicated job `node` labelled as the trainer step"]
    spec = node["template"]["spec"]["template"]["spec"]
    c = next((c for c in spec["containers"] if c["name"] == "node"), None)
    if c is None or PROJECT_IMAGE not in c["image"] or c.get("command", [])[:1] != ["torchrun"]:
        problems.append("TrainingRuntime: container `node` must run torchrun from the project image")
    shm = [v for v in spec.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"]
    if not shm or "/dev/shm" not in {m["mountPath"] for m in (c or {}).get("volumeMounts") or []}:
        problems.append("TrainingRuntime: /dev/shm must be a memory emptyDir (DataLoader workers, NCCL)")
    return problems


def policy_violations(objects: list[dict], overlay: str) -> list[str]:
    return [
        *check_containers(objects, overlay),
        *check_no_secrets(objects),
        *check_serving(objects, overlay),
        *check_gpu(objects, overlay),
        *check_rbac(objects),
        *check_network(objects),
        *check_tracking(objects),
        *check_training(objects),
    ]


# --------------------------------------------------------------------------------------------
# Schemas


def _strict(schema):
    """A CRD schema that rejects unknown fields, as `kubectl apply --validate=strict` would."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(group: str, kind: str, version: str) -> jsonschema.Draft7Validator:
    with open(CRDS / CUSTOM_KINDS[(group, kind)]) as f:
        crd = next(d for d in yaml.load_all(f, Loader=YAML_LOADER) if d)
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(_strict(schema))


def schema_errors(obj: dict) -> list[str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if (group, obj["kind"]) == ("monitoring.coreos.com", "PrometheusRule"):  # no CRD vendored
        return prometheus_rule_errors(obj)
    if (group, obj["kind"]) in CUSTOM_KINDS:
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(group, obj["kind"], version).iter_errors(obj)
        ]
    if "." in group and not group.endswith(".k8s.io"):
        return [f"{where}: custom resource of {obj['apiVersion']} without a vendored CRD in tests/crds"]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {exc}"]
    return []


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("path", RENDERED)
def test_renders_into_the_namespace(path):
    objects = render(path)
    assert len(objects) > 20
    assert not [o for o in objects if o["kind"] == "PrometheusRule"]  # it would fail without the operator
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("path", [*RENDERED, ALERTS])
def test_every_object_validates_against_its_schema(path):
    problems = [p for obj in render(path) for p in schema_errors(obj)]
    assert problems == []


@pytest.mark.parametrize("path", OVERLAYS)
def test_policy_holds(path):
    assert policy_violations(render(path), path) == []


def test_the_base_meets_the_policy_too():
    assert policy_violations(render("base"), "base") == []


def test_every_custom_resource_kind_is_covered():
    kinds = {(o["apiVersion"], o["kind"]) for path in [*RENDERED, ALERTS] for o in render(path)}
    custom = {k for k in kinds if "." in k[0].split("/")[0] and not k[0].split("/")[0].endswith(".k8s.io")}
    assert custom == {
        ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"),
        ("serving.kserve.io/v1beta1", "InferenceService"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }


def test_referenced_secrets_are_documented():
    """The operator creates the Secrets; docs/cluster.md must tell them every name and key used."""
    docs = (REPO / "docs" / "cluster.md").read_text()
    used = {
        (ref["name"], ref["key"])
        for path in OVERLAYS
        for obj in render(path)
        for _, _, spec in pod_templates(obj)
        for c in containers(spec)
        for env in c.get("env") or []
        if (ref := (env.get("valueFrom") or {}).get("secretKeyRef"))
    }
    assert used == {(name, key) for name, keys in SECRETS.items() for key in keys}
    for name, key in used:
        assert (
            f"kubectl -n {NAMESPACE} create secret generic {name}" in docs
            and f"--from-literal={key}=" in docs
        )


def test_tracking_uri_and_allowed_hosts_agree():
    """Clients in the cluster send Host: mlflow.<ns>.svc.cluster.local:5000; the server must accept it."""
    objects = render("overlays/gpu")
    hosts = flags(container(find(objects, "Deployment", "mlflow"), "mlflow")["args"])["allowed-hosts"].split(
        ","
    )
    uris = {
        env_value(c, "MLFLOW_TRACKING_URI")
        for obj in objects
        for _, _, spec in pod_templates(obj)
        for c in containers(spec)
        if env_value(c, "MLFLOW_TRACKING_URI")
    }
    assert uris == {f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"}
    host = uris.pop().split("//", 1)[1]
    assert any(re.fullmatch(re.escape(h).replace(r"\*", ".*"), host) for h in hosts)


# -- the checks catch what they should: one broken rule each


def _mlflow(objects):
    return container(find(objects, "Deployment", "mlflow"), "mlflow")


def _serving(objects):
    return serving_container(serving_pods(objects)[2])


def _policy(objects, name):
    return find(objects, "NetworkPolicy", name)


MUTATIONS: list[tuple[str, str, Callable[[list[dict]], object], str]] = [
    (
        "overlays/gpu",
        "writable root filesystem",
        lambda o: _mlflow(o)["securityContext"].pop("readOnlyRootFilesystem"),
        "readOnlyRootFilesystem must be true",
    ),
    (
        "overlays/local",
        "privilege escalation",
        lambda o: container(find(o, "StatefulSet", "postgres"), "postgres")["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "allowPrivilegeEscalation",
    ),
    (
        "overlays/gpu",
        "a capability kept",
        lambda o: _serving(o)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "capabilities must drop ALL",
    ),
    (
        "overlays/gpu",
        "seccomp unconfined",
        lambda o: container(find(o, "Deployment", "minio"), "minio")["securityContext"].update(
            seccompProfile={"type": "Unconfined"}
        ),
        "seccompProfile",
    ),
    (
        "overlays/gpu",
        "root user",
        lambda o: container(find(o, "Deployment", "mlflow"), "ensure-buckets")["securityContext"].update(
            runAsNonRoot=False
        ),
        "runAsNonRoot",
    ),
    (
        "overlays/gpu",
        "no limits on training",
        lambda o: container(find(o, "TrainingRuntime", "shopvision-torch-distributed"), "node")[
            "resources"
        ].pop("limits"),
        "resources.limits",
    ),
    (
        "overlays/kserve",
        "no requests on the predictor",
        lambda o: _serving(o)["resources"].pop("requests"),
        "resources.requests",
    ),
    (
        "overlays/local",
        "a literal password",
        lambda o: _mlflow(o)["env"].append({"name": "DB_PASSWORD", "value": "hunter2"}),
        "literal value",
    ),
    (
        "overlays/local",
        "a password in a URL",
        lambda o: next(e for e in _mlflow(o)["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI").update(
            value="postgresql://mlflow:hunter2@postgres:5432/mlflow"
        ),
        "credentials in",
    ),
    (
        "overlays/gpu",
        "a Secret shipped",
        lambda o: o.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3", "namespace": NAMESPACE},
                "stringData": {"k": "v"},
            }
        ),
        "Secret/s3 is rendered",
    ),
    (
        "overlays/gpu",
        "an undocumented Secret",
        lambda o: _mlflow(o)["env"].append(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}}
        ),
        "not a documented Secret",
    ),
    (
        "overlays/gpu",
        "a latest image",
        lambda o: _serving(o).update(image="registry.example.com/shopvision:latest"),
        "tag other than latest",
    ),
    (
        "overlays/gpu",
        "readiness on the wrong route",
        lambda o: _serving(o)["readinessProbe"]["httpGet"].update(path="/health"),
        "readinessProbe must GET /v2/health/ready",
    ),
    (
        "overlays/kserve",
        "no liveness probe",
        lambda o: _serving(o).pop("livenessProbe"),
        "livenessProbe must GET /v2/health/live",
    ),
    ("overlays/gpu", "no startup probe", lambda o: _serving(o).pop("startupProbe"), "startupProbe"),
    (
        "overlays/local",
        "a GPU outside the gpu overlay",
        lambda o: _serving(o)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "nvidia.com/gpu outside the gpu overlay",
    ),
    (
        "overlays/gpu",
        "no GPU in the gpu overlay",
        lambda o: _serving(o)["resources"]["limits"].pop("nvidia.com/gpu"),
        "nvidia.com/gpu: 1",
    ),
    (
        "overlays/gpu",
        "no PodDisruptionBudget",
        lambda o: o.remove(find(o, "PodDisruptionBudget", "shopvision-serving")),
        "PodDisruptionBudget",
    ),
    (
        "overlays/gpu",
        "no autoscaler",
        lambda o: o.remove(find(o, "HorizontalPodAutoscaler", "shopvision-serving")),
        "HorizontalPodAutoscaler",
    ),
    (
        "overlays/gpu",
        "a wider Role",
        lambda o: find(o, "Role", "shopvision-pipeline")["rules"][2]["verbs"].append("update"),
        "RBAC: Role shopvision-pipeline differs",
    ),
    (
        "overlays/gpu",
        "deployments of any name",
        lambda o: find(o, "Role", "shopvision-pipeline")["rules"][2].pop("resourceNames"),
        "RBAC: Role shopvision-pipeline differs",
    ),
    (
        "overlays/gpu",
        "secrets readable",
        lambda o: find(o, "Role", "shopvision-pipeline")["rules"].append(
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
        ),
        "extra {('', 'secrets', None)",
    ),
    (
        "overlays/gpu",
        "a ClusterRole",
        lambda o: o.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "x"},
                "rules": [],
            }
        ),
        "ClusterRole/x",
    ),
    (
        "overlays/gpu",
        "serving open to every namespace",
        lambda o: _policy(o, "shopvision-serving")["spec"]["ingress"][0]["from"][0].update(
            namespaceSelector={}
        ),
        "stranger can reach serving",
    ),
    (
        "overlays/kserve",
        "serving closed to the ingress",
        lambda o: _policy(o, "shopvision-serving")["spec"]["ingress"][0]["from"].pop(0),
        "ingress-controller cannot reach serving",
    ),
    (
        "overlays/gpu",
        "mlflow open to its own namespace",
        lambda o: _policy(o, "mlflow")["spec"]["ingress"][0]["from"].append({"podSelector": {}}),
        "unlabelled-pod-here can reach mlflow",
    ),
    (
        "overlays/gpu",
        "postgres reachable from training",
        lambda o: _policy(o, "postgres")["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"shopvision.io/role": "training"}}}
        ),
        "training can reach postgres",
    ),
    (
        "overlays/gpu",
        "no default deny",
        lambda o: o.remove(_policy(o, "default-deny-ingress")),
        "can reach pipeline",
    ),
    (
        "overlays/gpu",
        "serving pods relabelled",
        lambda o: serving_pods(o)[1]["labels"].update({"shopvision.io/role": "web"}),
        "ingress-controller cannot reach serving",
    ),
    (
        "overlays/gpu",
        "allowed-hosts without the in-cluster name",
        lambda o: _mlflow(o)["args"].__setitem__(-1, "--allowed-hosts=localhost:*"),
        "--allowed-hosts must allow",
    ),
    (
        "overlays/local",
        "artifacts on local disk",
        lambda o: _mlflow(o)["args"].__setitem__(4, "--artifacts-destination=/tmp/artifacts"),
        "--artifacts-destination",
    ),
]


@pytest.mark.parametrize(("path", "what", "mutate", "expected"), MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_the_policy_reports_a_broken_rule(path, what, mutate, expected):
    objects = render(path)
    mutate(objects)
    problems = policy_violations(objects, path)
    assert any(expected in p for p in problems), f"{what}: not reported; got {problems}"


def test_schema_validation_rejects_unknown_fields():
    objects = render("overlays/kserve")
    deployment = copy.deepcopy(find(objects, "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelled
    assert schema_errors(deployment)
    isvc = copy.deepcopy(find(objects, "InferenceService", "shopvision"))
    isvc["spec"]["predictor"]["minReplica"] = 1  # misspelled
    assert any("minReplica" in e for e in schema_errors(isvc))
    runtime = copy.deepcopy(find(objects, "TrainingRuntime", "shopvision-torch-distributed"))
    runtime["spec"]["mlPolicy"]["numNodes"] = "two"
    assert any("numNodes" in e for e in schema_errors(runtime))


def test_the_alerts_render_alone_into_the_namespace():
    objects = render(ALERTS)
    assert [(o["kind"], o["metadata"]["namespace"]) for o in objects] == [("PrometheusRule", NAMESPACE)]
    assert objects[0]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "shopvision"
