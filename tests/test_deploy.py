"""The deploy step against a fake Kubernetes API server and a real MLflow registry.

No real kube-apiserver can run on these machines (no container engine, and no package ships the
binary), so the Kubernetes side is `FakeCluster` below: a small HTTP server on 127.0.0.1, started
by the tests, that answers the endpoints deploy uses (apps/v1 Deployments GET and strategic-merge
PATCH, serving.kserve.io/v1beta1 InferenceServices GET and merge PATCH, core/v1 pods list and log),
with resourceVersion preconditions (409) and generation bumps on spec changes, and a controller
thread that advances status on its own like the Deployment controller would (surge one new pod,
keep the old ones serving, report ProgressDeadlineExceeded when asked to). It is driven through the
real `kubernetes` client, so URLs, content types and JSON bodies are the ones a cluster would get.
What it does not emulate: ReplicaSets as objects, real scheduling, watch, admission, RBAC.

MLflow is real: a SQLite tracking store with a registered model, two versions and an alias.
"""

from __future__ import annotations

import copy
import http.server
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

import pytest
from kubernetes import client

from shopvision.components.cluster import deploy as deploy_module
from shopvision.components.cluster.deploy import deploy
from shopvision.components.cluster.rollout import (
    MODEL_VERSION_ANNOTATION,
    Rollout,
    deployment_rollout,
    model_argument,
    serving_state,
    with_model,
)
from shopvision.components.errors import StepError

NAMESPACE = "shopvision"
MODEL = "shopvision"
FAST = {"poll_interval": 0.05}

# --------------------------------------------------------------------------------------------
# The fake API server

STRATEGIC_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name"}


