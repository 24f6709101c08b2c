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

import importlib
import importlib.abc
import importlib.util
import sys

# Registered models keep the copy of training/pyfunc_model.py they were logged with (MLflow "models
# from code"), and a copy logged before the stage folders imports these three modules by their old
# flat names. They stay importable under those names, and only those, so `mlflow models serve` still
# loads every version already in a registry. New code imports the stage path (tests/test_layout.py).
LOGGED_MODEL_IMPORTS = {
    f"{__name__}.tracking": f"{__name__}.training.tracking",
    f"{__name__}.models": f"{__name__}.training.models",
    f"{__name__}.images": f"{__name__}.data.images",
}


class _LoggedModelImports(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in LOGGED_MODEL_IMPORTS else None

    def create_module(self, spec):
        return importlib.import_module(LOGGED_MODEL_IMPORTS[spec.name])  # the module itself, not a copy

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _LoggedModelImports) for finder in sys.meta_path):
    sys.meta_path.append(_LoggedModelImports())
