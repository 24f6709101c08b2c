"""The deploy step: roll the serving workload to the model version an MLflow alias points at.

models:/NAME@ALIAS is resolved to a version once, here, and the workload is pinned to
models:/NAME/VERSION. Pods started later (autoscaler, node drain) then load the same model as the
ones started now, and a rollback is a change back to a named version, not to "whatever the alias
says today".

Deploy owns two things in the pod template and nothing else: the `--model` argument of the
serving container (the one container whose args carry `--model`) and the annotation
`shopvision.io/model-version`. Changing either makes the controller roll out new pods. The wait
checks what `kubectl rollout status` checks: the controller has seen the change
(observedGeneration), every replica is updated and available, no old replica is left, and the
Deployment did not report ProgressDeadlineExceeded. When the rollout does not finish in time, the
previous args and annotation are patched back; the old pods never stopped serving meanwhile
(the manifests use maxUnavailable: 0), so a rollback is quick.

The Kubernetes calls live in the two workload classes (a Deployment; a KServe InferenceService) and
in `_pod_problems`; deciding whether a rollout is done works on plain dicts (`deployment_rollout`,
`inference_service_rollout`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

from .errors import StepError

MODEL_VERSION_ANNOTATION = "shopvision.io/model-version"
KINDS = ("deployment", "inferenceservice")
ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ISVC_POD_LABEL = "serving.kserve.io/inferenceservice"  # KServe puts it on every pod of the service
CONFLICT_RETRIES = 3
MAX_ROLLBACK_WAIT_S = 300.0


@dataclass(frozen=True)
class ServingState:
    """The part of the pod template deploy owns, as read before a change and restored on rollback."""

    container: str
    args: tuple[str, ...]
    model_version: str | None  # the annotation; None when absent

    @property
    def model_uri(self) -> str | None:
        return model_argument(self.args)


@dataclass(frozen=True)
class Rollout:
    done: bool
    detail: str  # what is being waited for, or what finished
    failed: str | None = None  # the controller says it cannot finish: no point in waiting longer


@dataclass(frozen=True)
class DeployResult:
    kind: str
    namespace: str
    target: str
    model_name: str
    alias: str
    version: str
    model_uri: str
    previous_model_uri: str | None
    changed: bool
    seconds: float


class _Conflict(Exception):
    """409: the object changed between our read and our patch (resourceVersion precondition)."""


# ---------------------------------------------------------------------------------------------
# MLflow


def resolve_alias(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version `models:/NAME@ALIAS` points at, as a string ("3")."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise StepError(
            "no MLflow tracking server given: pass --tracking-uri or set MLFLOW_TRACKING_URI "
            "(in the cluster: http://mlflow.shopvision.svc.cluster.local:5000)"
        )
    try:
        version = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        first_line = str(exc.message).strip().splitlines()[0] if exc.message else exc.error_code
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise StepError(
                f"cannot resolve models:/{name}@{alias} in MLflow at {uri}: {first_line} "
                f"(register a version and point the alias at it, e.g. with the promote step)"
            ) from exc
        if exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "ENDPOINT_NOT_FOUND"):
            # what the REST client raises when the server is down, unreachable or not MLflow
            raise StepError(
                f"cannot reach MLflow at {uri} to resolve models:/{name}@{alias}: {first_line}"
            ) from exc
        raise StepError(
            f"MLflow at {uri} refused to resolve models:/{name}@{alias}: {exc.error_code}: {first_line}"
        ) from exc
    except OSError as exc:  # requests' connection errors are OSErrors too
        raise StepError(f"cannot reach MLflow at {uri} to resolve models:/{name}@{alias}: {exc}") from exc
    return str(version.version)


# ---------------------------------------------------------------------------------------------
# Plain-data helpers: pod templates, container args, rollout decisions


def model_argument(args: Sequence[str]) -> str | None:
    """The value of `--model` in a container's args (`--model X` or `--model=X`), else None."""
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def with_model(args: Sequence[str], model_uri: str) -> tuple[str, ...]:
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--model" and i + 1 < len(out):
            out[i + 1] = model_uri
            return tuple(out)
        if arg.startswith("--model="):
            out[i] = f"--model={model_uri}"
            return tuple(out)
    raise ValueError("no --model argument")  # serving_state() only returns containers that have one


