"""Run a TrainJob or PyTorchJob (built by `training_jobs`) on the cluster and clean it up.

`run_cluster_job` creates the job, polls its status conditions until it succeeds or fails (raising
StepError with the job's own reason and message, plus pod-level reasons from `job_failures` when
a CoreV1Api is given) or the timeout passes, and deletes what it created in every case: success,
failure, timeout, Ctrl-C and SIGTERM (what a KFP task pod gets when its run is cancelled).

The Kubernetes calls are three on the custom object (create, get, delete) and one optional pod
list; deciding what a status means works on plain dicts (`job_state`). No Kubernetes API server
can run on these machines: the tests drive this module through the real `kubernetes` client
against a small fake API server on 127.0.0.1 that scripts status transitions.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import StepError
from .job_failures import condition_text, failure_details
from .kube_api import REQUEST_TIMEOUT_S, api_message, http_status, poll_until
from .training_jobs import JOB_KINDS, JobKind

DELETE_ATTEMPTS = 3
DELETE_BACKOFF_S = 1.0  # times the attempt number, between delete attempts


# --------------------------------------------------------------------------------------------
# Reading a job's status (plain dicts)


@dataclass(frozen=True)
class JobState:
    phase: str  # "succeeded", "failed" or "running" (anything not yet terminal)
    reason: str  # the terminal condition's reason and message, for failures
    summary: str  # one line for the progress log


def _true_conditions(obj: Mapping) -> list[dict]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return [c for c in conditions if isinstance(c, dict) and c.get("status") == "True"]


def _replica_summary(kind: JobKind, status: Mapping) -> str:
    parts = []
    if kind.kind == "TrainJob":
        for job in status.get("jobsStatus") or []:
            counts = ", ".join(f"{job.get(k, 0)} {k}" for k in ("active", "ready", "succeeded", "failed"))
            parts.append(f"{job.get('name', '?')}: {counts}")
    else:
        for replica, counts in sorted((status.get("replicaStatuses") or {}).items()):
            text = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("active", "succeeded", "failed"))
            parts.append(f"{replica}: {text}")
    return "; ".join(parts)


def job_state(kind: str | JobKind, obj: Mapping) -> JobState:
    """What a TrainJob's or PyTorchJob's status says: succeeded, failed (with why) or still running."""
    job = kind if isinstance(kind, JobKind) else JOB_KINDS[kind]
    true = _true_conditions(obj)
    by_type = {c.get("type"): c for c in true}
    shown = ", ".join(f"{c.get('type')}" + (f" ({c['reason']})" if c.get("reason") else "") for c in true)
    replicas = _replica_summary(job, obj.get("status") or {})
    summary = "; ".join(p for p in (shown or "no conditions yet", replicas) if p)
    if job.failed in by_type:  # a job that reports both has failed
        return JobState("failed", condition_text(by_type[job.failed]), summary)
    if job.succeeded in by_type:
        return JobState("succeeded", "", summary)
    return JobState("running", "", summary)


# --------------------------------------------------------------------------------------------
# Create, watch, delete


class Interrupted(KeyboardInterrupt):
    """SIGTERM while waiting (a cancelled KFP run stops its pod so): unwinds like Ctrl-C, through the cleanup."""


class _SignalGuard:
    """While active, SIGTERM raises Interrupted; during cleanup, SIGINT and SIGTERM wait until it is done.

    Only the main thread can own signal handlers; elsewhere the guard does nothing (Ctrl-C still
    reaches the main thread, and the finally clause still deletes).
    """

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.active = threading.current_thread() is threading.main_thread()
        self.previous: dict[int, object] = {}
        self.held: str | None = None  # a signal that arrived during the clean-up

    def __enter__(self) -> _SignalGuard:
        if self.active:
            self.previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._interrupt)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @staticmethod
    def _interrupt(signum, frame) -> None:
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")

    @contextmanager
    def shielded(self) -> Iterator[None]:
        if not self.active:
            yield
            return

        def later(signum, frame) -> None:
            self.held = signal.Signals(signum).name
            self.log(f"got {self.held}: finishing the clean-up first")

        saved = {s: signal.signal(s, later) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def _minutes(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _delete(api, job: JobKind, namespace: str, name: str, log: Callable[[str], None]) -> bool:
    what = f"{job.kind} {namespace}/{name}"
    for attempt in range(1, DELETE_ATTEMPTS + 1):
        try:
            # Background: the object goes now; the garbage collector removes its JobSet/pods after it.
            api.delete_namespaced_custom_object(
                job.group,
                job.version,
                namespace,
                job.plural,
                name,
                propagation_policy="Background",
                _request_timeout=REQUEST_TIMEOUT_S,
            )
            log(f"deleted {what}")
            return True
        except Exception as exc:
            if http_status(exc) == 404:
                log(f"{what} is already gone")
                return True
            log(f"could not delete {what} (try {attempt} of {DELETE_ATTEMPTS}): {api_message(exc)}")
            if attempt < DELETE_ATTEMPTS:
                time.sleep(DELETE_BACKOFF_S * attempt)
    return False


def dropped_fields(sent, returned, path: str = "") -> list[str]:
    """Paths of fields we sent that the API server's answer lacks: what its CRD version pruned as unknown.

    A structural CRD drops unknown fields silently, so an older Trainer (podTemplateOverrides,
    no runtimePatches) would run the job without its volume, node selector and tolerations.
    Defaulting and webhooks only add fields; anything missing was pruned.
    """
    if isinstance(sent, Mapping) and isinstance(returned, Mapping):
        found = []
        for key, value in sent.items():
            where = f"{path}.{key}" if path else key
            if key not in returned:
                found.append(where)
            else:
                found += dropped_fields(value, returned[key], where)
        return found
    if isinstance(sent, list) and isinstance(returned, list) and len(sent) == len(returned):
        return [
            p
            for i, (a, b) in enumerate(zip(sent, returned, strict=True))
            for p in dropped_fields(a, b, f"{path}[{i}]")
        ]
    return []


def _print(line: str) -> None:
    print(line, flush=True)  # a pod's stdout is a pipe: unflushed progress would show up only at the end


def _with_details(message: str, details: list[str]) -> str:
    return message if not details else message + "\n  " + "\n  ".join(details)


def _watch(
    api,
    job: JobKind,
    kind: str,
    namespace: str,
    name: str,
    *,
    timeout_s: float,
    poll_s: float,
    log: Callable[[str], None],
    core_api,
) -> None:
    what = f"{job.kind} {namespace}/{name}"
    start = time.monotonic()
    last_summary, failing_reads = None, 0

    def details() -> list[str]:
        return failure_details(core_api, kind, namespace, name) if core_api is not None else []

    def finished() -> bool:
        nonlocal last_summary, failing_reads
        try:
            obj = api.get_namespaced_custom_object(
                job.group, job.version, namespace, job.plural, name, _request_timeout=REQUEST_TIMEOUT_S
            )
            failing_reads = 0
        except Exception as exc:
            status = http_status(exc)
            if status == 404:
                raise StepError(f"{what} disappeared before it finished (deleted by someone else?)") from exc
            if status in (401, 403):
                raise StepError(f"not allowed to read {what}: {api_message(exc)}") from exc
            # The API server restarting, a network blip, throttling: keep polling until the timeout.
            failing_reads += 1
            if failing_reads == 1:
                log(f"could not read {what} ({api_message(exc)}); retrying until the timeout")
            return False
        elapsed = time.monotonic() - start
        state = job_state(job, obj)
        if state.summary != last_summary:
            log(f"{what} after {_minutes(elapsed)}: {state.summary}")
            last_summary = state.summary
        if state.phase == "succeeded":
            log(f"{what} succeeded after {_minutes(elapsed)}")
            return True
        if state.phase == "failed":
            raise StepError(_with_details(f"{what} failed: {state.reason}", details()))
        return False

    if not poll_until(finished, timeout_s=timeout_s, poll_s=poll_s):
        raise StepError(
            _with_details(
                f"{what} did not finish within the timeout of {_minutes(timeout_s)}; "
                f"last status: {last_summary or 'never read'}",
                details(),
            )
        )


def run_cluster_job(
    api,
    kind: str,
    manifest: Mapping,
    *,
    timeout_s: float,
    poll_s: float = 10,
    log: Callable[[str], None] = _print,
    core_api=None,
) -> None:
    """Create the job, wait until it succeeds, and delete it; StepError with the job's reason otherwise.

    `api` is a kubernetes.client.CustomObjectsApi (or anything with its create/get/delete methods);
    `core_api`, optional, a CoreV1Api used to add pod-level reasons (OOMKilled, Unschedulable, ...)
    to failures and timeouts. The job is deleted on every way out, Ctrl-C and SIGTERM included;
    if even that fails, the error says how to delete it by hand.
    """
    if kind not in JOB_KINDS:
        raise StepError(f"unknown job kind {kind!r}; choose from {', '.join(JOB_KINDS)}")
    job = JOB_KINDS[kind]
    if manifest.get("kind") != job.kind:
        raise StepError(f"kind {kind!r} needs a {job.kind} manifest, got {manifest.get('kind')!r}")
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    what = f"{job.kind} {namespace}/{name}"
    maybe_created = False
    outcome: BaseException | None = None
    with _SignalGuard(log) as guard:
        try:
            maybe_created = True  # from the moment the request may have left: a reply can be lost
            try:
                created = api.create_namespaced_custom_object(
                    job.group,
                    job.version,
                    namespace,
                    job.plural,
                    dict(manifest),
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
            except Exception as exc:
                status = http_status(exc)
                if status is None:
                    raise  # no answer: it may exist, so the clean-up below still deletes it
                maybe_created = False  # the server refused it: nothing of ours to delete
                hint = {
                    404: f" (is the {job.kind} CRD installed, and does namespace {namespace} exist?)",
                    409: " (a job of that name already exists; it is not ours, so it is left alone)",
                }.get(status, "")
                raise StepError(f"could not create {what}: {api_message(exc)}{hint}") from exc
            dropped = (
                dropped_fields(manifest.get("spec"), created.get("spec"))
                if isinstance(created, Mapping)
                else []
            )
            if dropped:
                controller = "Trainer" if kind == "trainjob" else "Training Operator"
                raise StepError(
                    f"the cluster's {job.kind} CRD dropped spec.{', spec.'.join(dropped[:5])} as unknown: its "
                    f"Kubeflow {controller} is older than the {job.kind} schema this code writes "
                    "(tests/crds/training/); upgrade it, or use the other launcher"
                )
            log(f"created {what}; waiting up to {_minutes(timeout_s)} for it to finish")
            _watch(
                api,
                job,
                kind,
                namespace,
                name,
                timeout_s=timeout_s,
                poll_s=poll_s,
                log=log,
                core_api=core_api,
            )
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            if maybe_created:
                with guard.shielded():
                    deleted = _delete(api, job, namespace, name, log)
                if not deleted:
                    by_hand = f"{what} was not deleted: delete it with `kubectl delete {job.plural} -n {namespace} {name}`"
                    if outcome is None:
                        raise StepError(f"the job succeeded, but {by_hand}")
                    outcome.add_note(by_hand)
                if guard.held and outcome is None:
                    raise Interrupted(f"stopped by signal {guard.held} (the job had finished and is deleted)")
