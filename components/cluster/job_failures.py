"""Why a training job's pods are in trouble: OOMKilled, exit codes, unschedulable, image pulls.

Best effort: `failure_details` lists the job's pods with a CoreV1Api-like client and never raises,
so the job's own failure is never hidden behind a failure to explain it. `pod_problems` reads one
pod (a plain dict).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from .kube_api import REQUEST_TIMEOUT_S, api_message
from .training_jobs import JOB_KINDS


def condition_text(condition: Mapping) -> str:
    """A condition's (or a container state's) reason and message, as one line."""
    reason, message = condition.get("reason") or "", condition.get("message") or ""
    if reason and message:
        return f"{reason}: {message}"
    return reason or message or "no reason given"


_WAITING_PROBLEMS = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


def pod_problems(pod: Mapping) -> list[str]:
    """Why one pod (a plain dict) is not running well: OOMKilled, exit codes, unschedulable, image pulls."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    found = []
    if status.get("reason"):  # Evicted, DeadlineExceeded, ...
        found.append(
            f"pod {name}: {status['reason']}" + (f": {status['message']}" if status.get("message") else "")
        )
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            found.append(f"pod {name}: not scheduled: {condition_text(condition)}")
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        container = cs.get("name", "?")
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in _WAITING_PROBLEMS:
            found.append(f"pod {name}: container {container} {condition_text(waiting)}")
        for when, terminated in (("", state.get("terminated")), ("previously ", last.get("terminated"))):
            if terminated and (terminated.get("exitCode", 0) != 0 or terminated.get("reason") == "OOMKilled"):
                restarts = f", {cs['restartCount']} restarts" if cs.get("restartCount") else ""
                text = terminated.get("reason") or "Error"
                found.append(
                    f"pod {name}: container {container} {when}terminated: {text} "
                    f"(exit code {terminated.get('exitCode', '?')}{restarts})"
                )
                break
    return found


def failure_details(core_api, kind: str, namespace: str, name: str, *, limit: int = 10) -> list[str]:
    """Pod-level reasons for a job's trouble, from a CoreV1Api-like client: [] when the pods show none,
    one "(pod details unavailable: ...)" line when they cannot be listed (RBAC, network)."""
    job = JOB_KINDS[kind]
    try:
        response = core_api.list_namespaced_pod(
            namespace,
            label_selector=f"{job.pod_label}={name}",
            _request_timeout=REQUEST_TIMEOUT_S,
            _preload_content=False,
        )
        pods = json.loads(response.data).get("items") or []
    except Exception as exc:  # details are a bonus: never hide the job's own failure behind them
        return [f"(pod details unavailable: {api_message(exc)})"]
    found = [line for pod in pods for line in pod_problems(pod)]
    if len(found) > limit:
        found = found[:limit] + [f"... and {len(found) - limit} more"]
    return found
