"""Cluster training: the TrainJob/PyTorchJob objects against their CRDs, and the watch loop against a fake API server.

Schemas: the objects for 2 nodes x 4 GPUs are validated with `jsonschema` against the
`openAPIV3Schema` of the vendored CRDs (tests/crds/training/, see its README for sources). Like
`kubectl apply` with strict field validation, unknown fields are errors (the schemas get
`additionalProperties: false` wherever they list properties); the TrainJob CEL rules that apply
on create are checked by hand-written equivalents. The container command is parsed by torchrun's
own argument parser, with the environment each controller sets, to show the rendezvous is right.

Watch loop: there is no real Kubernetes API server on these machines (no container engine, no
package ships one), so `FakeApiServer` below is a small HTTP server on 127.0.0.1, started by the
tests, that answers the custom-objects create/get/delete endpoints for both kinds and the pod list,
validates created objects against the same CRD schemas (422 otherwise), and plays a scripted
status sequence, one step per GET. It is driven through the real `kubernetes` client
(`CustomObjectsApi` with `Configuration(host=...)`), so paths, verbs, query parameters and JSON
bodies are the ones a cluster would get. What it does not emulate: controllers, pods being created
from the job, watch, admission webhooks, RBAC, garbage collection.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import http.server
import json
import os
import re
import signal
import threading
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes import client

from shopvision.components.cluster import job_watch as ct
from shopvision.components.cluster.job_failures import pod_problems
from shopvision.components.cluster.job_watch import Interrupted, job_state, run_cluster_job
from shopvision.components.cluster.training_jobs import (
    pytorchjob_manifest,
    torchrun_command,
    trainjob_manifest,
)
from shopvision.components.errors import StepError

CRDS = Path(__file__).parent / "crds" / "training"
NAMESPACE = "shopvision"
TRAIN_ARGS = [
    "/mnt/shopvision/job/data",
    "--out",
    "/mnt/shopvision/job/out",
    "--epochs",
    "3",
    "--nproc-per-node",
    "4",
]
SECRETS = {
    "MLFLOW_TRACKING_URI": ("shopvision-mlflow", "tracking-uri"),
    "AWS_ACCESS_KEY_ID": ("shopvision-s3", "access-key-id"),
    "AWS_SECRET_ACCESS_KEY": ("shopvision-s3", "secret-access-key"),
}
LABELS = {"app.kubernetes.io/part-of": "shopvision", "shopvision.io/role": "training"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
FAST = {"timeout_s": 5.0, "poll_s": 0.02}


def inputs(**overrides) -> dict:
    values = {
        "name": "shopvision-train-1a2b3c4d",
        "namespace": NAMESPACE,
        "image": "registry.example/shopvision:1.0",
        "train_args": TRAIN_ARGS,
        "nodes": 2,
        "gpus_per_node": 4,
        "cpu": "8",
        "memory": "32Gi",
        "secret_env": SECRETS,
        "pvc_name": "shopvision-shared",
        "mount_path": "/mnt/shopvision",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": TOLERATIONS,
        "labels": LABELS,
    }
    values.update(overrides)
    return values


# --------------------------------------------------------------------------------------------
# CRD schemas


@functools.cache
def _parsed_crd(filename: str) -> dict:
    return yaml.load((CRDS / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_crd(filename: str) -> dict:
    return copy.deepcopy(_parsed_crd(filename))


def served_schema(crd: dict, version: str) -> dict:
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """The schema with unknown fields forbidden wherever it lists the known ones (kubectl --validate=strict)."""
    schema = copy.deepcopy(schema)
    seen: set[int] = set()

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict) or id(node) in seen:  # YAML aliases share nodes
            return
        seen.add(id(node))
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for child in value.values():
                    walk(child)
            elif key != "x-kubernetes-validations":
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {
        "trainjobs": strict(served_schema(load_crd("trainer.kubeflow.org_trainjobs.yaml"), "v1alpha1")),
        "pytorchjobs": strict(served_schema(load_crd("kubeflow.org_pytorchjobs.yaml"), "v1")),
    }


def schema_errors(schema: dict, obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_the_vendored_crds_are_the_versions_the_code_creates():
    trainjob = load_crd("trainer.kubeflow.org_trainjobs.yaml")
    pytorchjob = load_crd("kubeflow.org_pytorchjobs.yaml")
    assert (trainjob["spec"]["group"], trainjob["spec"]["names"]["plural"]) == (
        "trainer.kubeflow.org",
        "trainjobs",
    )
    assert (pytorchjob["spec"]["group"], pytorchjob["spec"]["names"]["plural"]) == (
        "kubeflow.org",
        "pytorchjobs",
    )
    for crd, kind in ((trainjob, "trainjob"), (pytorchjob, "pytorchjob")):
        served = [v["name"] for v in crd["spec"]["versions"] if v["served"]]
        assert ct.JOB_KINDS[kind].version in served
        jsonschema.Draft7Validator.check_schema(served_schema(crd, ct.JOB_KINDS[kind].version))


def test_trainjob_for_2_nodes_x_4_gpus_validates_against_the_crd(schemas):
    manifest = trainjob_manifest(**inputs())
    assert schema_errors(schemas["trainjobs"], manifest) == []

    spec = manifest["spec"]
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example/shopvision:1.0"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    gpu = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"] == {"limits": gpu, "requests": gpu}
    assert trainer["command"][trainer["command"].index("shopvision") :] == [
        "shopvision",
        "train",
        *TRAIN_ARGS,
    ]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"]} == {
        env: {"name": secret, "key": key} for env, (secret, key) in SECRETS.items()
    }
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "shopvision.io/cluster-training"
    template = patch["trainingRuntimeSpec"]["template"]
    assert template["metadata"]["labels"] == LABELS
    (job,) = template["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    pod = job["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == LABELS
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"] == TOLERATIONS
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "shopvision-shared"}} in pod["spec"][
        "volumes"
    ]
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node"
    assert {"name": "shared", "mountPath": "/mnt/shopvision"} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_pytorchjob_for_2_nodes_x_4_gpus_validates_against_the_crd(schemas):
    manifest = pytorchjob_manifest(**inputs())
    assert schema_errors(schemas["pytorchjobs"], manifest) == []

    spec = manifest["spec"]
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    assert spec["nprocPerNode"] == "4"
    assert "elasticPolicy" not in spec
    replicas = spec["pytorchReplicaSpecs"]
    assert {r: replicas[r]["replicas"] for r in replicas} == {"Master": 1, "Worker": 1}
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]
        assert pod["metadata"]["labels"] == LABELS
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["spec"]["tolerations"] == TOLERATIONS
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "shopvision-shared"}} in pod["spec"][
            "volumes"
        ]
        (container,) = pod["spec"]["containers"]
        assert container["name"] == "pytorch"
        gpu = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "4"}
        assert container["resources"] == {"limits": gpu, "requests": gpu}
        assert {e["name"] for e in container["env"]} == set(SECRETS)
        assert {"name": "shared", "mountPath": "/mnt/shopvision"} in container["volumeMounts"]
        assert container["command"][container["command"].index("shopvision") :] == [
            "shopvision",
            "train",
            *TRAIN_ARGS,
        ]


def test_one_node_pytorchjob_has_no_workers_and_cpu_only_has_no_gpu(schemas):
    manifest = pytorchjob_manifest(**inputs(nodes=1, gpus_per_node=0, pvc_name=None))
    assert schema_errors(schemas["pytorchjobs"], manifest) == []
    assert list(manifest["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert manifest["spec"]["nprocPerNode"] == "1"
    trainjob = trainjob_manifest(**inputs(nodes=1, gpus_per_node=0, pvc_name=None, labels={}))
    assert schema_errors(schemas["trainjobs"], trainjob) == []
    assert trainjob["spec"]["trainer"]["numProcPerNode"] == 1


@pytest.mark.parametrize("kind", ["trainjobs", "pytorchjobs"])
def test_the_schema_check_catches_misspelled_and_mistyped_fields(schemas, kind):
    """The negative control: without it a schema that accepted anything would pass the tests above."""
    build = trainjob_manifest if kind == "trainjobs" else pytorchjob_manifest
    good = build(**inputs())

    def pod_spec(manifest: dict) -> dict:
        if kind == "trainjobs":
            patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
            return patch["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        return manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]

    misspelled = copy.deepcopy(good)
    pod_spec(misspelled)["nodeSelecter"] = pod_spec(misspelled).pop("nodeSelector")
    assert any("nodeSelecter" in e for e in schema_errors(schemas[kind], misspelled))

    deep = copy.deepcopy(good)
    pod_spec(deep)["volumes"][-1]["persistentVolumeClaim"]["claimname"] = "x"
    assert any("claimname" in e for e in schema_errors(schemas[kind], deep))

    mistyped = copy.deepcopy(good)
    if kind == "trainjobs":
        mistyped["spec"]["trainer"]["numNodes"] = "2"
    else:
        mistyped["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    assert any("is not of type 'integer'" in e for e in schema_errors(schemas[kind], mistyped))


# The CEL rules of the TrainJob CRD, as Python, for the ones that apply when an object is created.
# `self == oldSelf` rules compare with the previous object and only apply to updates.
CEL_ON_CREATE = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": lambda v: bool(
        re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", v["metadata"]["name"])
    ),
    "size(self.metadata.name) <= 63": lambda v: len(v["metadata"]["name"]) <= 63,
    "self >= 1": lambda v: v >= 1,
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']": lambda v: (
        v in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
    ),
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')": lambda v: (
        v == "" or bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", v))
    ),
    "has(self.lastUpdatedTime)": lambda v: "lastUpdatedTime" in v,
}


def cel_rules(schema, value, found: list) -> None:
    """(rule, value) for every x-kubernetes-validations rule on a part of `value` that is present."""
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations", []):
        found.append((rule["rule"], value))
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                cel_rules(schema["properties"][key], item, found)
            elif isinstance(schema.get("additionalProperties"), dict):
                cel_rules(schema["additionalProperties"], item, found)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            cel_rules(schema["items"], item, found)


def all_rules(node, out: set) -> set:
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            out.add(rule["rule"])
        for value in node.values():
            all_rules(value, out)
    elif isinstance(node, list):
        for item in node:
            all_rules(item, out)
    return out


def test_trainjob_passes_the_crd_cel_rules_that_apply_on_create():
    schema = served_schema(load_crd("trainer.kubeflow.org_trainjobs.yaml"), "v1alpha1")
    unknown = all_rules(schema, set()) - set(CEL_ON_CREATE) - {"self == oldSelf"}
    assert not unknown, f"the TrainJob CRD has CEL rules this test does not check: {unknown}"
    found: list = []
    cel_rules(schema, trainjob_manifest(**inputs()), found)
    checked = [(rule, value) for rule, value in found if rule != "self == oldSelf"]
    assert {rule for rule, _ in checked} >= {"size(self.metadata.name) <= 63", "self >= 1"}
    for rule, value in checked:
        assert CEL_ON_CREATE[rule](value), rule


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Shopvision_Train"}, "DNS label"),
        ({"name": "x" * 57}, "too long: its pods get names like"),
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"secret_env": {"PET_NNODES": ("s", "k")}}, "set by the training controller"),
        ({"secret_env": {"MASTER_ADDR": ("s", "k")}}, "set by the training controller"),
        ({"secret_env": {"BAD-NAME": ("s", "k")}}, "not a valid identifier"),
        ({"secret_env": {"TOKEN": ("s", "")}}, "(secret name, key)"),
    ],
)
def test_bad_inputs_are_clear_errors(overrides, message):
    for build in (trainjob_manifest, pytorchjob_manifest):
        with pytest.raises(StepError, match=re.escape(message)):
            build(**inputs(**overrides))


def test_local_launcher_in_a_pod_without_its_gpus_refuses_to_train_on_the_cpu(tmp_path, monkeypatch):
    from shopvision.components.cluster.train_launch import train_in_pipeline

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # what every pod sees; this machine has no GPU
    common = {"data": str(tmp_path), "out": str(tmp_path / "out"), "nodes": 1, "launcher": "local"}
    common |= {"image": "img", "namespace": "ns", "data_pvc": ""}
    with pytest.raises(StepError, match="set the pipeline parameter train_task_gpus=2"):
        train_in_pipeline(gpus_per_node=2, **common)
    assert not (tmp_path / "out").exists()  # refused before torchrun started


def expand(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container command from the container's environment."""
    return [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
        for a in command
    ]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_torchrun_gets_the_rendezvous_from_what_each_controller_sets(kind, monkeypatch):
    """Parse the container command with torchrun's own parser, in the second node's environment."""
    if kind == "trainjob":
        command = trainjob_manifest(**inputs())["spec"]["trainer"]["command"]
        # What the Trainer torch plugin sets on the `node` container of node 1.
        pod_env = {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "4",
            "PET_NODE_RANK": "1",
            "PET_MASTER_ADDR": "shopvision-train-1a2b3c4d-node-0-0.shopvision-train-1a2b3c4d",
            "PET_MASTER_PORT": "29400",
        }
        master = (pod_env["PET_MASTER_ADDR"], 29400)
    else:
        spec = pytorchjob_manifest(**inputs())["spec"]["pytorchReplicaSpecs"]["Worker"]
        command = spec["template"]["spec"]["containers"][0]["command"]
        # What the Training Operator (v1.7+) sets on worker 0, the job's second pod; no PET_MASTER_*.
        pod_env = {
            "MASTER_ADDR": "shopvision-train-1a2b3c4d-master-0",
            "MASTER_PORT": "23456",
            "WORLD_SIZE": "8",
            "RANK": "1",
            "PET_NPROC_PER_NODE": "4",
            "PET_NODE_RANK": "1",
            "PET_NNODES": "2",
        }
        master = (pod_env["MASTER_ADDR"], 23456)
    for var in [v for v in os.environ if v.startswith("PET_")]:
        monkeypatch.delenv(var)
    for var, value in pod_env.items():
        monkeypatch.setenv(var, value)
    from torch.distributed.run import get_args_parser  # reads PET_* defaults when the parser is built

    argv = expand(command, pod_env)
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert (args.nnodes, str(args.nproc_per_node), int(args.node_rank)) == ("2", "4", 1)
    assert (args.master_addr, int(args.master_port)) == master
    assert args.no_python and args.training_script == "shopvision"
    assert args.training_script_args == ["train", *TRAIN_ARGS]


