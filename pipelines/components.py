"""KFP v2 lightweight components: thin wrappers that call the step functions in the project image.

Rules (see ../shared/PLATFORM-NOTES.md): bodies only plumb arguments, imports live inside the body
(KFP ships the function's source), nothing uses packages_to_install, and the base image is the
project image, which already holds kfp (install_kfp_package=False). The image is read from
$SHOPVISION_IMAGE when this module is imported, so `shopvision pipeline compile --image` sets it.
No `from __future__ import annotations` here: KFP reads the annotations as types.

split, balance and augment hand on manifests (references into the cleaned photos), not copies, so
every task that opens photos takes the cleaned artifact beside the manifest and passes it as the
root "cleaned" (`roots={"cleaned": cleaned.path}`): each pod mounts an artifact at its own path.
"""

import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from .code_version import code_version

IMAGE = os.environ.get("SHOPVISION_IMAGE", "ghcr.io/shopvision/shopvision:0.1.0")
CODE_VERSION = code_version()


def component(func):
    made = dsl.component(base_image=IMAGE, install_kfp_package=False)(func)
    # The shipped source is in the task's cache key: stamping the code version there makes a cached
    # result follow the step code, not only this thin wrapper (code_version.py says why).
    container = made.component_spec.implementation.container
    container.command[-1] += f"\n# shopvision code version {CODE_VERSION}\n"
    return made


@component
def fingerprint_data(location: str, s3_endpoint: str) -> str:
    """Content fingerprint of the raw photos; never cached, it is what makes the cache honest."""
    from shopvision.components.data.fetch import fingerprint_location

    return fingerprint_location(location, s3_endpoint or None)


@component
def fetch_photos(location: str, s3_endpoint: str, data_fingerprint: str, raw: Output[Dataset]) -> int:
    from shopvision.components.data.fetch import fetch_photos as fetch

    raw.metadata["data_fingerprint"] = data_fingerprint
    raw.metadata["location"] = location
    return fetch(location, raw.path, s3_endpoint or None, expected_fingerprint=data_fingerprint)


@component
def clean_photos(
    raw: Input[Dataset], size: int, corrections: str, cleaned: Output[Dataset], report: Output[Artifact]
) -> str:
    """Clean the raw photos; `corrections` is a reviewer's corrections.csv as text (empty: none)."""
    import shutil

    from shopvision.components.data.clean import REPORT_NAME, clean, summary
    from shopvision.components.data.corrections import corrections_parameter

    result = clean(raw.path, cleaned.path, size=size, corrections=corrections_parameter(corrections))
    shutil.copyfile(f"{cleaned.path}/{REPORT_NAME}", report.path)
    cleaned.metadata.update(result.totals())
    return summary(result)


@component
def plan_clean_shards(shards: int) -> list:
    """The shard numbers for clean's ParallelFor (a pipeline parameter is a count, ParallelFor wants a list)."""
    from shopvision.components.data.clean_shards import shard_numbers

    return shard_numbers(shards)


@component
def clean_shard(raw: Input[Dataset], size: int, shard: int, shards: int, photos: Output[Dataset]) -> str:
    """Decode, shrink and hash one shard's share of the raw photos (duplicates are the merge's job)."""
    from shopvision.components.data import clean_shards

    return clean_shards.shard_summary(
        clean_shards.clean_shard(raw.path, photos.path, shard, shards, size=size)
    )


@component
def clean_merge_shards(
    shards: Input[list[Dataset]], corrections: str, cleaned: Output[Dataset], report: Output[Artifact]
) -> str:
    """Duplicates across all shards, then the photos and report a single clean_photos task would publish."""
    import shutil

    from shopvision.components.data.clean import REPORT_NAME, summary
    from shopvision.components.data.clean_shards import merge_shards
    from shopvision.components.data.corrections import corrections_parameter

    result = merge_shards(
        [shard.path for shard in shards], cleaned.path, corrections=corrections_parameter(corrections)
    )
    shutil.copyfile(f"{cleaned.path}/{REPORT_NAME}", report.path)
    cleaned.metadata.update(result.totals())
    return summary(result)


