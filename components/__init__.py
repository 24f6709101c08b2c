"""The steps' logic: plain functions with typed arguments and result objects, one sub-package per stage.

    data/        raw photos to train/val/test folders: fetch, clean (+ corrections), near duplicates,
                 split (+ look-alikes), balance, augment; images, naming, the folder layout, fingerprints
    training/    the train loop, data loading, checkpoints, distributed set-up, the torchrun launch,
                 models and weights, MLflow tracking and the pyfunc
    evaluation/  predict, metrics, evaluate, its figures and HTML report
    registry/    register, the frozen evaluation set, the promotion gate (significance, lease), rollback
    similarity/  embeddings, the index, similar photos, the catalogue audit and its report
    cluster/     everything that talks to the Kubernetes API: training jobs, their watch and failures,
                 the pipeline's train launcher, serving workloads, rollout, deploy

errors, progress and step_output, here, are shared by every stage. Imports run downward, in the order
above (registry and similarity are siblings; neither imports the other), and no step imports the CLI,
the server or KFP: tests/test_layout.py checks both, and that there are no import circles.
docs/architecture.md describes the data that flows between the stages.
"""
