"""Plain-data rollout logic for the deploy step: the serving container's `--model`, and whether a rollout is done.

Deploy owns two things in the pod template and nothing else: the `--model` argument of the
serving container (the one container whose args carry `--model`) and the annotation
`shopvision.io/model-version`. `serving_state` reads them; `with_model` changes the argument.
`deployment_rollout` checks what `kubectl rollout status` checks: the controller has seen the
change (observedGeneration), every replica is updated and available, no old replica is left, and
the Deployment did not report ProgressDeadlineExceeded. `inference_service_rollout` does the same
for a KServe InferenceService, telling the new version's pods apart by the annotation.
Everything here works on plain dicts; the Kubernetes calls are in `serving_workloads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import StepError

MODEL_VERSION_ANNOTATION = "shopvision.io/model-version"


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


def find_condition(obj: dict, kind: str) -> dict | None:
    """The status condition of type `kind` of a Kubernetes object (a plain dict), else None."""
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
    progressing = find_condition(deployment, "Progressing")
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
    condition = find_condition(pod, "Ready")
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
    ready = find_condition(isvc, "Ready")
    if not ready or ready.get("status") != "True":
        reason = (ready or {}).get("reason") or "no Ready condition yet"
        return Rollout(False, f"InferenceService not Ready ({reason})")
    running = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    new = [p for p in running if model_version_of(p) == version]
    old = len(running) - len(new)
    ready_new = sum(_pod_ready(p) for p in new)
    if not new or ready_new < len(new):
        return Rollout(False, f"{ready_new} of {len(new)} pods of the new version ready")
    if old:
        return Rollout(False, f"{old} pods of the previous version still running")
    return Rollout(True, f"{ready_new} pods of the new version ready")


def model_version_of(obj: dict) -> str | None:
    """The shopvision.io/model-version annotation of an object (a pod), else None."""
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(MODEL_VERSION_ANNOTATION)