@component
def frozen_test_set(model_name: str, frozen: Output[Artifact]) -> int:
    """The registered model's frozen evaluation set (content hashes), or an empty file before its first promotion."""
    import json
    from pathlib import Path

    from shopvision.components.registry.evaluation_set import fetch_frozen_set

    found = fetch_frozen_set(model_name, Path(frozen.path))
    if found is None:
        Path(frozen.path).write_text("{}\n")
        return 0
    return len(json.loads(Path(frozen.path).read_text()).get("photos", {}))


@component
def split_photos(
    cleaned: Input[Dataset],
    frozen: Input[Artifact],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    lookalike_similarity: float,
    max_group_share: float,
    splits: Output[Dataset],
) -> str:
    from shopvision.components.data.split import split, summary

    result = split(
        cleaned.path,
        splits.path,
        val=val_fraction,
        test=test_fraction,
        seed=seed,
        lookalike="embedding" if lookalike_similarity > 0 else "none",
        similarity=lookalike_similarity if lookalike_similarity > 0 else 1.0,
        max_group_share=max_group_share,
        frozen=frozen.path,
    )
    splits.metadata.update({s: sum(c[s] for c in result.counts.values()) for s in ("train", "val", "test")})
    return summary(result)


@component
def balance_photos(splits: Input[Dataset], percentile: float, balanced: Output[Dataset]) -> str:
    from shopvision.components.data.balance import balance, summary

    result = balance(splits.path, balanced.path, percentile=percentile)
    balanced.metadata["target"] = result.target
    return summary(result)


@component
def augment_photos(
    balanced: Input[Dataset],
    cleaned: Input[Dataset],
    augmentations: str,
    angle: float,
    seed: int,
    augmented: Output[Dataset],
) -> str:
    """Only the new photos and a manifest; the originals stay in `cleaned`, referenced."""
    from shopvision.components.data.augment import augment, summary

    operations = [op.strip() for op in augmentations.split(",") if op.strip()]
    return summary(
        augment(
            balanced.path,
            augmented.path,
            operations=operations,
            angle=angle,
            seed=seed,
            roots={"cleaned": cleaned.path},
        )
    )


