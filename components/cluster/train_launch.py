"""The pipeline's train task: torchrun on this machine, or a TrainJob/PyTorchJob on the cluster.

With launcher `local` (the default under kfp.local) the task runs `shopvision train` itself. With
`trainjob` (Kubeflow Trainer v2) or `pytorchjob` (Training Operator v1) it copies the data to the
shared volume, creates the job with the project image and the same `shopvision train` command,
watches it, copies model_best and run.json back into the task's output and deletes the job.

The data is a manifest (augment's or balance's output) whose rows reference the cleaned photos: the
task passes where each root lies (`--root cleaned=DIR`), and on the cluster copies to the shared
volume only the photos the manifest references, under `roots/<name>/<path>`, beside the manifest's
own folder (augment's new photos). A folder layout is copied whole, as before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from ..errors import StepError
from ..training.train_record import RUN_FILE

LAUNCHERS = ("local", "trainjob", "pytorchjob")
SHARED_MOUNT = "/mnt/shopvision"


def train_arguments(
    data: str,
    out: str,
    *,
    arch: str,
    epochs: int,
    batch_size: int,
    image_size: int,
    lr: float,
    pretrained: str | None,
    freeze_backbone: bool,
    recipe: str = "",
) -> list[str]:
    """`shopvision train` arguments; `recipe` is the pipeline's `train_recipe` text (KEY=VALUE,...),
    checked here so a typo fails the task before any pod or worker starts."""
    from ..training.presets import recipe_arguments

    args = [
        data,
        "--out",
        out,
        "--arch",
        arch,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--image-size",
        str(image_size),
        "--lr",
        str(lr),
        "--resume",
        "auto",
    ]
    if pretrained:
        args += ["--pretrained", pretrained]
    if freeze_backbone:
        args.append("--freeze-backbone")
    return args + recipe_arguments(recipe)


def root_arguments(roots: Mapping[str, str | Path] | None) -> list[str]:
    """`--root NAME=DIR` for each root, in name order."""
    return [arg for name, folder in sorted((roots or {}).items()) for arg in ("--root", f"{name}={folder}")]


def stage_data(
    data: str | Path, target: Path, roots: Mapping[str, str | Path] | None = None
) -> dict[str, Path]:
    """Copy DATA to TARGET/data for a training job: a manifest's own folder plus only the photos its
    rows reference (under TARGET/roots/<name>/), or a folder layout whole. Returns the roots to pass."""
    from ..data.manifest import has_manifest, read_manifest, resolve, root_folders

    data = Path(data)
    shutil.copytree(data, target / "data")
    if not has_manifest(data):
        return {}
    manifest = read_manifest(data)
    folders = root_folders(manifest, roots)
    staged: dict[str, Path] = {}
    for entry in manifest.entries:
        if entry.root == manifest.own_root:
            continue  # in the manifest's own folder, copied above
        source = resolve(entry, folders)
        copy = target / "roots" / entry.root / entry.path
        staged[entry.root] = target / "roots" / entry.root
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
    return staged


def train_in_pipeline(
    *,
    data: str,
    out: str,
    nodes: int,
    gpus_per_node: int,
    launcher: str,
    image: str,
    namespace: str,
    data_pvc: str,
    roots: Mapping[str, str | Path] | None = None,
    **hyper,
) -> dict:
    """Train and return run.json's record (run id, model URI, best metrics). `roots`: where the photos
    DATA's manifest references lie in this pod ({"cleaned": the cleaned artifact})."""
    if launcher not in LAUNCHERS:
        raise StepError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if launcher == "local":
        if nodes != 1:
            raise StepError("launcher 'local' trains on this machine only: use nodes=1, or launcher trainjob")
        _check_local_gpus(gpus_per_node)
        args = (
            train_arguments(data, out, **hyper)
            + root_arguments(roots)
            + ["--nproc-per-node", str(max(gpus_per_node, 1))]
        )
        done = subprocess.run([sys.executable, "-m", "shopvision.cli", "train", *args])
        if done.returncode != 0:
            raise StepError(f"training failed (exit status {done.returncode}); see its output above")
    else:
        _train_on_cluster(
            data=data,
            out=out,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            launcher=launcher,
            image=image,
            namespace=namespace,
            data_pvc=data_pvc,
            roots=roots,
            **hyper,
        )
    return json.loads((Path(out) / RUN_FILE).read_text())


def _check_local_gpus(gpus_per_node: int) -> None:
    """In a cluster pod, launcher `local` with GPUs asked for but none visible would train on the CPU for
    days without a word: refuse. (On a workstation, CPU fallback is what kfp.local users want.)"""
    import torch

    if gpus_per_node > 0 and "KUBERNETES_SERVICE_HOST" in os.environ and not torch.cuda.is_available():
        raise StepError(
            f"launcher 'local' with gpus_per_node={gpus_per_node}, but this pod sees no GPU: set the pipeline "
            f"parameter train_task_gpus={gpus_per_node} so the train task gets them, use launcher trainjob, "
            "or gpus_per_node=0 to train on the CPU"
        )


def _train_on_cluster(
    *,
    data: str,
    out: str,
    nodes: int,
    gpus_per_node: int,
    launcher: str,
    image: str,
    namespace: str,
    data_pvc: str,
    roots: Mapping[str, str | Path] | None = None,
    **hyper,
) -> None:
    from kubernetes import client

    from .job_watch import run_cluster_job
    from .kube_api import kube_api_client
    from .training_jobs import pytorchjob_manifest, trainjob_manifest

    if not data_pvc:
        raise StepError(
            "cluster training needs data_pvc: a ReadWriteMany volume shared by this task and the job"
        )
    job_name = f"shopvision-train-{uuid.uuid4().hex[:8]}"
    work = Path(SHARED_MOUNT) / job_name
    staged = stage_data(data, work, roots)
    if launcher == "trainjob":  # the hardened runtime shipped in manifests/base/training-runtime.yaml
        builder = partial(
            trainjob_manifest, runtime="shopvision-torch-distributed", runtime_kind="TrainingRuntime"
        )
    else:
        builder = pytorchjob_manifest
    manifest = builder(
        name=job_name,
        namespace=namespace,
        image=image,
        train_args=train_arguments(str(work / "data"), str(work / "out"), **hyper)
        + root_arguments(staged)
        + ["--nproc-per-node", str(gpus_per_node), "--workers", "4"],
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpu="8",
        memory="32Gi",
        secret_env={
            "MLFLOW_TRACKING_URI": ("shopvision-mlflow", "tracking-uri"),
            "AWS_ACCESS_KEY_ID": ("shopvision-s3", "access-key-id"),
            "AWS_SECRET_ACCESS_KEY": ("shopvision-s3", "secret-access-key"),
            "AWS_ENDPOINT_URL": ("shopvision-s3", "endpoint-url"),
        },
        pvc_name=data_pvc,
        mount_path=SHARED_MOUNT,
        node_selector={},
        tolerations=[],
        labels={"app.kubernetes.io/part-of": "shopvision", "shopvision.io/role": "training"},
    )
    api = kube_api_client()
    run_cluster_job(
        client.CustomObjectsApi(api),
        launcher,
        manifest,
        timeout_s=7 * 24 * 3600,
        core_api=client.CoreV1Api(api),
    )
    shutil.copytree(work / "out", out, dirs_exist_ok=True)