def serving_state(pod_template: dict, what: str) -> ServingState:
    containers = (pod_template.get("spec") or {}).get("containers") or []
    serving = [c for c in containers if model_argument(c.get("args") or []) is not None]
    if len(serving) != 1:
        names = ", ".join(c.get("name", "?") for c in containers) or "none"
        raise StepError(
            f"{what}: expected exactly one container whose args carry --model (the serving container, "
            f"as in manifests/base), found {len(serving)} among containers: {names}"
        )
    annotations = (pod_template.get("metadata") or {}).get("annotations") or {}
    container = serving[0]
    return ServingState(
        container=container["name"],
        args=tuple(container.get("args") or ()),
        model_version=annotations.get(MODEL_VERSION_ANNOTATION),
    )


def _condition(obj: dict, kind: str) -> dict | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def deployment_rollout(deployment: dict) -> Rollout:
    """Is the Deployment's latest pod template fully rolled out? The checks of `kubectl rollout status`."""
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation", 0)
    if generation > status.get("observedGeneration", 0):
        return Rollout(False, "waiting for the Deployment controller to see the change")
    progressing = _condition(deployment, "Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Rollout(False, "progress deadline exceeded", failed=progressing.get("message") or "")
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < wanted:
        return Rollout(False, f"{updated} of {wanted} replicas updated")
    if total > updated:
        return Rollout(False, f"{total - updated} old replicas still running")
    if available < updated:
        return Rollout(False, f"{available} of {updated} updated replicas available")
    return Rollout(True, f"{available} of {wanted} replicas updated and available")


def _pod_ready(pod: dict) -> bool:
    condition = _condition(pod, "Ready")
    return bool(condition) and condition.get("status") == "True"


def inference_service_rollout(isvc: dict, pods: list[dict], version: str | None) -> Rollout:
    """Is the InferenceService serving `version` from every pod?

    KServe's Ready condition alone is not enough: in Standard (raw Deployment) mode it stays True
    while the old pods serve. The pods carry the predictor's annotations, so the new version's pods
    are told apart by shopvision.io/model-version.
    """
    status = isvc.get("status") or {}
    generation = (isvc.get("metadata") or {}).get("generation", 0)
    if generation > status.get("observedGeneration", 0):
        return Rollout(False, "waiting for the KServe controller to see the change")
    transition = (status.get("modelStatus") or {}).get("transitionStatus")
    if transition in ("BlockedByFailedLoad", "InvalidSpec"):
        return Rollout(False, f"model status {transition}", failed=f"KServe reports {transition}")
    ready = _condition(isvc, "Ready")
    if not ready or ready.get("status") != "True":
        reason = (ready or {}).get("reason") or "no Ready condition yet"
        return Rollout(False, f"InferenceService not Ready ({reason})")
    running = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    new = [p for p in running if _annotation(p) == version]
    old = len(running) - len(new)
    ready_new = sum(_pod_ready(p) for p in new)
    if not new or ready_new < len(new):
        return Rollout(False, f"{ready_new} of {len(new)} pods of the new version ready")
    if old:
        return Rollout(False, f"{old} pods of the previous version still running")
    return Rollout(True, f"{ready_new} pods of the new version ready")


def _annotation(obj: dict) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(MODEL_VERSION_ANNOTATION)


# ---------------------------------------------------------------------------------------------
# Kubernetes: the only place that talks to the API server


def kube_api_client():
    """An API client from the pod's service account when running in a cluster, else from kubeconfig."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass  # a KUBERNETES_SERVICE_HOST without a service account token: try kubeconfig
    try:
        # KUBECONFIG is read now, not when the kubernetes package was imported (it may be a:b:c list).
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG") or None)
    except (config.ConfigException, OSError) as exc:
        raise StepError(
            f"no Kubernetes credentials: not in a pod with a service account, and no usable kubeconfig ({exc})"
        ) from exc


def _api(what: str, call: Callable[[], Any], not_found: str | None = None) -> dict:
    """Run one API call with `_preload_content=False`; return its JSON body; API errors become StepErrors."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        response = call()
    except ApiException as exc:
        if exc.status == 409:
            raise _Conflict(what) from exc
        if exc.status == 404 and not_found:
            raise StepError(not_found) from exc
        if exc.status in (401, 403):
            raise StepError(
                f"{what}: the Kubernetes API refused ({exc.status} {exc.reason}); the pipeline's ServiceAccount "
                "needs the shopvision-pipeline Role from manifests/base/rbac.yaml"
            ) from exc
        raise StepError(
            f"{what}: Kubernetes API error {exc.status} {exc.reason}: {_api_message(exc)}"
        ) from exc
    except HTTPError as exc:
        raise StepError(f"{what}: cannot reach the Kubernetes API server ({exc})") from exc
    data = response.data
    return json.loads(data) if data else {}


def _api_message(exc) -> str:
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")[:200]


class _Workload:
    """A thing whose pod template deploy changes: read it, patch it, judge its rollout, list its pods."""

    kind = ""

    def __init__(self, api_client, namespace: str, name: str) -> None:
        from kubernetes import client

        self.namespace, self.name = namespace, name
        self.core = client.CoreV1Api(api_client)

    @property
    def what(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def state(self, obj: dict) -> ServingState:
        return serving_state(self.pod_template(obj), self.what)

    def pod_template(self, obj: dict) -> dict:
        raise NotImplementedError

    def read(self) -> dict:
        raise NotImplementedError

    def patch(self, obj: dict, state: ServingState) -> None:
        raise NotImplementedError

    def rollout(self, obj: dict, state: ServingState) -> Rollout:
        raise NotImplementedError

    def pod_selector(self, obj: dict) -> str:
        raise NotImplementedError

    def list_pods(self, obj: dict) -> list[dict]:
        selector = self.pod_selector(obj)
        body = _api(
            f"list pods of {self.what}",
            lambda: self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _preload_content=False
            ),
        )
        return body.get("items") or []

    def pod_log_tail(self, pod: str, container: str, previous: bool, lines: int = 5) -> list[str]:
        response = self.core.read_namespaced_pod_log(
            pod,
            self.namespace,
            container=container,
            tail_lines=lines,
            previous=previous,
            _preload_content=False,
        )
        return response.data.decode("utf-8", "replace").strip().splitlines()[-lines:]


class _Deployment(_Workload):
    kind = "Deployment"

    def __init__(self, api_client, namespace: str, name: str) -> None:
        from kubernetes import client

        super().__init__(api_client, namespace, name)
        self.apps = client.AppsV1Api(api_client)

    def read(self) -> dict:
        return _api(
            f"read {self.what}",
            lambda: self.apps.read_namespaced_deployment(self.name, self.namespace, _preload_content=False),
            not_found=(
                f"{self.what} not found: apply the manifests first (kubectl apply -k manifests/overlays/...) "
                "or pass the right --namespace/--deployment"
            ),
        )

    def pod_template(self, obj: dict) -> dict:
        return (obj.get("spec") or {}).get("template") or {}

    def patch(self, obj: dict, state: ServingState) -> None:
        # Strategic merge: containers merge by name, `args` is replaced whole, a null annotation is removed.
        # resourceVersion makes the patch fail with 409 if the Deployment changed since `obj` was read.
        body = {
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
            "spec": {
                "template": {
                    "metadata": {"annotations": {MODEL_VERSION_ANNOTATION: state.model_version}},
                    "spec": {"containers": [{"name": state.container, "args": list(state.args)}]},
                }
            },
        }
        _api(
            f"patch {self.what}",
            lambda: self.apps.patch_namespaced_deployment(
                self.name, self.namespace, body, _preload_content=False
            ),
        )

    def rollout(self, obj: dict, state: ServingState) -> Rollout:
        return deployment_rollout(obj)

    def pod_selector(self, obj: dict) -> str:
        labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class _InferenceService(_Workload):
    kind = "InferenceService"

    def __init__(self, api_client, namespace: str, name: str) -> None:
        from kubernetes import client

        super().__init__(api_client, namespace, name)
        self.custom = client.CustomObjectsApi(api_client)

    def read(self) -> dict:
        return _api(
            f"read {self.what}",
            lambda: self.custom.get_namespaced_custom_object(
                ISVC_GROUP, ISVC_VERSION, self.namespace, ISVC_PLURAL, self.name, _preload_content=False
            ),
            not_found=(
                f"{self.what} not found: apply manifests/overlays/kserve first, or pass the right "
                "--namespace/--deployment (the InferenceService's name)"
            ),
        )

    def pod_template(self, obj: dict) -> dict:
        predictor = (obj.get("spec") or {}).get("predictor") or {}
        return {
            "metadata": {"annotations": predictor.get("annotations") or {}},
            "spec": {"containers": predictor.get("containers") or []},
        }

    def patch(self, obj: dict, state: ServingState) -> None:
        # A JSON merge patch (custom resources have no strategic merge) replaces lists whole, so the
        # containers go back complete, with only the serving container's args changed.
        containers = [
            {**c, "args": list(state.args)} if c.get("name") == state.container else c
            for c in obj["spec"]["predictor"]["containers"]
        ]
        body = {
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
            "spec": {
                "predictor": {
                    "annotations": {MODEL_VERSION_ANNOTATION: state.model_version},
                    "containers": containers,
                }
            },
        }
        _api(
            f"patch {self.what}",
            lambda: self.custom.patch_namespaced_custom_object(
                ISVC_GROUP, ISVC_VERSION, self.namespace, ISVC_PLURAL, self.name, body, _preload_content=False
            ),
        )

    def rollout(self, obj: dict, state: ServingState) -> Rollout:
        return inference_service_rollout(obj, self.list_pods(obj), state.model_version)

    def pod_selector(self, obj: dict) -> str:
        return f"{ISVC_POD_LABEL}={self.name}"


def _workload(kind: str, api_client, namespace: str, name: str) -> _Workload:
    if kind == "deployment":
        return _Deployment(api_client, namespace, name)
    if kind == "inferenceservice":
        return _InferenceService(api_client, namespace, name)
    raise StepError(f"unknown --kind {kind!r}: choose one of {', '.join(KINDS)}")


def _pod_problems(workload: _Workload, version: str | None, limit: int = 6) -> list[str]:
    """Why the new version's pods are not ready, for the error message (best effort: never raises)."""
    try:
        pods = workload.list_pods(workload.read())
    except StepError:
        return []
    problems: list[str] = []
    log_shown = False
    for pod in pods:
        if _annotation(pod) != version:
            continue  # a pod of the previous version
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        scheduled = _condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            problems.append(
                f"pod {name}: not scheduled: {scheduled.get('message') or scheduled.get('reason')}"
            )
        for cs in status.get("containerStatuses") or []:
            if cs.get("ready"):
                continue
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            reason = waiting.get("reason") or "not ready"
            text = f"pod {name} container {cs['name']}: {reason}"
            if waiting.get("message"):
                text += f" ({waiting['message'][:200]})"
            if last:
                text += f"; last exit {last.get('exitCode')} {last.get('reason', '')}".rstrip()
            text += f"; restarts {cs.get('restartCount', 0)}"
            problems.append(text)
            if not log_shown and cs.get("restartCount", 0) > 0:
                log_shown = True
                try:
                    tail = workload.pod_log_tail(name, cs["name"], previous=True)
                except Exception:  # logs are a courtesy; RBAC or a vanished pod must not hide the real error
                    tail = []
                problems += [f"    | {line}" for line in tail]
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit else [])


