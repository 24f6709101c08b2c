"""Everything training records, on rank 0 only: MLflow run, run.json, history, curves, the model.

Tracking calls sit at the edges of the run (start, end of each epoch, end), as in MLflow's own
PyTorch examples, so the training loop stays free of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ..data.naming import atomic_write_text

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
CURVES_FILE = "curves.png"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the working folder (embedded default)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def configure_mlflow(tracking_uri: str | None, experiment: str, out: Path) -> str:
    """Point MLflow at the server or local SQLite file; a new local experiment keeps artifacts beside it."""
    import mlflow

    from .tracking import check_tracking_server

    uri = check_tracking_server(resolve_tracking_uri(tracking_uri))
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return uri


TRAINING_PHOTOS_DIR = "data"
TRAINING_PHOTOS_FILE = "training_photos.txt.gz"  # artifact data/training_photos.txt.gz of every run


class RunRecorder:
    def __init__(self, cfg, ctx, spec, resumed_run_id: str | None) -> None:
        self.cfg, self.ctx, self.spec = cfg, ctx, spec
        self.out = Path(cfg.out)
        self.run_id = resumed_run_id
        self.uri: str | None = None

    def start(self, data: Path, **facts) -> None:
        import mlflow

        from ..data.fingerprint import data_fingerprint

        self.out.mkdir(parents=True, exist_ok=True)
        self.uri = configure_mlflow(self.cfg.tracking_uri, self.cfg.experiment, self.out)
        resumed = self.run_id is not None
        run = mlflow.start_run(run_id=self.run_id, run_name=self.cfg.run_name)
        self.run_id = run.info.run_id
        notes = facts.pop("notes", [])
        if resumed:
            mlflow.set_tag("resumed", "true")
        else:
            params = {k: v for k, v in asdict(self.cfg).items() if k not in ("tracking_uri",)}
            params.update(facts, num_classes=self.spec.num_classes, data_fingerprint=data_fingerprint(data))
            mlflow.log_params({k: "" if v is None else v for k, v in params.items()})
            mlflow.log_dict({"labels": self.spec.labels}, "labels.json")
            self._log_training_photos(data)
        for note in notes:
            print(f"train: {note}", flush=True)
        self._write_run_file()
        print(
            f"train: MLflow run {self.run_id} at {self.uri}; {facts.get('train_images')} train / "
            f"{facts.get('val_images')} val photos, {self.spec.num_classes} categories, "
            f"world size {self.ctx.world_size} on {self.ctx.device}",
            flush=True,
        )

    def _log_training_photos(self, data: Path) -> None:
        """The content hashes of every train and val photo, so the gate can prove a test set unseen."""
        import mlflow

        from ..data.split import write_hash_prefixes

        target = self.out / TRAINING_PHOTOS_FILE
        count = write_hash_prefixes(Path(data), ("train", "val"), target)
        mlflow.log_artifact(str(target), artifact_path=TRAINING_PHOTOS_DIR)
        mlflow.set_tag("training_photos", str(count))

    def epoch(self, epoch: int, metrics: dict, improved: bool) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)
        with open(self.out / HISTORY_FILE, "a") as handle:
            handle.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        print(
            f"epoch {epoch + 1}/{self.cfg.epochs}  loss {metrics['train_loss']:.4f}  "
            f"top-1 err {metrics['val_top1_error']:.4f}  top-5 err {metrics['val_top5_error']:.4f}  "
            f"lr {metrics['lr']:.4g}  {metrics['images_per_second']:.1f} img/s"
            + ("  *best*" if improved else ""),
            flush=True,
        )

    def interrupted(self, epoch: int) -> None:
        import mlflow

        mlflow.set_tag("preempted_at_epoch", str(epoch))
        mlflow.end_run(status="KILLED")

    def finish(self, best_dir: Path, best: dict | None) -> None:
        import mlflow

        from .tracking import log_classifier

        history = self.out / HISTORY_FILE
        if history.is_file():
            plot_curves(history, self.out / CURVES_FILE)
            mlflow.log_artifact(str(self.out / CURVES_FILE))
            mlflow.log_artifact(str(history))
        model_uri = None
        if best and best_dir.is_dir():
            mlflow.set_tags(
                {"best_epoch": str(best["epoch"]), "val_top1_error": f"{best['val_top1_error']:.6f}"}
            )
            model_uri = log_classifier(best_dir).model_uri
        self._write_run_file(model_uri=model_uri, best=best)
        mlflow.end_run()
        print(
            f"train: model_best (epoch {best['epoch'] + 1 if best else '-'}) in {best_dir}; "
            f"MLflow model {model_uri}",
            flush=True,
        )

    def _write_run_file(self, **extra) -> None:
        body = {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.cfg.experiment, **extra}
        atomic_write_text(self.out / RUN_FILE, json.dumps(body, indent=1) + "\n")


def plot_curves(history: Path, target: Path) -> None:
    """Loss and top-1/top-5 error per epoch as one PNG, for people reading the MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] + 1 for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train loss")
    left.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [r["val_top1_error"] for r in rows], marker="o", label="val top-1 error")
    right.plot(epochs, [r["val_top5_error"] for r in rows], marker="o", label="val top-5 error")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