def test_torchrun_command_shape():
    assert torchrun_command(["DATA"], nodes=3, nproc_per_node=2) == [
        "torchrun",
        "--nnodes=3",
        "--nproc-per-node=2",
        "--no-python",
        "shopvision",
        "train",
        "DATA",
    ]


# --------------------------------------------------------------------------------------------
# Status interpretation (plain dicts)


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-29T00:00:00Z",
    }


def test_job_state_reads_conditions_of_both_kinds():
    running = {"status": {"conditions": [cond("Created", reason="JobsCreationSucceeded")]}}
    assert job_state("trainjob", running).phase == "running"
    done = {"status": {"conditions": [cond("Created"), cond("Complete", reason="JobsCompleted")]}}
    assert job_state("trainjob", done).phase == "succeeded"
    failed = {
        "status": {"conditions": [cond("Complete", "False"), cond("Failed", reason="X", message="why")]}
    }
    assert job_state("trainjob", failed) == ct.JobState("failed", "X: why", "Failed (X)")
    # PyTorchJob: Succeeded, not Complete; a condition with status False does not count.
    assert job_state("pytorchjob", {"status": {"conditions": [cond("Complete")]}}).phase == "running"
    assert (
        job_state("pytorchjob", {"status": {"conditions": [cond("Succeeded", "False")]}}).phase == "running"
    )
    assert job_state("pytorchjob", {"status": {"conditions": [cond("Succeeded")]}}).phase == "succeeded"
    both = {"status": {"conditions": [cond("Succeeded"), cond("Failed", reason="R")]}}
    assert job_state("pytorchjob", both).phase == "failed"
    assert job_state("pytorchjob", {}).summary == "no conditions yet"


