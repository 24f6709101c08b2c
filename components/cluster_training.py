"""Multi-node GPU training on a cluster: a Kubeflow TrainJob (Trainer v2) or a PyTorchJob (Training Operator v1).

`trainjob_manifest` and `pytorchjob_manifest` turn the same inputs (project image, `shopvision
train` arguments, nodes x GPUs, cpu/memory, Secrets as environment, a shared volume, node
selector, tolerations, labels) into the custom resource of each API. `run_cluster_job` creates
it, polls its status conditions until it succeeds or fails (raising StepError with the job's own
reason and message, plus pod-level reasons when a CoreV1Api is given) or the timeout passes, and
deletes what it created in every case: success, failure, timeout, Ctrl-C and SIGTERM (what a
KFP task pod gets when its run is cancelled).

Who starts torchrun. Neither controller does: the Trainer v2 torch plugin only sets PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT on the `node` container,
and the Training Operator sets MASTER_ADDR, MASTER_PORT, RANK (the pod's rank), WORLD_SIZE
(pods x nprocPerNode), PET_NNODES, PET_NPROC_PER_NODE and PET_NODE_RANK. So the container command
is torchrun, which takes the PET_* variables as defaults and starts one `shopvision train`
worker per GPU with a RANK, LOCAL_RANK and WORLD_SIZE of its own. Running `shopvision train`
itself as the command would go wrong both ways: in a TrainJob pod it sees no RANK and launches a
one-node torchrun per pod (N separate trainings writing to one folder); in a PyTorchJob pod it
sees RANK/WORLD_SIZE, runs as a single worker and waits for WORLD_SIZE = pods x GPUs ranks that
never come. The Training Operator sets no PET_MASTER_ADDR (torchrun's default is 127.0.0.1), so
the PyTorchJob command passes the rendezvous from $(MASTER_ADDR), $(MASTER_PORT) and $(RANK),
which Kubernetes expands from the container's environment.

Where each setting goes. A TrainJob carries image, command, numNodes, numProcPerNode,
resourcesPerNode and env in spec.trainer; the volume and mount, node selector, tolerations and pod
labels go in spec.runtimePatches (the API of the vendored v1alpha1 CRD, which replaced the older
podTemplateOverrides), aimed at the runtime's `node` replicated job and container. The runtime
owns restarts and failure policy. A PyTorchJob carries everything in its Master and Worker pod
templates (container `pytorch`, restartPolicy OnFailure, runPolicy.backoffLimit).

Both pods get a memory-backed /dev/shm: the container default (64 MiB) is too small for
DataLoader workers and NCCL, which then die with "bus error".

The Kubernetes calls are three on the custom object (create, get, delete) and one optional pod
list; deciding what a status means works on plain dicts (`job_state`). No Kubernetes API server
can run on these machines: the tests drive this module through the real `kubernetes` client
against a small fake API server on 127.0.0.1 that scripts status transitions.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import StepError

TRAINJOB_RUNTIME = "torch-distributed"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
RUNTIME_PATCH_MANAGER = "shopvision.io/cluster-training"
TRAINER_JOB = "node"  # the torch runtimes' replicated job and trainer container are both named `node`
PYTORCH_CONTAINER = "pytorch"  # the Training Operator finds its port and sets its env by this name
PYTORCH_PORT_NAME, PYTORCH_PORT = "pytorchjob-port", 23456  # the operator's default master port
GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"
DATA_VOLUME = "shared"
# Variables the controllers or torchrun set: ours would be rejected (TrainJob webhook) or overwritten.
RESERVED_ENV = frozenset(
    {
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
    }
)
REQUEST_TIMEOUT_S = 30  # one API call; the watch as a whole is bounded by timeout_s
DELETE_ATTEMPTS = 3
DELETE_BACKOFF_S = 1.0  # times the attempt number, between delete attempts
# RFC 1035 label: the TrainJob CRD's rule for its name, and what pod hostnames and Services need.
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class JobKind:
    """Where one kind of job lives in the API and which conditions end it."""

    kind: str
    group: str
    version: str
    plural: str
    succeeded: str  # condition type that means success when its status is "True"
    failed: str
    pod_label: str  # label the controller puts on the job's pods, valued with the job's name

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


JOB_KINDS = {
    "trainjob": JobKind(
        "TrainJob",
        "trainer.kubeflow.org",
        "v1alpha1",
        "trainjobs",
        "Complete",
        "Failed",
        "jobset.sigs.k8s.io/jobset-name",  # a TrainJob's JobSet has the TrainJob's name
    ),
    "pytorchjob": JobKind(
        "PyTorchJob",
        "kubeflow.org",
        "v1",
        "pytorchjobs",
        "Succeeded",
        "Failed",
        "training.kubeflow.org/job-name",
    ),
}


# --------------------------------------------------------------------------------------------
# Manifests


def torchrun_command(
    train_args: Sequence[str], *, nodes: int, nproc_per_node: int, rendezvous: Sequence[str] = ()
) -> list[str]:
    """torchrun starting `shopvision train` once per GPU; node rank and master come from PET_* or `rendezvous`."""
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc_per_node}",
        *rendezvous,
        "--no-python",
        "shopvision",
        "train",
        *train_args,
    ]


def _check_inputs(
    *,
    name: str,
    nodes: int,
    gpus_per_node: int,
    secret_env: Mapping[str, tuple[str, str]],
    longest_pod: str,
) -> None:
    """`longest_pod`: the longest pod (and headless Service) name the controller will derive from `name`."""
    if nodes < 1:
        raise StepError(f"nodes must be at least 1, got {nodes}")
    if not NAME_RE.match(name):
        raise StepError(
            f"job name {name!r} must be a DNS label: lower-case letters, digits and '-', starting with a letter"
        )
    if len(longest_pod) > 63:
        raise StepError(
            f"job name {name!r} is too long: its pods get names like {longest_pod!r}, "
            f"over the 63 characters of a DNS label; shorten it by {len(longest_pod) - 63}"
        )
    if gpus_per_node < 0:
        raise StepError(f"gpus_per_node must be 0 (CPU) or more, got {gpus_per_node}")
    for env_name, ref in secret_env.items():
        if not ENV_NAME_RE.match(env_name):
            raise StepError(f"environment variable name {env_name!r} is not a valid identifier")
        if env_name in RESERVED_ENV:
            raise StepError(
                f"environment variable {env_name} is set by the training controller and torchrun; use another name"
            )
        if not (isinstance(ref, tuple | list) and len(ref) == 2 and all(ref)):
            raise StepError(f"secret_env[{env_name!r}] must be (secret name, key), got {ref!r}")


def _resources(*, gpus_per_node: int, cpu: str, memory: str) -> dict:
    # Requests equal to limits: the scheduler reserves what the pod may use (Guaranteed QoS),
    # and extended resources such as GPUs must have requests == limits anyway.
    amounts = {"cpu": str(cpu), "memory": str(memory)}
    if gpus_per_node:
        amounts[GPU_RESOURCE] = str(gpus_per_node)
    return {"limits": dict(amounts), "requests": dict(amounts)}


def _secret_env(secret_env: Mapping[str, tuple[str, str]]) -> list[dict]:
    return [
        {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for env_name, (secret, key) in sorted(secret_env.items())
    ]


def _volumes(pvc_name: str | None) -> list[dict]:
    volumes = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    if pvc_name:
        volumes.append({"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name}})
    return volumes


def _volume_mounts(pvc_name: str | None, mount_path: str) -> list[dict]:
    mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if pvc_name:
        mounts.append({"name": DATA_VOLUME, "mountPath": mount_path})
    return mounts


def trainjob_manifest(
    *,
    name: str,
    namespace: str,
    image: str,
    train_args: Sequence[str],
    nodes: int,
    gpus_per_node: int,
    cpu: str,
    memory: str,
    runtime: str = TRAINJOB_RUNTIME,
    runtime_kind: str = "ClusterTrainingRuntime",
    secret_env: Mapping[str, tuple[str, str]] | None = None,
    pvc_name: str | None = None,
    mount_path: str = "/mnt/shared",
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict:
    """A trainer.kubeflow.org/v1alpha1 TrainJob running `shopvision train` on nodes x gpus_per_node."""
    secret_env = dict(secret_env or {})
    # JobSet names pods <jobset>-<replicated job>-<job index>-<pod index>; a TrainJob's JobSet has its name.
    longest_pod = f"{name}-{TRAINER_JOB}-{nodes - 1}-0"
    _check_inputs(
        name=name, nodes=nodes, gpus_per_node=gpus_per_node, secret_env=secret_env, longest_pod=longest_pod
    )
    if runtime_kind not in RUNTIME_KINDS:
        raise StepError(f"runtime_kind must be one of {', '.join(RUNTIME_KINDS)}, got {runtime_kind!r}")
    labels = dict(labels or {})
    nproc = max(gpus_per_node, 1)
    trainer = {
        "image": image,
        "command": torchrun_command(train_args, nodes=nodes, nproc_per_node=nproc),
        "numNodes": nodes,
        "numProcPerNode": nproc,
        "resourcesPerNode": _resources(gpus_per_node=gpus_per_node, cpu=cpu, memory=memory),
    }
    if secret_env:
        trainer["env"] = _secret_env(secret_env)
    pod_spec: dict = {
        "containers": [{"name": TRAINER_JOB, "volumeMounts": _volume_mounts(pvc_name, mount_path)}],
        "volumes": _volumes(pvc_name),
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    pod_template: dict = {"spec": pod_spec}
    if labels:
        pod_template["metadata"] = {"labels": dict(labels)}
    replicated_job: dict = {"name": TRAINER_JOB, "template": {"spec": {"template": pod_template}}}
    jobset_template: dict = {"spec": {"replicatedJobs": [replicated_job]}}
    if labels:
        jobset_template["metadata"] = {"labels": dict(labels)}
    metadata: dict = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": JOB_KINDS["trainjob"].api_version,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": runtime_kind, "name": runtime},
            "trainer": trainer,
            "runtimePatches": [
                {"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {"template": jobset_template}}
            ],
        },
    }


def pytorchjob_manifest(
    *,
    name: str,
    namespace: str,
    image: str,
    train_args: Sequence[str],
    nodes: int,
    gpus_per_node: int,
    cpu: str,
    memory: str,
    secret_env: Mapping[str, tuple[str, str]] | None = None,
    pvc_name: str | None = None,
    mount_path: str = "/mnt/shared",
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping] | None = None,
    labels: Mapping[str, str] | None = None,
    backoff_limit: int = 3,
) -> dict:
    """A kubeflow.org/v1 PyTorchJob (1 Master + nodes-1 Workers) running `shopvision train` on each GPU."""
    secret_env = dict(secret_env or {})
    longest_pod = f"{name}-worker-{nodes - 2}" if nodes > 1 else f"{name}-master-0"
    _check_inputs(
        name=name, nodes=nodes, gpus_per_node=gpus_per_node, secret_env=secret_env, longest_pod=longest_pod
    )
    labels = dict(labels or {})
    nproc = max(gpus_per_node, 1)
    # The operator sets RANK to the pod's rank (Master 0, Worker i -> i+1) and MASTER_ADDR/PORT
    # to the master Service; torchrun needs them as flags (it reads only PET_* from the environment).
    rendezvous = ["--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    container: dict = {
        "name": PYTORCH_CONTAINER,
        "image": image,
        "command": torchrun_command(train_args, nodes=nodes, nproc_per_node=nproc, rendezvous=rendezvous),
        "resources": _resources(gpus_per_node=gpus_per_node, cpu=cpu, memory=memory),
        "ports": [{"name": PYTORCH_PORT_NAME, "containerPort": PYTORCH_PORT, "protocol": "TCP"}],
        "volumeMounts": _volume_mounts(pvc_name, mount_path),
    }
    if secret_env:
        container["env"] = _secret_env(secret_env)
    pod_spec: dict = {"containers": [container], "volumes": _volumes(pvc_name)}
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]

    def replica(count: int) -> dict:
        template: dict = {"spec": copy.deepcopy(pod_spec)}
        if labels:
            template["metadata"] = {"labels": dict(labels)}
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    replicas = {"Master": replica(1)}
    if nodes > 1:
        replicas["Worker"] = replica(nodes - 1)
    metadata: dict = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": JOB_KINDS["pytorchjob"].api_version,
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(nproc),
            "runPolicy": {"backoffLimit": backoff_limit},
            "pytorchReplicaSpecs": replicas,
        },
    }


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


def _condition_text(condition: Mapping) -> str:
    reason, message = condition.get("reason") or "", condition.get("message") or ""
    if reason and message:
        return f"{reason}: {message}"
    return reason or message or "no reason given"


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
        return JobState("failed", _condition_text(by_type[job.failed]), summary)
    if job.succeeded in by_type:
        return JobState("succeeded", "", summary)
    return JobState("running", "", summary)


# --------------------------------------------------------------------------------------------
# Pod-level reasons (best effort)

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
            found.append(f"pod {name}: not scheduled: {_condition_text(condition)}")
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        container = cs.get("name", "?")
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in _WAITING_PROBLEMS:
            found.append(f"pod {name}: container {container} {_condition_text(waiting)}")
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
        return [f"(pod details unavailable: {_api_message(exc)})"]
    found = [line for pod in pods for line in pod_problems(pod)]
    if len(found) > limit:
        found = found[:limit] + [f"... and {len(found) - limit} more"]
    return found


# --------------------------------------------------------------------------------------------
# Create, watch, delete


def _http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and status > 0 else None


def _api_message(exc: BaseException) -> str:
    """The API server's own message (a Status object's `message`) when there is one."""
    status = _http_status(exc)
    body = getattr(exc, "body", None)
    if status is not None and body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return f"{status} {message}"
    if status is not None:
        return f"{status} {getattr(exc, 'reason', '') or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


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
            if _http_status(exc) == 404:
                log(f"{what} is already gone")
                return True
            log(f"could not delete {what} (try {attempt} of {DELETE_ATTEMPTS}): {_api_message(exc)}")
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
    deadline = start + timeout_s
    last_summary, failing_reads = None, 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(
                job.group, job.version, namespace, job.plural, name, _request_timeout=REQUEST_TIMEOUT_S
            )
            failing_reads = 0
        except Exception as exc:
            status = _http_status(exc)
            if status == 404:
                raise StepError(f"{what} disappeared before it finished (deleted by someone else?)") from exc
            if status in (401, 403):
                raise StepError(f"not allowed to read {what}: {_api_message(exc)}") from exc
            # The API server restarting, a network blip, throttling: keep polling until the timeout.
            failing_reads += 1
            if failing_reads == 1:
                log(f"could not read {what} ({_api_message(exc)}); retrying until the timeout")
            obj = None
        elapsed = time.monotonic() - start
        if obj is not None:
            state = job_state(job, obj)
            if state.summary != last_summary:
                log(f"{what} after {_minutes(elapsed)}: {state.summary}")
                last_summary = state.summary
            if state.phase == "succeeded":
                log(f"{what} succeeded after {_minutes(elapsed)}")
                return
            if state.phase == "failed":
                details = failure_details(core_api, kind, namespace, name) if core_api is not None else []
                raise StepError(_with_details(f"{what} failed: {state.reason}", details))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            details = failure_details(core_api, kind, namespace, name) if core_api is not None else []
            raise StepError(
                _with_details(
                    f"{what} did not finish within the timeout of {_minutes(timeout_s)}; "
                    f"last status: {last_summary or 'never read'}",
                    details,
                )
            )
        time.sleep(min(poll_s, remaining))


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
                status = _http_status(exc)
                if status is None:
                    raise  # no answer: it may exist, so the clean-up below still deletes it
                maybe_created = False  # the server refused it: nothing of ours to delete
                hint = {
                    404: f" (is the {job.kind} CRD installed, and does namespace {namespace} exist?)",
                    409: " (a job of that name already exists; it is not ours, so it is left alone)",
                }.get(status, "")
                raise StepError(f"could not create {what}: {_api_message(exc)}{hint}") from exc
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
