"""What a pipeline run stores: the bytes each task's outputs hold, a hard link counted as a copy.

    .venv/bin/python bench/artifact_bytes.py [--data data/sample/raw] [--work DIR] [--keep]
                                             [--arg KEY=VALUE]...

On one disk a hard link costs nothing, but an object store (every KFP artifact on a cluster) holds a
full copy of each: so every file under a task's output is counted at its full size here. The run is
`make demo`'s pipeline (`pipelines/local_run.run_locally` with `DEMO_ARGUMENTS`, kfp.local, MLflow on
SQLite in WORK), on the sample photos by default; `--arg` overrides a pipeline parameter.

It prints, per task, the files, bytes and photo bytes (JPEGs) its outputs hold and their share of the
cleaned photos; the ratios split/cleaned and balance/cleaned (the goal: together under 1%); the
bytes split, balance and augment would have held as folders of links (every sample their manifests
expand to, at its photo's size: what they wrote before manifests); and the whole run from clean on
against its floor: the cleaned photos + augment's new photos + models + reports (everything but the
photos and the data steps' records), whose difference is what the data steps' records cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
DATA_STEPS = ("split-photos", "balance-photos", "augment-photos")
PHOTO_TASKS = {"fetch-photos", "clean-photos", "clean-shard", "clean-merge-shards", *DATA_STEPS}


def files_under(folder: Path) -> list[Path]:
    """Every regular file under FOLDER: a hard link is one more file, as an upload sees it."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def task_bytes(run_root: Path) -> dict[str, dict[str, int]]:
    """{task: {files, bytes, photo_bytes, model_bytes}} over the task folders of one run."""
    table = {}
    for task in sorted(p for p in run_root.iterdir() if p.is_dir()):
        row = {"files": 0, "bytes": 0, "photo_bytes": 0, "model_bytes": 0}
        for path in files_under(task):
            size = path.stat().st_size
            row["files"] += 1
            row["bytes"] += size
            if path.suffix.lower() in PHOTO_SUFFIXES and task.name in PHOTO_TASKS:
                row["photo_bytes"] += size  # elsewhere an image is a report's figure
            elif task.name == "train-model" or "model" in path.relative_to(task).parts[1:2]:
                row["model_bytes"] += size
        table[task.name] = row
    return table


def as_links(step_output: Path) -> int:
    """Bytes the step's folder of links held before manifests: one file per sample, at its size."""
    from shopvision.components.data.manifest import split_photos

    total = sum(p.stat().st_size for p in step_output.iterdir() if p.is_file() and p.suffix == ".json")
    for split in ("train", "val", "test"):
        total += sum(photo.path.stat().st_size for photo in split_photos(step_output, split))
    return total


def output_folder(run_root: Path, task: str) -> Path:
    return next(p for p in (run_root / task).iterdir() if p.is_dir())


def report(run_root: Path) -> str:
    table = task_bytes(run_root)
    cleaned_task = "clean-photos" if "clean-photos" in table else "clean-merge-shards"
    cleaned = table[cleaned_task]["bytes"]
    lines = [f"{'task':<24}{'files':>7}{'bytes':>13}{'photo bytes':>13}{'÷ cleaned':>11}{'as links':>13}"]
    for task, row in table.items():
        links = as_links(output_folder(run_root, task)) if task in DATA_STEPS else None
        lines.append(
            f"{task:<24}{row['files']:>7}{row['bytes']:>13,}{row['photo_bytes']:>13,}"
            f"{row['bytes'] / cleaned:>10.2%} {'' if links is None else f'{links:>12,}'}"
        )
    split, balance = table["split-photos"]["bytes"], table["balance-photos"]["bytes"]
    new_photos = table["augment-photos"]["photo_bytes"]
    models = sum(r["model_bytes"] for r in table.values())
    records = sum(table[t]["bytes"] - table[t]["photo_bytes"] for t in DATA_STEPS)
    after_raw = {t: r for t, r in table.items() if t not in ("fetch-photos", "fingerprint-data")}
    whole = sum(r["bytes"] for r in after_raw.values())
    reports = whole - cleaned - new_photos - models - records
    floor = cleaned + new_photos + models + reports
    lines += [
        "",
        f"cleaned photos (clean's output, its report included)   {cleaned:>13,}",
        f"split ÷ cleaned                                          {split / cleaned:>12.2%}",
        f"balance ÷ cleaned                                        {balance / cleaned:>12.2%}",
        f"split + balance ÷ cleaned                                {(split + balance) / cleaned:>12.2%}",
        f"augment's new photos                                     {new_photos:>13,}",
        f"models (train's output, evaluate's model copy)           {models:>13,}",
        f"reports (every other file from clean on)                 {reports:>13,}",
        f"floor: cleaned + new photos + models + reports           {floor:>13,}",
        f"whole run from clean on                                  {whole:>13,}  ({whole / floor:.4f} × floor; "
        f"the data steps' records {records:,})",
        f"raw photos fetched (before clean)                        {table['fetch-photos']['bytes']:>13,}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "sample" / "raw"))
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report-only", type=Path, metavar="RUN_ROOT", help="measure an existing run")
    args = parser.parse_args()
    if args.report_only:
        print(report(args.report_only))
        return
    from shopvision.pipelines.cluster import parse_arguments
    from shopvision.pipelines.local_run import DEMO_ARGUMENTS, run_locally

    work = args.work or Path(tempfile.mkdtemp(prefix="artifact-bytes-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    try:
        arguments = {**DEMO_ARGUMENTS, "data_location": args.data, **parse_arguments(args.arg)}
        run_locally(arguments, work)
        run_root = next((work / "pipeline-root").iterdir())
        print(f"run: {run_root}")
        print(report(run_root))
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