def test_pod_problems_name_oom_kills_unschedulable_pods_and_image_pulls():
    pods = [
        {
            "metadata": {"name": "job-node-0-1"},
            "status": {
                "containerStatuses": [
                    {
                        "name": "node",
                        "restartCount": 2,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    }
                ]
            },
        },
        {
            "metadata": {"name": "job-node-0-0"},
            "status": {
                "conditions": [
                    cond(
                        "PodScheduled",
                        "False",
                        "Unschedulable",
                        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    )
                ]
            },
        },
        {
            "metadata": {"name": "job-master-0"},
            "status": {
                "containerStatuses": [
                    {"name": "pytorch", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
                ]
            },
        },
        {
            "metadata": {"name": "ok"},
            "status": {"containerStatuses": [{"name": "c", "state": {"running": {}}}]},
        },
    ]
    lines = [line for pod in pods for line in pod_problems(pod)]
    assert lines == [
        "pod job-node-0-1: container node CrashLoopBackOff: back-off 40s",
        "pod job-node-0-1: container node previously terminated: OOMKilled (exit code 137, 2 restarts)",
        "pod job-node-0-0: not scheduled: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        "pod job-master-0: container pytorch ImagePullBackOff",
    ]


# --------------------------------------------------------------------------------------------
# The fake API server

ROUTE = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")


def status_body(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class FakeApiServer:
    """Custom-objects create/get/delete for trainjobs and pytorchjobs, plus pod lists, on 127.0.0.1.

    `script(plural, name, statuses)` sets what successive GETs of an object report as its status
    (one element per GET, the last one repeating). `fail` maps (verb, plural) to HTTP codes to
    answer, one per request, before behaving normally; `always_fail` to a code answered every time.
    """

    RESOURCES = {("trainer.kubeflow.org", "v1alpha1", "trainjobs"), ("kubeflow.org", "v1", "pytorchjobs")}

    def __init__(self, schemas: dict[str, dict]) -> None:
        self.schemas = schemas
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.scripts: dict[tuple[str, str], list[dict]] = {}
        self.pods: dict[str, list[dict]] = {}  # label selector -> pods
        self.fail: dict[tuple[str, str], list[int]] = {}
        self.always_fail: dict[tuple[str, str], int] = {}
        self.unknown_spec_fields: dict[str, set[str]] = {}  # plural -> spec keys an older CRD would prune
        self.requests: list[tuple[str, str]] = []  # (verb, path with query)
        self.deleted: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def script(self, plural: str, name: str, statuses: list[dict]) -> None:
        self.scripts[(plural, name)] = [copy.deepcopy(s) for s in statuses]

    def exists(self, plural: str, name: str, namespace: str = NAMESPACE) -> bool:
        return (plural, namespace, name) in self.objects

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _resource(self):
                parsed = urllib.parse.urlsplit(self.path)
                match = ROUTE.match(parsed.path)
                if not match:
                    return None, parsed
                return match.groupdict(), parsed

            def _fault(self, verb: str, plural: str) -> bool:
                with server.lock:
                    codes = server.fail.get((verb, plural))
                    code = codes.pop(0) if codes else server.always_fail.get((verb, plural))
                if code is None:
                    return False
                self._send(code, status_body(code, "InternalError", f"injected {code} for {verb} {plural}"))
                return True

            def do_POST(self) -> None:
                route, parsed = self._resource()
                server.requests.append(("POST", self.path))
                body = self._body()
                if (
                    not route
                    or route["name"]
                    or (route["group"], route["version"], route["plural"]) not in server.RESOURCES
                ):
                    self._send(
                        404, status_body(404, "NotFound", "the server could not find the requested resource")
                    )
                    return
                if self._fault("POST", route["plural"]):
                    return
                for field in server.unknown_spec_fields.get(route["plural"], ()):
                    body["spec"].pop(field, None)  # structural pruning comes before validation
                errors = schema_errors(server.schemas[route["plural"]], body)
                name = (body.get("metadata") or {}).get("name")
                key = (route["plural"], route["ns"], name)
                with server.lock:
                    if errors:
                        self._send(
                            422,
                            status_body(
                                422, "Invalid", f"{body.get('kind')} {name!r} is invalid: {errors[0]}"
                            ),
                        )
                        return
                    if key in server.objects:
                        self._send(
                            409,
                            status_body(409, "AlreadyExists", f'{route["plural"]} "{name}" already exists'),
                        )
                        return
                    stored = copy.deepcopy(body)
                    stored["metadata"].update(
                        uid=f"uid-{name}", resourceVersion="1", creationTimestamp="2026-11-29T00:00:00Z"
                    )
                    server.objects[key] = stored
                self._send(201, stored)

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                parsed = urllib.parse.urlsplit(self.path)
                pods = PODS.match(parsed.path)
                if pods:
                    if self._fault("GET", "pods"):
                        return
                    selector = urllib.parse.parse_qs(parsed.query).get("labelSelector", [""])[0]
                    self._send(
                        200, {"kind": "PodList", "apiVersion": "v1", "items": server.pods.get(selector, [])}
                    )
                    return
                route, _ = self._resource()
                if not route or not route["name"]:
                    self._send(404, status_body(404, "NotFound", "not found"))
                    return
                if self._fault("GET", route["plural"]):
                    return
                key = (route["plural"], route["ns"], route["name"])
                with server.lock:
                    obj = server.objects.get(key)
                    if obj is None:
                        self._send(
                            404,
                            status_body(404, "NotFound", f'{route["plural"]} "{route["name"]}" not found'),
                        )
                        return
                    steps = server.scripts.get((route["plural"], route["name"]), [])
                    if steps:
                        obj["status"] = steps.pop(0) if len(steps) > 1 else steps[0]
                    body = copy.deepcopy(obj)
                self._send(200, body)

            def do_DELETE(self) -> None:
                server.requests.append(("DELETE", self.path))
                self._body()
                route, _ = self._resource()
                if not route or not route["name"]:
                    self._send(404, status_body(404, "NotFound", "not found"))
                    return
                if self._fault("DELETE", route["plural"]):
                    return
                key = (route["plural"], route["ns"], route["name"])
                with server.lock:
                    obj = server.objects.pop(key, None)
                    if obj is None:
                        self._send(
                            404,
                            status_body(404, "NotFound", f'{route["plural"]} "{route["name"]}" not found'),
                        )
                        return
                    server.deleted.append(key)
                self._send(
                    200,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Success",
                        "details": {"name": route["name"]},
                    },
                )

        return Handler


@pytest.fixture()
def server(schemas):
    fake = FakeApiServer(schemas).start()
    yield fake
    fake.stop()


@pytest.fixture()
def apis(server):
    api_client = client.ApiClient(client.Configuration(host=server.url))
    yield client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    api_client.close()


@pytest.fixture(autouse=True)
def no_delete_backoff(monkeypatch):
    monkeypatch.setattr(ct, "DELETE_BACKOFF_S", 0.0)


KINDS = {
    "trainjob": ("trainjobs", trainjob_manifest),
    "pytorchjob": ("pytorchjobs", pytorchjob_manifest),
}
SUCCESS = {
    "trainjob": [
        {"conditions": [cond("Created", reason="JobsCreationSucceeded")]},
        {
            "conditions": [cond("Created", reason="JobsCreationSucceeded")],
            "jobsStatus": [
                {"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}
            ],
        },
        {
            "conditions": [
                cond("Created", reason="JobsCreationSucceeded"),
                cond("Complete", reason="JobsCompleted"),
            ],
            "jobsStatus": [
                {"name": "node", "active": 0, "ready": 0, "succeeded": 2, "failed": 0, "suspended": 0}
            ],
        },
    ],
    "pytorchjob": [
        {"conditions": [cond("Created", reason="PyTorchJobCreated")]},
        {
            "conditions": [cond("Created", "False"), cond("Running", reason="PyTorchJobRunning")],
            "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}},
        },
        {
            "conditions": [cond("Running", "False"), cond("Succeeded", reason="PyTorchJobSucceeded")],
            "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}},
        },
    ],
}
FAILED_REASON, FAILED_MESSAGE = "BackoffLimitExceeded", "pod shopvision-train-1a2b3c4d-node-0-1 OOMKilled"
FAILURE = {
    "trainjob": SUCCESS["trainjob"][:2]
    + [{"conditions": [cond("Created"), cond("Failed", reason=FAILED_REASON, message=FAILED_MESSAGE)]}],
    "pytorchjob": SUCCESS["pytorchjob"][:2]
    + [
        {
            "conditions": [
                cond("Running", "False"),
                cond("Failed", reason=FAILED_REASON, message=FAILED_MESSAGE),
            ]
        }
    ],
}
NEVER_DONE = {kind: steps[:2] for kind, steps in SUCCESS.items()}


def launch(
    server, apis, kind: str, statuses: list[dict], *, core: bool = False, **options
) -> tuple[dict, list[str]]:
    plural, build = KINDS[kind]
    manifest = build(**inputs())
    server.script(plural, manifest["metadata"]["name"], statuses)
    lines: list[str] = []
    settings = {**FAST, "log": lines.append, **options}
    custom, core_api = apis
    run_cluster_job(custom, kind, manifest, core_api=core_api if core else None, **settings)
    return manifest, lines


def deleted_once(server, kind: str, manifest: dict) -> bool:
    plural = KINDS[kind][0]
    key = (plural, NAMESPACE, manifest["metadata"]["name"])
    deletes = [p for verb, p in server.requests if verb == "DELETE"]
    return (
        server.deleted == [key]
        and not server.exists(plural, manifest["metadata"]["name"])
        and all("propagationPolicy=Background" in p for p in deletes)
    )


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_success_is_logged_and_the_job_deleted(server, apis, kind):
    manifest, lines = launch(server, apis, kind, SUCCESS[kind])
    assert deleted_once(server, kind, manifest)
    posted = [p for verb, p in server.requests if verb == "POST"]
    group_version = "trainer.kubeflow.org/v1alpha1" if kind == "trainjob" else "kubeflow.org/v1"
    assert posted == [f"/apis/{group_version}/namespaces/{NAMESPACE}/{KINDS[kind][0]}"]
    what = f"{manifest['kind']} {NAMESPACE}/{manifest['metadata']['name']}"
    assert lines[0].startswith(f"created {what}")
    assert any("succeeded after" in line for line in lines)
    assert lines[-1] == f"deleted {what}"
    progress = [line for line in lines if line.startswith(f"{what} after ")]
    assert len(progress) == 3, lines  # one line per change of status, not per poll
    if kind == "trainjob":
        assert "node: 2 active, 2 ready" in "\n".join(lines)
    else:
        assert "Master: 1 active" in "\n".join(lines)


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_failure_raises_the_jobs_own_reason_and_deletes_it(server, apis, kind):
    with pytest.raises(StepError) as failure:
        launch(server, apis, kind, FAILURE[kind])
    message = str(failure.value)
    assert f"{FAILED_REASON}: {FAILED_MESSAGE}" in message
    assert message.startswith(("TrainJob shopvision/", "PyTorchJob shopvision/")) and " failed: " in message
    manifest = KINDS[kind][1](**inputs())
    assert deleted_once(server, kind, manifest)


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_a_job_that_never_finishes_times_out_and_is_deleted(server, apis, kind):
    with pytest.raises(
        StepError, match=r"did not finish within the timeout of 0.3 s; last status: (Created|Running) "
    ) as timeout:
        launch(server, apis, kind, NEVER_DONE[kind], timeout_s=0.3)
    assert "never read" not in str(timeout.value)
    assert deleted_once(server, kind, KINDS[kind][1](**inputs()))


def test_pod_reasons_are_added_to_a_failure(server, apis):
    name = inputs()["name"]
    server.pods[f"jobset.sigs.k8s.io/jobset-name={name}"] = [
        {
            "metadata": {"name": f"{name}-node-0-1"},
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "node", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
                ],
            },
        }
    ]
    with pytest.raises(StepError) as failure:
        launch(server, apis, "trainjob", FAILURE["trainjob"], core=True)
    assert f"pod {name}-node-0-1: container node terminated: OOMKilled (exit code 137)" in str(failure.value)
    listed = [p for verb, p in server.requests if verb == "GET" and "/pods" in p]
    assert listed and "labelSelector=jobset.sigs.k8s.io%2Fjobset-name%3D" in listed[0]


