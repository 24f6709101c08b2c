"""The TrainJob (Kubeflow Trainer v2) and PyTorchJob (Training Operator v1) that run `shopvision train` on a cluster.

`trainjob_manifest` and `pytorchjob_manifest` turn the same inputs (project image, `shopvision
train` arguments, nodes x GPUs, cpu/memory, Secrets as environment, a shared volume, node
selector, tolerations, labels) into the custom resource of each API; `JOB_KINDS` says where each
kind lives in the API and which conditions end it. `job_watch.run_cluster_job` runs them.

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
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import StepError

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
    secret_env: Mapping[str, tuple[str, str]] | None,
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
    for env_name, ref in (secret_env or {}).items():
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


def _pod_spec(
    container: dict,
    *,
    pvc_name: str | None,
    node_selector: Mapping[str, str] | None,
    tolerations: Sequence[Mapping] | None,
) -> dict:
    pod_spec: dict = {"containers": [container], "volumes": _volumes(pvc_name)}
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    return pod_spec


def _metadata(labels: Mapping[str, str] | None, **fields: str) -> dict:
    """The job's own metadata: `fields` (name, namespace) and its labels, when there are any."""
    return {**fields, "labels": dict(labels)} if labels else dict(fields)


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
    # JobSet names pods <jobset>-<replicated job>-<job index>-<pod index>; a TrainJob's JobSet has its name.
    longest_pod = f"{name}-{TRAINER_JOB}-{nodes - 1}-0"
    _check_inputs(
        name=name, nodes=nodes, gpus_per_node=gpus_per_node, secret_env=secret_env, longest_pod=longest_pod
    )
    if runtime_kind not in RUNTIME_KINDS:
        raise StepError(f"runtime_kind must be one of {', '.join(RUNTIME_KINDS)}, got {runtime_kind!r}")
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
    container = {"name": TRAINER_JOB, "volumeMounts": _volume_mounts(pvc_name, mount_path)}
    pod_spec = _pod_spec(container, pvc_name=pvc_name, node_selector=node_selector, tolerations=tolerations)
    pod_template: dict = {"spec": pod_spec}
    if labels:
        pod_template["metadata"] = {"labels": dict(labels)}
    replicated_job: dict = {"name": TRAINER_JOB, "template": {"spec": {"template": pod_template}}}
    jobset_template: dict = {"spec": {"replicatedJobs": [replicated_job]}}
    if labels:
        jobset_template["metadata"] = {"labels": dict(labels)}
    return {
        "apiVersion": JOB_KINDS["trainjob"].api_version,
        "kind": "TrainJob",
        "metadata": _metadata(labels, name=name, namespace=namespace),
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
    longest_pod = f"{name}-worker-{nodes - 2}" if nodes > 1 else f"{name}-master-0"
    _check_inputs(
        name=name, nodes=nodes, gpus_per_node=gpus_per_node, secret_env=secret_env, longest_pod=longest_pod
    )
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
    pod_spec = _pod_spec(container, pvc_name=pvc_name, node_selector=node_selector, tolerations=tolerations)

    def replica(count: int) -> dict:
        template: dict = {"spec": copy.deepcopy(pod_spec)}
        if labels:
            template["metadata"] = {"labels": dict(labels)}
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    replicas = {"Master": replica(1)}
    if nodes > 1:
        replicas["Worker"] = replica(nodes - 1)
    return {
        "apiVersion": JOB_KINDS["pytorchjob"].api_version,
        "kind": "PyTorchJob",
        "metadata": _metadata(labels, name=name, namespace=namespace),
        "spec": {
            "nprocPerNode": str(nproc),
            "runPolicy": {"backoffLimit": backoff_limit},
            "pytorchReplicaSpecs": replicas,
        },
    }