def strategic_merge(target: dict, patch: dict) -> None:
    """The parts of strategic merge patch deploy relies on: maps merge, null deletes, containers merge by name."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            strategic_merge(target[key], value)
        elif isinstance(value, list) and key in STRATEGIC_MERGE_KEYS and isinstance(target.get(key), list):
            merge_key = STRATEGIC_MERGE_KEYS[key]
            for item in value:
                match = next((t for t in target[key] if t.get(merge_key) == item.get(merge_key)), None)
                if match is None:
                    target[key].append(copy.deepcopy(item))
                else:
                    strategic_merge(match, item)
        else:
            target[key] = copy.deepcopy(value)


def merge_patch(target: dict, patch: dict) -> None:
    """RFC 7386 JSON merge patch: maps merge, null deletes, lists are replaced."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def status_body(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeCluster:
    """In-memory Deployments/InferenceServices with a controller thread; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.deployments: dict[tuple[str, str], dict] = {}
        self.isvcs: dict[tuple[str, str], dict] = {}
        self.rollouts: dict[tuple[str, str, str], dict] = {}  # per workload: stable template, change time
        self.resource_version = 100
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.healthy: Callable[[dict], bool] = lambda template: True
        self.ready_after = 0.15  # seconds a healthy new pod takes to become ready
        self.progress_deadline: float | None = None  # seconds; None: never report ProgressDeadlineExceeded
        self.conflicts_to_inject = 0
        self._stop = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.threads = [
            threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True),
            threading.Thread(target=self._control_loop, daemon=True),
        ]

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeCluster:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # -- objects

    def _next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def add_deployment(self, name: str, model_uri: str, version: str | None, replicas: int = 2) -> None:
        labels = {"app.kubernetes.io/name": name}
        template = {
            "metadata": {"labels": dict(labels), "annotations": {}},
            "spec": {
                "containers": [
                    {
                        "name": "serving",
                        "image": "registry.example.com/shopvision:0.1.0-gpu",
                        "args": ["serve", "--model", model_uri, "--host", "0.0.0.0", "--port", "8080"],
                        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}},
                    }
                ]
            },
        }
        if version is not None:
            template["metadata"]["annotations"][MODEL_VERSION_ANNOTATION] = version
        obj = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "generation": 1,
                "resourceVersion": self._next_rv(),
            },
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template},
            "status": {},
        }
        with self.lock:
            self.deployments[(NAMESPACE, name)] = obj
            self.rollouts[("deployment", NAMESPACE, name)] = {
                "stable": copy.deepcopy(template),
                "since": time.monotonic(),
            }
            # Settled from the start, as a Deployment that has been running: no status write (and no
            # resourceVersion bump) can then race with the first read and patch of a test.
            self._reconcile(("deployment", NAMESPACE, name), obj, template, replicas)

    def add_inference_service(self, name: str, model_uri: str, version: str) -> None:
        predictor = {
            "annotations": {MODEL_VERSION_ANNOTATION: version},
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "registry.example.com/shopvision:0.1.0-gpu",
                    "args": ["serve", "--model", model_uri, "--host", "0.0.0.0", "--port", "8080"],
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                }
            ],
        }
        obj = {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "generation": 1,
                "resourceVersion": self._next_rv(),
            },
            "spec": {"predictor": predictor},
            "status": {},
        }
        with self.lock:
            self.isvcs[(NAMESPACE, name)] = obj
            self.rollouts[("isvc", NAMESPACE, name)] = {
                "stable": self._isvc_template(obj),
                "since": time.monotonic(),
            }
            self._reconcile(("isvc", NAMESPACE, name), obj, self._isvc_template(obj), 1)

    def deployment(self, name: str) -> dict:
        with self.lock:
            return copy.deepcopy(self.deployments[(NAMESPACE, name)])

    def isvc(self, name: str) -> dict:
        with self.lock:
            return copy.deepcopy(self.isvcs[(NAMESPACE, name)])

    def patches(self) -> list[tuple[str, str, str]]:
        """PATCH requests that changed an object (a 409 Conflict does not count)."""
        return [r[:3] for r in self.requests if r[0] == "PATCH" and r[3] == 200]

    @staticmethod
    def _isvc_template(obj: dict) -> dict:
        predictor = obj["spec"]["predictor"]
        return {
            "metadata": {"annotations": copy.deepcopy(predictor.get("annotations") or {})},
            "spec": {"containers": copy.deepcopy(predictor["containers"])},
        }

    # -- the controller: advances status and decides which pods exist

    def _control_loop(self) -> None:
        while not self._stop.wait(0.02):
            with self.lock:
                for (ns, name), obj in self.deployments.items():
                    self._reconcile(
                        ("deployment", ns, name), obj, obj["spec"]["template"], obj["spec"]["replicas"]
                    )
                for (ns, name), obj in self.isvcs.items():
                    self._reconcile(("isvc", ns, name), obj, self._isvc_template(obj), 1)

    def _reconcile(self, key: tuple[str, str, str], obj: dict, template: dict, wanted: int) -> None:
        track = self.rollouts[key]
        now = time.monotonic()
        if obj["status"].get("observedGeneration") != obj["metadata"]["generation"]:
            track["since"] = now  # a new pod template: a rollout starts
        rolling = template != track["stable"]
        elapsed = now - track["since"]
        if rolling and self.healthy(template) and elapsed >= self.ready_after:
            track["stable"] = copy.deepcopy(template)  # the new pods are ready: old ones go
            rolling = False
        if not rolling:
            status = {
                "replicas": wanted,
                "updatedReplicas": wanted,
                "readyReplicas": wanted,
                "availableReplicas": wanted,
            }
            pods = [(template, True)] * wanted
            conditions = [
                {"type": "Available", "status": "True"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ]
        else:  # maxSurge 1, maxUnavailable 0: one new pod next to all the old, still available ones
            status = {
                "replicas": wanted + 1,
                "updatedReplicas": 1,
                "readyReplicas": wanted,
                "availableReplicas": wanted,
            }
            pods = [(track["stable"], True)] * wanted + [(template, False)]
            progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
            if self.progress_deadline is not None and elapsed > self.progress_deadline:
                progressing = {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": f'ReplicaSet "{key[2]}-new" has timed out progressing.',
                }
            conditions = [{"type": "Available", "status": "True"}, progressing]
        if key[0] == "isvc":
            status = {"conditions": [{"type": "Ready", "status": "True"}]}  # raw mode: old pods keep it Ready
        else:
            status["conditions"] = conditions
        status["observedGeneration"] = obj["metadata"]["generation"]
        if status != obj["status"]:
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = self._next_rv()
        track["pods"] = [self._pod(key, i, t, ready) for i, (t, ready) in enumerate(pods)]

    def _pod(self, key: tuple[str, str, str], index: int, template: dict, ready: bool) -> dict:
        kind, ns, name = key
        labels = (
            {"serving.kserve.io/inferenceservice": name}
            if kind == "isvc"
            else dict(template["metadata"]["labels"])
        )
        container = template["spec"]["containers"][0]["name"]
        state = (
            {"running": {}}
            if ready
            else {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 10s restarting failed container",
                }
            }
        )
        return {
            "metadata": {
                "name": f"{name}-{model_argument(template['spec']['containers'][0]['args']).rsplit('/', 1)[-1]}-{index}",
                "namespace": ns,
                "labels": labels,
                "annotations": copy.deepcopy(template["metadata"].get("annotations") or {}),
            },
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": str(ready)},
                ],
                "containerStatuses": [
                    {
                        "name": container,
                        "ready": ready,
                        "restartCount": 0 if ready else 4,
                        "state": state,
                        "lastState": {} if ready else {"terminated": {"exitCode": 1, "reason": "Error"}},
                    }
                ],
            },
        }

    def pods(self, ns: str, selector: dict[str, str]) -> list[dict]:
        with self.lock:
            pods = [
                p for (_, pns, _), track in self.rollouts.items() if pns == ns for p in track.get("pods", [])
            ]
            return [
                copy.deepcopy(p)
                for p in pods
                if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())
            ]

    # -- HTTP

    def _handler(self):
        cluster = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.record[3] = code
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                query = urllib.parse.parse_qs(url.query)
                self.record = [self.command, url.path, self.headers.get("Content-Type", ""), None]
                cluster.requests.append(self.record)
                return parts, query

            def do_GET(self) -> None:
                parts, query = self._route()
                with cluster.lock:
                    if parts[:3] == ["apis", "apps", "v1"] and parts[5:6] == ["deployments"]:
                        return self._get(cluster.deployments, parts[4], parts[6], "deployments.apps")
                    if parts[:3] == ["apis", "serving.kserve.io", "v1beta1"] and parts[5:6] == [
                        "inferenceservices"
                    ]:
                        return self._get(
                            cluster.isvcs, parts[4], parts[6], "inferenceservices.serving.kserve.io"
                        )
                    if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"] and len(parts) == 5:
                        selector = dict(
                            s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s
                        )
                        return self._send(
                            200,
                            {
                                "kind": "PodList",
                                "apiVersion": "v1",
                                "items": cluster.pods(parts[3], selector),
                            },
                        )
                    if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"] and parts[6:7] == ["log"]:
                        log = "loading the model\nTraceback (most recent call last):\nRuntimeError: cannot load the model\n"
                        return self._send(200, log, "text/plain")
                self._send(404, status_body(404, "NotFound", f"no route {self.path}"))

            def _get(self, store: dict, ns: str, name: str, resource: str) -> None:
                obj = store.get((ns, name))
                if obj is None:
                    return self._send(404, status_body(404, "NotFound", f'{resource} "{name}" not found'))
                self._send(200, obj)

            def do_PATCH(self) -> None:
                parts, _ = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content_type = self.headers.get("Content-Type", "")
                with cluster.lock:
                    if parts[:3] == ["apis", "apps", "v1"] and parts[5:6] == ["deployments"]:
                        store, merge, accepted = (
                            cluster.deployments,
                            strategic_merge,
                            "application/strategic-merge-patch+json",
                        )
                        resource = "deployments.apps"
                    elif parts[:3] == ["apis", "serving.kserve.io", "v1beta1"] and parts[5:6] == [
                        "inferenceservices"
                    ]:
                        store, merge, accepted = cluster.isvcs, merge_patch, "application/merge-patch+json"
                        resource = "inferenceservices.serving.kserve.io"
                    else:
                        return self._send(404, status_body(404, "NotFound", f"no route {self.path}"))
                    if content_type != accepted:
                        return self._send(415, status_body(415, "UnsupportedMediaType", content_type))
                    obj = store.get((parts[4], parts[6]))
                    if obj is None:
                        return self._send(
                            404, status_body(404, "NotFound", f'{resource} "{parts[6]}" not found')
                        )
                    expected = (body.get("metadata") or {}).pop("resourceVersion", None)
                    if cluster.conflicts_to_inject:
                        cluster.conflicts_to_inject -= 1
                        obj["metadata"]["resourceVersion"] = cluster._next_rv()  # "someone else wrote"
                    if expected is not None and expected != obj["metadata"]["resourceVersion"]:
                        return self._send(409, status_body(409, "Conflict", "the object has been modified"))
                    updated = copy.deepcopy(obj)
                    merge(updated, body)
                    if updated["spec"] != obj["spec"]:
                        updated["metadata"]["generation"] += 1
                    updated["metadata"]["resourceVersion"] = cluster._next_rv()
                    store[(parts[4], parts[6])] = updated
                    self._send(200, updated)

        return Handler


@pytest.fixture
def cluster():
    fake = FakeCluster().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A real MLflow registry (SQLite): model `shopvision`, versions 1 and 2, @champion -> 2, @previous -> 1."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow_client = MlflowClient(tracking_uri=uri)
    mlflow_client.create_registered_model(MODEL)
    for _ in range(2):
        mlflow_client.create_model_version(MODEL, source=str(folder / "model"))
    mlflow_client.set_registered_model_alias(MODEL, "champion", "2")
    mlflow_client.set_registered_model_alias(MODEL, "previous", "1")
    return uri


def args_of(obj: dict) -> list[str]:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"][0]["args"]
    return obj["spec"]["predictor"]["containers"][0]["args"]


def annotation_of(obj: dict) -> str | None:
    meta = obj["spec"]["template"]["metadata"] if obj["kind"] == "Deployment" else obj["spec"]["predictor"]
    return (meta.get("annotations") or {}).get(MODEL_VERSION_ANNOTATION)


# --------------------------------------------------------------------------------------------
# The four cases the issue asks for, and their neighbours


def test_rolls_the_deployment_to_the_alias_version(cluster, registry):
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", "1")
    result = deploy(
        MODEL,
        "champion",
        namespace=NAMESPACE,
        tracking_uri=registry,
        api_client=cluster.api_client(),
        timeout=10,
        **FAST,
    )
    assert (result.version, result.model_uri, result.previous_model_uri, result.changed) == (
        "2",
        "models:/shopvision/2",
        "models:/shopvision/1",
        True,
    )
    obj = cluster.deployment("shopvision-serving")
    assert args_of(obj) == ["serve", "--model", "models:/shopvision/2", "--host", "0.0.0.0", "--port", "8080"]
    assert annotation_of(obj) == "2"
    assert deployment_rollout(obj).done
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("0.1.0-gpu") and container["readinessProbe"]  # the rest is untouched
    patches = cluster.patches()
    assert len(patches) == 1
    assert patches[0][1] == "/apis/apps/v1/namespaces/shopvision/deployments/shopvision-serving"
    assert patches[0][2] == "application/strategic-merge-patch+json"


def test_a_rollout_that_never_gets_ready_is_rolled_back(cluster, registry):
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", "1")
    cluster.healthy = lambda template: (
        model_argument(template["spec"]["containers"][0]["args"]) != "models:/shopvision/2"
    )
    started = time.monotonic()
    with pytest.raises(StepError) as caught:
        deploy(
            MODEL,
            "champion",
            namespace=NAMESPACE,
            tracking_uri=registry,
            api_client=cluster.api_client(),
            timeout=1.0,
            **FAST,
        )
    message = str(caught.value)
    assert "not ready after 1 s" in message and "rolled back to models:/shopvision/1" in message
    assert "the previous version is ready again" in message
    assert (
        "CrashLoopBackOff" in message and "RuntimeError: cannot load the model" in message
    )  # pod status and log
    obj = cluster.deployment("shopvision-serving")
    assert args_of(obj) == ["serve", "--model", "models:/shopvision/1", "--host", "0.0.0.0", "--port", "8080"]
    assert annotation_of(obj) == "1"
    assert len(cluster.patches()) == 2  # forward, back
    assert time.monotonic() - started < 8


def test_progress_deadline_exceeded_rolls_back_without_waiting_for_the_timeout(cluster, registry):
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", "1")
    cluster.healthy = lambda template: (
        template["metadata"]["annotations"].get(MODEL_VERSION_ANNOTATION) != "2"
    )
    cluster.progress_deadline = 0.2
    started = time.monotonic()
    with pytest.raises(
        StepError, match=r"failed: ReplicaSet .* timed out progressing.*rolled back to models:/shopvision/1"
    ):
        deploy(
            MODEL,
            "champion",
            namespace=NAMESPACE,
            tracking_uri=registry,
            api_client=cluster.api_client(),
            timeout=60,
            **FAST,
        )
    assert time.monotonic() - started < 10
    assert args_of(cluster.deployment("shopvision-serving"))[2] == "models:/shopvision/1"


def test_a_missing_deployment_is_a_clear_error(cluster, registry):
    with pytest.raises(
        StepError, match=r"Deployment shopvision/shopvision-serving not found: apply the manifests"
    ):
        deploy(
            MODEL,
            "champion",
            namespace=NAMESPACE,
            tracking_uri=registry,
            api_client=cluster.api_client(),
            **FAST,
        )
    assert cluster.patches() == []


def test_a_missing_alias_is_a_clear_error_and_touches_nothing(cluster, registry):
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", "1")
    with pytest.raises(
        StepError, match=r"cannot resolve models:/shopvision@staging .*alias staging not found"
    ):
        deploy(
            MODEL,
            "staging",
            namespace=NAMESPACE,
            tracking_uri=registry,
            api_client=cluster.api_client(),
            **FAST,
        )
    with pytest.raises(StepError, match=r"cannot resolve models:/nosuchmodel@champion"):
        deploy(
            "nosuchmodel", namespace=NAMESPACE, tracking_uri=registry, api_client=cluster.api_client(), **FAST
        )
    assert cluster.requests == []  # the cluster is not even read


def test_an_unreachable_mlflow_is_a_clear_error(cluster, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StepError, match=rf"cannot reach MLflow at http://127.0.0.1:{port}"):
        deploy(
            MODEL,
            namespace=NAMESPACE,
            tracking_uri=f"http://127.0.0.1:{port}",
            api_client=cluster.api_client(),
        )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(StepError, match="pass --tracking-uri or set MLFLOW_TRACKING_URI"):
        deploy(MODEL, namespace=NAMESPACE, api_client=cluster.api_client())


def test_already_at_the_version_changes_nothing(cluster, registry):
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", "1")
    result = deploy(
        MODEL, "previous", namespace=NAMESPACE, tracking_uri=registry, api_client=cluster.api_client(), **FAST
    )
    assert not result.changed and result.model_uri == "models:/shopvision/1"
    assert cluster.patches() == []


def test_a_concurrent_write_is_retried_with_a_fresh_read(cluster, registry):
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", None)  # never deployed by this step
    cluster.conflicts_to_inject = 1
    result = deploy(
        MODEL, namespace=NAMESPACE, tracking_uri=registry, api_client=cluster.api_client(), timeout=10, **FAST
    )
    assert result.changed and result.previous_model_uri == "models:/shopvision/1"
    assert len(cluster.patches()) == 1
    assert [r[3] for r in cluster.requests if r[0] == "PATCH"] == [409, 200]  # read again after the conflict
    assert annotation_of(cluster.deployment("shopvision-serving")) == "2"


def test_rollback_removes_an_annotation_that_was_not_there(cluster, registry):
    cluster.add_deployment(
        "shopvision-serving", "models:/shopvision@champion", None
    )  # as applied from manifests/base
    cluster.healthy = lambda template: MODEL_VERSION_ANNOTATION not in template["metadata"]["annotations"]
    with pytest.raises(StepError, match=r"rolled back to models:/shopvision@champion"):
        deploy(
            MODEL,
            namespace=NAMESPACE,
            tracking_uri=registry,
            api_client=cluster.api_client(),
            timeout=0.8,
            **FAST,
        )
    obj = cluster.deployment("shopvision-serving")
    assert annotation_of(obj) is None and args_of(obj)[2] == "models:/shopvision@champion"


def test_rolls_an_inference_service(cluster, registry):
    cluster.add_inference_service("shopvision", "models:/shopvision/1", "1")
    result = deploy(
        MODEL,
        namespace=NAMESPACE,
        target="shopvision",
        kind="inferenceservice",
        tracking_uri=registry,
        api_client=cluster.api_client(),
        timeout=10,
        **FAST,
    )
    assert result.kind == "InferenceService" and result.version == "2"
    obj = cluster.isvc("shopvision")
    assert args_of(obj)[2] == "models:/shopvision/2" and annotation_of(obj) == "2"
    assert obj["spec"]["predictor"]["containers"][0]["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert cluster.patches()[0][2] == "application/merge-patch+json"


def test_the_cli_uses_kubeconfig_and_prints_one_line_errors(cluster, registry, tmp_path, monkeypatch, capsys):
    from shopvision.cli import main

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": cluster.url}}],
                "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}
                ],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    cluster.add_deployment("shopvision-serving", "models:/shopvision/1", "1")
    argv = [
        "deploy",
        "--name",
        MODEL,
        "--alias",
        "champion",
        "--namespace",
        NAMESPACE,
        "--deployment",
        "shopvision-serving",
    ]
    assert main([*argv, "--timeout", "10"]) == 0
    out = capsys.readouterr()
    assert "now serves models:/shopvision/2 (alias champion; was models:/shopvision/1)" in out.out
    assert "models:/shopvision@champion is version 2" in out.err  # progress goes to stderr
    assert main([*argv[:-1], "elsewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("shopvision deploy: error: Deployment shopvision/elsewhere not found")


def test_no_credentials_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(StepError, match="no Kubernetes credentials"):
        deploy_module.kube_api_client()


# --------------------------------------------------------------------------------------------
# The plain-data decisions


def dep(generation=2, observed=2, replicas=2, updated=2, total=2, available=2, conditions=()):
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": updated,
            "replicas": total,
            "availableReplicas": available,
            "conditions": list(conditions),
        },
    }


@pytest.mark.parametrize(
    ("deployment", "done", "detail"),
    [
        (dep(), True, "2 of 2 replicas updated and available"),
        (dep(observed=1), False, "waiting for the Deployment controller"),
        (dep(updated=1, total=3), False, "1 of 2 replicas updated"),
        (dep(total=3), False, "1 old replicas still running"),
        (dep(available=1), False, "1 of 2 updated replicas available"),
        (dep(replicas=0, updated=0, total=0, available=0), True, "0 of 0"),
    ],
)
def test_deployment_rollout_follows_kubectl_rollout_status(deployment, done, detail):
    rollout = deployment_rollout(deployment)
    assert rollout.done is done and detail in rollout.detail and rollout.failed is None


def test_progress_deadline_is_a_failure_not_a_wait():
    condition = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": "timed out",
    }
    rollout = deployment_rollout(dep(updated=1, total=3, conditions=[condition]))
    assert rollout == Rollout(False, "progress deadline exceeded", failed="timed out")


def test_model_argument_in_both_spellings():
    assert model_argument(["serve", "--model", "models:/a/1"]) == "models:/a/1"
    assert model_argument(["serve", "--model=models:/a/1"]) == "models:/a/1"
    assert model_argument(["serve"]) is None
    assert with_model(["serve", "--model=models:/a@champion", "--port", "8080"], "models:/a/3") == (
        "serve",
        "--model=models:/a/3",
        "--port",
        "8080",
    )


def test_the_serving_container_must_be_unambiguous():
    template = {"spec": {"containers": [{"name": "a", "args": ["serve"]}, {"name": "b", "args": []}]}}
    with pytest.raises(
        StepError, match="exactly one container whose args carry --model.*found 0 among containers: a, b"
    ):
        serving_state(template, "Deployment x/y")
    template["spec"]["containers"][0]["args"] = ["serve", "--model", "models:/a/1"]
    state = serving_state(template, "Deployment x/y")
    assert (state.container, state.model_uri, state.model_version) == ("a", "models:/a/1", None)


def test_the_fake_speaks_the_real_clients_wire_format(cluster):
    """Guards the fake: the real client's request for an unknown object gets a proper 404 Status."""
    with pytest.raises(client.exceptions.ApiException) as caught:
        client.AppsV1Api(cluster.api_client()).read_namespaced_deployment("nope", NAMESPACE)
    assert caught.value.status == 404 and json.loads(caught.value.body)["reason"] == "NotFound"