def test_unreadable_pods_do_not_hide_the_jobs_own_failure(server, apis):
    server.always_fail[("GET", "pods")] = 403
    with pytest.raises(StepError) as failure:
        launch(server, apis, "pytorchjob", FAILURE["pytorchjob"], core=True)
    assert f"{FAILED_REASON}: {FAILED_MESSAGE}" in str(failure.value)
    assert "(pod details unavailable: 403 " in str(failure.value)


def test_a_timeout_says_which_pods_cannot_be_scheduled(server, apis):
    name = inputs()["name"]
    server.pods[f"training.kubeflow.org/job-name={name}"] = [
        {
            "metadata": {"name": f"{name}-worker-0"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    cond(
                        "PodScheduled",
                        "False",
                        "Unschedulable",
                        "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    )
                ],
            },
        }
    ]
    with pytest.raises(StepError, match="Insufficient nvidia.com/gpu"):
        launch(server, apis, "pytorchjob", NEVER_DONE["pytorchjob"], core=True, timeout_s=0.2)
    assert deleted_once(server, "pytorchjob", pytorchjob_manifest(**inputs()))


def test_ctrl_c_while_waiting_deletes_the_job(server, apis):
    def log(line: str) -> None:
        if " after " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch(server, apis, "trainjob", NEVER_DONE["trainjob"], log=log, timeout_s=30)
    assert deleted_once(server, "trainjob", trainjob_manifest(**inputs()))


