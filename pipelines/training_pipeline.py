"""The product's main job: raw photos → a promoted champion (→ a rolled-out serving Deployment).

One definition for both places: `kfp.local` on one machine (launcher `local`, no deploy) and a KFP
backend on a cluster (launcher `trainjob` or `pytorchjob`, deploy on). Kubernetes settings (GPU,
secrets, node selector, tolerations, PVC) are attached with kfp-kubernetes; kfp.local ignores them.
"""

from kfp import dsl, kubernetes

from . import components as c

PIPELINE_NAME = "shopvision-training"
CLEAN_PIPELINE_NAME = "shopvision-clean"
MLFLOW_SECRET = "shopvision-mlflow"  # key tracking-uri
S3_SECRET = "shopvision-s3"  # keys access-key-id, secret-access-key, endpoint-url
SECRET_ENV = {
    MLFLOW_SECRET: {"tracking-uri": "MLFLOW_TRACKING_URI"},
    S3_SECRET: {
        "access-key-id": "AWS_ACCESS_KEY_ID",
        "secret-access-key": "AWS_SECRET_ACCESS_KEY",
        "endpoint-url": "AWS_ENDPOINT_URL",
    },
}
ACCELERATOR = "nvidia.com/gpu"


def _cluster_settings(task: dsl.PipelineTask, *, secrets: bool) -> dsl.PipelineTask:
    """Credentials come from Secrets by reference; optional so a local run without them still works."""
    if secrets:
        for secret, keys in SECRET_ENV.items():
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=True)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "shopvision")
    kubernetes.add_pod_label(task, "shopvision.io/role", "pipeline")
    return task


def clean_stage(raw, size, corrections, shards) -> dsl.OneOf:
    """The cleaned photos: one clean-photos task, or with shards > 1 a ParallelFor of clean-shard tasks
    (decode, shrink, hash) and one clean-merge-shards task (duplicates across shards, then the same
    photos and report one task would publish)."""
    with dsl.If(shards == 1):
        single = _cluster_settings(c.clean_photos(raw=raw, size=size, corrections=corrections), secrets=False)
    with dsl.Else():
        plan = _cluster_settings(c.plan_clean_shards(shards=shards), secrets=False)
        with dsl.ParallelFor(plan.output) as shard:
            mapped = _cluster_settings(
                c.clean_shard(raw=raw, size=size, shard=shard, shards=shards), secrets=False
            )
        merged = _cluster_settings(
            c.clean_merge_shards(shards=dsl.Collected(mapped.outputs["photos"]), corrections=corrections),
            secrets=False,
        )
    return dsl.OneOf(single.outputs["cleaned"], merged.outputs["cleaned"])


