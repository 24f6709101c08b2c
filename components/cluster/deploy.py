"""The deploy step: roll the serving workload to the model version an MLflow alias points at.

models:/NAME@ALIAS is resolved to a version once, here, and the workload is pinned to
models:/NAME/VERSION. Pods started later (autoscaler, node drain) then load the same model as the
ones started now, and a rollback is a change back to a named version, not to "whatever the alias
says today".

Deploy changes only the serving container's `--model` argument and the annotation
`shopvision.io/model-version` (see `rollout`); changing either makes the controller roll out new
pods. The wait checks what `kubectl rollout status` checks. When the rollout does not finish in
time, the previous args and annotation are patched back; the old pods never stopped serving
meanwhile (the manifests use maxUnavailable: 0), so a rollback is quick.

The Kubernetes calls live in `serving_workloads` (a Deployment; a KServe InferenceService);
deciding whether a rollout is done works on plain dicts, in `rollout`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

from ..errors import StepError
from .kube_api import kube_api_client, poll_until
from .rollout import MODEL_VERSION_ANNOTATION, Rollout, ServingState, with_model
from .serving_workloads import KINDS, Conflict, Workload, rollout_problems, workload_for

CONFLICT_RETRIES = 3
MAX_ROLLBACK_WAIT_S = 300.0


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
# The step


def _wait(
    workload: Workload,
    state: ServingState,
    timeout: float,
    poll_interval: float,
    progress: TextIO,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Rollout:
    rollout: Rollout
    shown = None

    def settled() -> bool:
        nonlocal rollout, shown
        try:
            rollout = workload.rollout(workload.read(), state)
        except StepError as exc:
            # An API hiccup is no verdict on the rollout: keep polling until the deadline.
            rollout = Rollout(False, f"cannot read the rollout state: {exc}")
        if rollout.detail != shown:
            shown = rollout.detail
            print(f"deploy: {workload.what}: {rollout.detail}", file=progress, flush=True)
        return rollout.done or rollout.failed is not None

    poll_until(settled, timeout_s=timeout, poll_s=poll_interval, clock=clock, sleep=sleep)
    return rollout


def _change(workload: Workload, model_uri: str, version: str) -> tuple[ServingState, ServingState]:
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
        except Conflict:
            continue  # someone (the autoscaler, another client) wrote in between: read again
    raise StepError(f"{workload.what} kept changing while deploy tried to patch it (409 Conflict); run again")


def _roll_back(workload: Workload, previous: ServingState, ours: ServingState) -> str | None:
    """Patch the previous args/annotation back; None on success, else why not."""
    for _ in range(CONFLICT_RETRIES):
        obj = workload.read()
        now = workload.state(obj)
        if now != ours:
            return f"not rolled back: {workload.what} was changed by someone else meanwhile (it now runs {now.model_uri})"
        try:
            workload.patch(obj, previous)
            return None
        except Conflict:
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

    workload = workload_for(kind, api_client or kube_api_client(), namespace, target)
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
    problems = rollout_problems(workload, version)
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