# ---------------------------------------------------------------------------------------------
# The step


def _wait(
    workload: _Workload,
    state: ServingState,
    timeout: float,
    poll_interval: float,
    progress: TextIO,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Rollout:
    deadline = clock() + timeout
    shown = None
    while True:
        try:
            rollout = workload.rollout(workload.read(), state)
        except StepError as exc:
            # An API hiccup is no verdict on the rollout: keep polling until the deadline.
            rollout = Rollout(False, f"cannot read the rollout state: {exc}")
        if rollout.detail != shown:
            shown = rollout.detail
            print(f"deploy: {workload.what}: {rollout.detail}", file=progress, flush=True)
        if rollout.done or rollout.failed is not None or clock() >= deadline:
            return rollout
        sleep(max(0.0, min(poll_interval, deadline - clock())))


def _change(workload: _Workload, model_uri: str, version: str) -> tuple[ServingState, ServingState]:
    """Patch the pod template to the new model; return (previous, new) states. Retries on 409."""
    for _ in range(CONFLICT_RETRIES):
        obj = workload.read()
        previous = workload.state(obj)
        new = replace(previous, args=with_model(previous.args, model_uri), model_version=version)
        if new == previous:
            return previous, new
        try:
            workload.patch(obj, new)
            return previous, new
        except _Conflict:
            continue  # someone (the autoscaler, another client) wrote in between: read again
    raise StepError(f"{workload.what} kept changing while deploy tried to patch it (409 Conflict); run again")


def _roll_back(workload: _Workload, previous: ServingState, ours: ServingState) -> str | None:
    """Patch the previous args/annotation back; None on success, else why not."""
    for _ in range(CONFLICT_RETRIES):
        obj = workload.read()
        now = workload.state(obj)
        if now != ours:
            return f"not rolled back: {workload.what} was changed by someone else meanwhile (it now runs {now.model_uri})"
        try:
            workload.patch(obj, previous)
            return None
        except _Conflict:
            continue
    return f"not rolled back: {workload.what} kept changing (409 Conflict)"


def deploy(
    name: str,
    alias: str = "champion",
    *,
    namespace: str,
    target: str = "shopvision-serving",
    kind: str = "deployment",
    timeout: float = 600.0,
    tracking_uri: str | None = None,
    api_client=None,
    poll_interval: float = 2.0,
    rollback_timeout: float | None = None,
    progress: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DeployResult:
    """Roll `kind` NAMESPACE/TARGET to models:/NAME/<version of @ALIAS>; roll back when not ready in time."""
    if kind not in KINDS:
        raise StepError(f"unknown --kind {kind!r}: choose one of {', '.join(KINDS)}")
    if timeout <= 0:
        raise StepError(f"--timeout must be positive, got {timeout}")
    progress = progress or sys.stderr
    started = clock()

    version = resolve_alias(name, alias, tracking_uri)  # before touching the cluster
    model_uri = f"models:/{name}/{version}"
    print(f"deploy: models:/{name}@{alias} is version {version}", file=progress, flush=True)

    workload = _workload(kind, api_client or kube_api_client(), namespace, target)
    previous, new = _change(workload, model_uri, version)
    changed = new != previous
    if changed:
        print(
            f"deploy: {workload.what}: {previous.model_uri} -> {model_uri}; waiting up to {timeout:g} s",
            file=progress,
            flush=True,
        )
    else:
        print(
            f"deploy: {workload.what} already runs {model_uri}; checking it is ready",
            file=progress,
            flush=True,
        )

    rollout = _wait(workload, new, timeout, poll_interval, progress, clock, sleep)
    if rollout.done:
        return DeployResult(
            kind=workload.kind,
            namespace=namespace,
            target=target,
            model_name=name,
            alias=alias,
            version=version,
            model_uri=model_uri,
            previous_model_uri=previous.model_uri,
            changed=changed,
            seconds=clock() - started,
        )

    why = f"failed: {rollout.failed}" if rollout.failed is not None else f"not ready after {timeout:g} s"
    problems = _pod_problems(workload, version)
    details = "".join(f"\n  {line}" for line in problems) or f"\n  last state: {rollout.detail}"
    if not changed:
        raise StepError(f"{workload.what} runs {model_uri} but is {why}; nothing to roll back to{details}")

    try:
        refused = _roll_back(workload, previous, new)
    except StepError as exc:
        raise StepError(
            f"rollout of {model_uri} to {workload.what} {why}; rolling back failed: {exc}{details}"
        ) from exc
    if refused:
        raise StepError(f"rollout of {model_uri} to {workload.what} {why}; {refused}{details}")
    wait_back = min(timeout, MAX_ROLLBACK_WAIT_S) if rollback_timeout is None else rollback_timeout
    back = _wait(workload, previous, wait_back, poll_interval, progress, clock, sleep)
    after = (
        "the previous version is ready again"
        if back.done
        else f"the rollback is not ready either after {wait_back:g} s ({back.detail}); "
        f"check: kubectl -n {namespace} get pods"
    )
    raise StepError(
        f"rollout of {model_uri} to {workload.what} {why}; rolled back to {previous.model_uri} "
        f"(annotation {MODEL_VERSION_ANNOTATION}={previous.model_version}): {after}{details}"
    )


def summary(result: DeployResult) -> str:
    target = f"{result.kind} {result.namespace}/{result.target}"
    if not result.changed:
        return f"deploy: {target} already serves {result.model_uri} (alias {result.alias}); ready"
    return (
        f"deploy: {target} now serves {result.model_uri} (alias {result.alias}; "
        f"was {result.previous_model_uri}); rolled out in {result.seconds:.0f} s"
    )