@dsl.pipeline(
    name=CLEAN_PIPELINE_NAME, description="fetch and clean the raw photos, sharded when clean_shards > 1"
)
def clean_pipeline(
    data_location: str = "data/sample/raw",
    s3_endpoint: str = "",
    image_size: int = 224,
    corrections: str = "",
    clean_shards: int = 1,
) -> dsl.Dataset:
    """The training pipeline's first stage alone, with the same wiring (clean_stage): a catalogue's
    photos cleaned across pods, and what the sharded clean is tested with under kfp.local."""
    fingerprint = _cluster_settings(
        c.fingerprint_data(location=data_location, s3_endpoint=s3_endpoint), secrets=True
    ).set_caching_options(False)
    fetched = _cluster_settings(
        c.fetch_photos(location=data_location, s3_endpoint=s3_endpoint, data_fingerprint=fingerprint.output),
        secrets=True,
    )
    return clean_stage(fetched.outputs["raw"], image_size, corrections, clean_shards)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="clean, split, balance, augment, train, evaluate, register, "
    "promote and deploy a product-photo classifier",
)
def training_pipeline(
    data_location: str = "data/sample/raw",
    s3_endpoint: str = "",
    model_name: str = "shopvision",
    image_size: int = 224,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    lookalike_similarity: float = 0.82,
    max_group_share: float = 0.5,
    percentile: float = 98.0,
    augmentations: str = "mirror,rot_cw,rot_ccw,grain",
    rotation_angle: float = 15.0,
    arch: str = "resnet34",
    epochs: int = 10,
    batch_size: int = 32,
    train_image_size: int = 224,
    lr: float = 0.1,
    train_recipe: str = "",
    pretrained: str = "",
    freeze_backbone: bool = False,
    nodes: int = 1,
    gpus_per_node: int = 1,
    launcher: str = "trainjob",
    train_task_gpus: int = 0,
    image: str = c.IMAGE,
    namespace: str = "shopvision",
    data_pvc: str = "",
    node_selector: dict = {},  # noqa: B006 (KFP pipeline parameters are declared with literal defaults)
    tolerations: list = [],  # noqa: B006
    taxonomy_csv: str = "",
    target_accuracy: float = 0.95,
    test_time_augmentation: str = "none",
    min_gain: float = 0.0,
    min_accuracy: float = 0.0,
    alpha: float = 0.05,
    allow_unknown_training_data: bool = False,
    corrections: str = "",
    clean_shards: int = 1,
    audit: bool = False,
    audit_k: int = 10,
    audit_min_share: float = 0.6,
    onnx_export: str = "fp32",
    deploy: bool = False,
    serving_deployment: str = "shopvision-serving",
    serving_kind: str = "deployment",
):
    fingerprint = _cluster_settings(
        c.fingerprint_data(location=data_location, s3_endpoint=s3_endpoint), secrets=True
    ).set_caching_options(False)  # cheap, and the only step that must look at the photos every time
    fetched = _cluster_settings(
        c.fetch_photos(location=data_location, s3_endpoint=s3_endpoint, data_fingerprint=fingerprint.output),
        secrets=True,
    )
    cleaned = clean_stage(fetched.outputs["raw"], image_size, corrections, clean_shards)
    # The photos the registered model's champion was judged on stay in test in every later run.
    frozen = _cluster_settings(c.frozen_test_set(model_name=model_name), secrets=True).set_caching_options(
        False
    )  # the registry changes between runs
    splits = _cluster_settings(
        c.split_photos(
            cleaned=cleaned,
            frozen=frozen.outputs["frozen"],
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=split_seed,
            lookalike_similarity=lookalike_similarity,
            max_group_share=max_group_share,
        ),
        secrets=False,
    )
    balanced = _cluster_settings(
        c.balance_photos(splits=splits.outputs["splits"], percentile=percentile), secrets=False
    )
    augmented = _cluster_settings(
        c.augment_photos(
            balanced=balanced.outputs["balanced"],
            cleaned=cleaned,
            augmentations=augmentations,
            angle=rotation_angle,
            seed=split_seed,
        ),
        secrets=False,
    )
    trained = _cluster_settings(
        c.train_model(
            data=augmented.outputs["augmented"],
            cleaned=cleaned,  # the manifests reference the cleaned photos: no step copies them
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            image_size=train_image_size,
            lr=lr,
            recipe=train_recipe,
            pretrained=pretrained,
            freeze_backbone=freeze_backbone,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            launcher=launcher,
            image=image,
            namespace=namespace,
            data_pvc=data_pvc,
        ),
        secrets=True,
    )
    # With launcher trainjob/pytorchjob the job's pods hold the GPUs and this task only watches, so it
    # asks for none (train_task_gpus=0); with launcher `local` on a cluster torchrun runs inside this
    # task, which then needs train_task_gpus = gpus_per_node. A parameter, not a constant, so no GPU
    # idles under a watcher (KFP resolves resource placeholders since backend 2.4).
    trained.set_accelerator_type(ACCELERATOR).set_accelerator_limit(train_task_gpus)
    trained.set_cpu_limit("8").set_memory_limit("32G")
    kubernetes.add_node_selector_json(trained, node_selector_json=node_selector)
    kubernetes.add_toleration_json(trained, toleration_json=tolerations)
    kubernetes.add_pod_label(trained, "shopvision.io/role", "training")
    evaluated = _cluster_settings(
        c.evaluate_model(
            model=trained.outputs["model"],
            data=splits.outputs["splits"],
            cleaned=cleaned,
            run_id=trained.outputs["run_id"],
            taxonomy_csv=taxonomy_csv,
            target_accuracy=target_accuracy,
            test_time_augmentation=test_time_augmentation,
        ),
        secrets=True,
    )
    with dsl.If(audit == True):  # noqa: E712 (KFP condition syntax)
        _cluster_settings(
            c.audit_catalogue(
                model=trained.outputs["model"],
                cleaned=cleaned,
                run_id=trained.outputs["run_id"],
                k=audit_k,
                min_share=audit_min_share,
            ),
            secrets=True,  # it logs its report to the training run
        )
    registered = _cluster_settings(
        c.register_model(
            run_id=trained.outputs["run_id"],
            model_name=model_name,
            evaluation=evaluated.outputs["evaluation"],
            data=splits.outputs["splits"],
            cleaned=cleaned,
            onnx_export=onnx_export,
        ),
        secrets=True,
    ).set_caching_options(False)  # a registry write must happen on every run
    promoted = _cluster_settings(
        c.promote_model(
            model_name=model_name,
            version=registered.output,
            data=splits.outputs["splits"],
            cleaned=cleaned,
            min_gain=min_gain,
            min_accuracy=min_accuracy,
            alpha=alpha,
            # once, to promote past a champion trained before runs recorded their photos
            allow_unknown_training_data=allow_unknown_training_data,
        ),
        secrets=True,
    ).set_caching_options(False)
    with dsl.If(deploy == True), dsl.If(promoted.outputs["promoted"] == True):  # noqa: E712 (KFP syntax)
        _cluster_settings(
            c.deploy_model(
                model_name=model_name,
                namespace=namespace,
                deployment=serving_deployment,
                kind=serving_kind,
            ),
            secrets=True,
        ).set_caching_options(False)
