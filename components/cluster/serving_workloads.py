"""The serving workloads the deploy step changes, through the Kubernetes API: a Deployment or a KServe InferenceService.

Each workload reads itself, patches the part of its pod template deploy owns (with a
resourceVersion precondition: a 409 becomes `Conflict`, for the caller to read again), judges its
rollout with the plain-dict checks in `rollout`, and lists its pods. `rollout_problems` says why
the new version's pods are not ready, for error messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import StepError
from .kube_api import status_message
from .rollout import (
    MODEL_VERSION_ANNOTATION,
    Rollout,
    ServingState,
    deployment_rollout,
    find_condition,
    inference_service_rollout,
    model_version_of,
    serving_state,
)

KINDS = ("deployment", "inferenceservice")
ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ISVC_POD_LABEL = "serving.kserve.io/inferenceservice"  # KServe puts it on every pod of the service


class Conflict(Exception):
    """409: the object changed between our read and our patch (resourceVersion precondition)."""


def api_call(what: str, call: Callable[[], Any], not_found: str | None = None) -> dict:
    """Run one API call with `_preload_content=False`; return its JSON body; API errors become StepErrors."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        response = call()
    except ApiException as exc:
        if exc.status == 409:
            raise Conflict(what) from exc
        if exc.status == 404 and not_found:
            raise StepError(not_found) from exc
        if exc.status in (401, 403):
            raise StepError(
                f"{what}: the Kubernetes API refused ({exc.status} {exc.reason}); the pipeline's ServiceAccount "
                "needs the shopvision-pipeline Role from manifests/base/rbac.yaml"
            ) from exc
        message = status_message(exc)
        if message is None:  # not a Status object: a proxy's page, say
            message = str(exc.body or "")[:200]
        raise StepError(f"{what}: Kubernetes API error {exc.status} {exc.reason}: {message}") from exc
    except HTTPError as exc:
        raise StepError(f"{what}: cannot reach the Kubernetes API server ({exc})") from exc
    data = response.data
    return json.loads(data) if data else {}


class Workload:
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
        body = api_call(
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


class _Deployment(Workload):
    kind = "Deployment"

    def __init__(self, api_client, namespace: str, name: str) -> None:
        from kubernetes import client

        super().__init__(api_client, namespace, name)
        self.apps = client.AppsV1Api(api_client)

    def read(self) -> dict:
        return api_call(
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
        api_call(
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


class _InferenceService(Workload):
    kind = "InferenceService"

    def __init__(self, api_client, namespace: str, name: str) -> None:
        from kubernetes import client

        super().__init__(api_client, namespace, name)
        self.custom = client.CustomObjectsApi(api_client)

    def read(self) -> dict:
        return api_call(
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
        api_call(
            f"patch {self.what}",
            lambda: self.custom.patch_namespaced_custom_object(
                ISVC_GROUP, ISVC_VERSION, self.namespace, ISVC_PLURAL, self.name, body, _preload_content=False
            ),
        )

    def rollout(self, obj: dict, state: ServingState) -> Rollout:
        return inference_service_rollout(obj, self.list_pods(obj), state.model_version)

    def pod_selector(self, obj: dict) -> str:
        return f"{ISVC_POD_LABEL}={self.name}"


def workload_for(kind: str, api_client, namespace: str, name: str) -> Workload:
    if kind == "deployment":
        return _Deployment(api_client, namespace, name)
    if kind == "inferenceservice":
        return _InferenceService(api_client, namespace, name)
    raise StepError(f"unknown --kind {kind!r}: choose one of {', '.join(KINDS)}")


def rollout_problems(workload: Workload, version: str | None, limit: int = 6) -> list[str]:
    """Why the new version's pods are not ready, for the error message (best effort: never raises)."""
    try:
        pods = workload.list_pods(workload.read())
    except StepError:
        return []
    problems: list[str] = []
    log_shown = False
    for pod in pods:
        if model_version_of(pod) != version:
            continue  # a pod of the previous version
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        scheduled = find_condition(pod, "PodScheduled")
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