def test_sigterm_while_waiting_deletes_the_job_and_restores_the_handler(server, apis):
    before = signal.getsignal(signal.SIGTERM)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if " after " in line and len([x for x in lines if " after " in x]) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="SIGTERM"):
        launch(server, apis, "pytorchjob", NEVER_DONE["pytorchjob"], log=log, timeout_s=30)
    assert deleted_once(server, "pytorchjob", pytorchjob_manifest(**inputs()))
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Interrupted, KeyboardInterrupt)


def test_a_job_of_the_same_name_is_not_ours_and_is_left_alone(server, apis):
    custom, _ = apis
    manifest = trainjob_manifest(**inputs())
    custom.create_namespaced_custom_object(
        "trainer.kubeflow.org", "v1alpha1", NAMESPACE, "trainjobs", manifest
    )
    with pytest.raises(StepError, match="already exists.*left alone"):
        run_cluster_job(custom, "trainjob", manifest, log=lambda _: None, **FAST)
    assert server.exists("trainjobs", manifest["metadata"]["name"]) and server.deleted == []


def test_an_object_the_crd_rejects_is_a_clear_error_and_nothing_is_deleted(server, apis):
    custom, _ = apis
    manifest = pytorchjob_manifest(**inputs())
    manifest["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    with pytest.raises(StepError, match=r"could not create PyTorchJob shopvision/.*: 422 .*invalid"):
        run_cluster_job(custom, "pytorchjob", manifest, log=lambda _: None, **FAST)
    assert server.deleted == [] and not [r for r in server.requests if r[0] == "DELETE"]


def test_a_missing_crd_is_a_clear_error(server, apis, monkeypatch):
    custom, _ = apis
    monkeypatch.setitem(ct.JOB_KINDS, "trainjob", dataclasses.replace(ct.JOB_KINDS["trainjob"], version="v9"))
    with pytest.raises(StepError, match="404 .*is the TrainJob CRD installed"):
        run_cluster_job(custom, "trainjob", trainjob_manifest(**inputs()), log=lambda _: None, **FAST)
    assert server.deleted == []


def test_a_cluster_whose_crd_prunes_our_fields_is_caught_and_the_job_deleted(server, apis):
    server.unknown_spec_fields["trainjobs"] = {"runtimePatches"}  # a Trainer from before runtimePatches
    with pytest.raises(
        StepError, match=r"TrainJob CRD dropped spec.runtimePatches as unknown.*Kubeflow Trainer is older"
    ):
        launch(server, apis, "trainjob", SUCCESS["trainjob"])
    assert deleted_once(server, "trainjob", trainjob_manifest(**inputs()))
    assert not [p for verb, p in server.requests if verb == "GET"]  # it did not wait for a crippled job


def test_dropped_fields_follows_maps_and_lists():
    sent = {"a": 1, "b": {"c": [{"d": 1, "e": 2}], "f": 3}}
    assert ct.dropped_fields(sent, {"a": 1, "b": {"c": [{"d": 1}], "f": 3, "g": 4}}) == ["b.c[0].e"]
    assert ct.dropped_fields(sent, sent) == []


def test_transient_read_errors_are_retried(server, apis):
    server.fail[("GET", "trainjobs")] = [500, 503]
    manifest, lines = launch(server, apis, "trainjob", SUCCESS["trainjob"])
    assert sum("could not read" in line for line in lines) == 1  # logged once per streak
    assert deleted_once(server, "trainjob", manifest)


def test_a_job_deleted_by_someone_else_is_an_error_not_a_wait(server, apis):
    def log(line: str) -> None:
        if " after " in line:
            server.objects.clear()

    with pytest.raises(StepError, match="disappeared before it finished"):
        launch(server, apis, "trainjob", NEVER_DONE["trainjob"], log=log, timeout_s=30)
    assert any(verb == "DELETE" for verb, _ in server.requests)  # tried, found it gone: a 404 is fine
    assert server.deleted == []


def test_a_delete_that_keeps_failing_says_how_to_clean_up(server, apis):
    server.always_fail[("DELETE", "pytorchjobs")] = 500
    with pytest.raises(
        StepError,
        match=r"succeeded, but .*kubectl delete pytorchjobs -n shopvision shopvision-train-1a2b3c4d",
    ):
        launch(server, apis, "pytorchjob", SUCCESS["pytorchjob"])
    deletes = [p for verb, p in server.requests if verb == "DELETE"]
    assert len(deletes) == ct.DELETE_ATTEMPTS

    server.requests.clear()
    server.objects.clear()
    with pytest.raises(StepError) as failure:
        launch(server, apis, "pytorchjob", FAILURE["pytorchjob"])
    assert FAILED_REASON in str(failure.value)  # the job's own failure stays the error
    assert any("kubectl delete pytorchjobs" in note for note in failure.value.__notes__)


def test_a_delete_that_fails_twice_is_retried(server, apis):
    server.fail[("DELETE", "trainjobs")] = [503, 500]
    manifest, lines = launch(server, apis, "trainjob", SUCCESS["trainjob"])
    assert sum("could not delete" in line for line in lines) == 2
    assert server.deleted and not server.exists("trainjobs", manifest["metadata"]["name"])


def test_unknown_kind_and_mismatched_manifest_are_clear_errors(apis):
    custom, _ = apis
    with pytest.raises(StepError, match="unknown job kind 'mpijob'"):
        run_cluster_job(custom, "mpijob", trainjob_manifest(**inputs()), **FAST)
    with pytest.raises(StepError, match="needs a PyTorchJob manifest"):
        run_cluster_job(custom, "pytorchjob", trainjob_manifest(**inputs()), **FAST)