@component
def train_model(
    data: Input[Dataset],
    cleaned: Input[Dataset],
    arch: str,
    epochs: int,
    batch_size: int,
    image_size: int,
    lr: float,
    recipe: str,
    pretrained: str,
    freeze_backbone: bool,
    nodes: int,
    gpus_per_node: int,
    launcher: str,
    image: str,
    namespace: str,
    data_pvc: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("TrainOutputs", [("run_id", str), ("model_uri", str)]):
    import json
    from collections import namedtuple

    from shopvision.components.cluster.train_launch import train_in_pipeline

    record = train_in_pipeline(
        data=data.path,
        out=model.path,
        roots={"cleaned": cleaned.path},
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        lr=lr,
        recipe=recipe,
        pretrained=pretrained or None,
        freeze_backbone=freeze_backbone,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        launcher=launcher,
        image=image,
        namespace=namespace,
        data_pvc=data_pvc,
    )
    for key, value in (record.get("best") or {}).items():
        if isinstance(value, int | float):
            metrics.log_metric(key, value)
    model.metadata["run_id"] = record["run_id"]
    print(json.dumps(record, indent=1))
    return namedtuple("TrainOutputs", ["run_id", "model_uri"])(
        record["run_id"], record.get("model_uri") or ""
    )


@component
def evaluate_model(
    model: Input[Model],
    data: Input[Dataset],
    cleaned: Input[Dataset],
    run_id: str,
    taxonomy_csv: str,
    target_accuracy: float,
    test_time_augmentation: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
) -> float:
    """Top-5 predictions and metrics on the test split, the threshold chosen on val; logged to the run."""
    import json
    from pathlib import Path

    from shopvision.components.evaluation.evaluate import evaluate, headline_metrics, summary

    taxonomy = None
    if taxonomy_csv:
        taxonomy = Path(evaluation.path).parent / "taxonomy.csv"
        taxonomy.write_text(taxonomy_csv)
    result = evaluate(
        f"{model.path}/model_best",
        Path(data.path),
        Path(evaluation.path),
        taxonomy=taxonomy,
        target_accuracy=target_accuracy,
        run_id=run_id or None,
        tta=test_time_augmentation,
        roots={"cleaned": cleaned.path},
    )
    for key, value in headline_metrics(result.metrics).items():
        metrics.log_metric(key, value)
    print(summary(result))
    print(json.dumps(headline_metrics(result.metrics), indent=1))
    return float(result.metrics["top1_accuracy"])


@component
def register_model(
    run_id: str,
    model_name: str,
    evaluation: Input[Artifact],
    data: Input[Dataset],
    cleaned: Input[Dataset],
    onnx_export: str,
) -> str:
    """onnx_export "fp32" (or "int8") also writes the ONNX files serving's `--runtime auto` picks on a
    CPU, checked on the split's test photos (int8 calibrated on val); "none" skips the export."""
    from shopvision.components.errors import StepError
    from shopvision.components.registry.register import register, register_summary

    if onnx_export not in ("none", "fp32", "int8"):
        raise StepError(f"onnx_export {onnx_export!r}: choose none, fp32 or int8")
    result = register(
        run_id,
        model_name,
        test_metrics=f"{evaluation.path}/metrics.json",
        onnx_photos=None if onnx_export == "none" else data.path,
        quantize="int8" if onnx_export == "int8" else None,
        roots={"cleaned": cleaned.path},
    )
    print(register_summary(result))
    return result.version


@component
def promote_model(
    model_name: str,
    version: str,
    data: Input[Dataset],
    cleaned: Input[Dataset],
    min_gain: float,
    min_accuracy: float,
    alpha: float,
    allow_unknown_training_data: bool,
) -> NamedTuple("PromoteOutputs", [("promoted", bool), ("champion", str)]):
    """The gate on the registered model's frozen evaluation set (fixed by its first promotion)."""
    from collections import namedtuple
    from pathlib import Path

    from shopvision.components.registry.promotion import promote, promote_summary

    decision = promote(
        model_name,
        version,
        Path(data.path),
        min_gain=min_gain,
        min_accuracy=min_accuracy,
        alpha=alpha,
        allow_unknown_training_data=allow_unknown_training_data,
        notify=print,
        roots={"cleaned": cleaned.path},
    )
    print(promote_summary(decision))
    champion = decision.candidate_version if decision.promoted else (decision.champion_version or "")
    return namedtuple("PromoteOutputs", ["promoted", "champion"])(decision.promoted, champion)


@component
def deploy_model(model_name: str, namespace: str, deployment: str, kind: str) -> str:
    from shopvision.components.cluster.deploy import deploy

    return str(deploy(model_name, "champion", namespace=namespace, target=deployment, kind=kind))


@component
def audit_catalogue(
    model: Input[Model],
    cleaned: Input[Dataset],
    run_id: str,
    k: int,
    min_share: float,
    index: Output[Artifact],
    report: Output[Artifact],
) -> str:
    """Embeddings of every cleaned photo, then likely mislabelled listings and confusable categories;
    the review page (report.html) goes to the training run, beside the evaluation's report."""
    from shopvision.components.similarity.audit import audit, summary
    from shopvision.components.similarity.audit_report import log_audit_report
    from shopvision.components.similarity.features import extract_features

    extract_features(f"{model.path}/model_best", cleaned.path, index.path)
    result = summary(audit(index.path, report.path, k=k, min_share=min_share))
    if run_id:
        log_audit_report(run_id, report.path)
    return result
