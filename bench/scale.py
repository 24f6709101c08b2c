"""The data path at catalogue scale: clean, split, balance and augment on 10k, 20k and 70k product photos.

    .venv/bin/python bench/scale.py [--sizes 10000,20000,70000] [--work DIR] [--embed-sample 512]
                                    [--split-lookalike none|embedding] [--keep]

The photos are Fashion-MNIST (Zalando's product photos, 28×28 grey, MIT; Debian's
`dataset-fashion-mnist`, installed with apt-get when missing), written once per size as
RAW/<category>/<n>.jpg. Each step runs in a fresh child process on the previous step's output, so
its peak memory is its own: `resource.getrusage` in the child after the step, RUSAGE_SELF for the
step's process and RUSAGE_CHILDREN for the largest of its worker processes (ru_maxrss, peak RSS).

For each step and size it prints the photos it read, seconds, photos/s (flat photos/s across sizes
means linear cost), the two peak RSS figures, and the bytes the step wrote: every file under its
output counted at its full size, a hard link as a copy (what an object store would hold when the
folder is uploaded as a KFP artifact), and beside it the bytes of files new on this disk (inodes no
earlier step holds).

split's look-alike embeddings (an EfficientNet-Lite0 forward pass per photo) cost about a thousand
times more per photo than the rest of split, so by default split runs with `--lookalike none` and the
embeddings are timed on their own on a sample (`--embed-sample` photos, a row "split embeddings");
`--split-lookalike embedding` runs the whole split with them at every size instead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
STEPS = ("clean", "split", "balance", "augment")


def ensure_dataset() -> None:
    if (FASHION / "train-images-idx3-ubyte.gz").is_file():
        return
    print("bench: installing Debian's dataset-fashion-mnist", flush=True)
    subprocess.run(
        ["apt-get", "install", "-y", "dataset-fashion-mnist"], check=True, stdout=subprocess.DEVNULL
    )


def fashion_photos(count: int):
    """(category, 28×28 bytes) for the first `count` photos: the 60k training file, then the 10k test file."""
    found = 0
    for part in ("train", "t10k"):
        images = gzip.decompress((FASHION / f"{part}-images-idx3-ubyte.gz").read_bytes())[16:]
        labels = gzip.decompress((FASHION / f"{part}-labels-idx1-ubyte.gz").read_bytes())[8:]
        for i, label in enumerate(labels):
            if found == count:
                return
            yield CATEGORIES[label], images[i * 784 : (i + 1) * 784]
            found += 1
    if found < count:
        raise SystemExit(f"Fashion-MNIST holds {found} photos, fewer than {count}")


def write_raw(raw: Path, count: int) -> None:
    from PIL import Image

    done = raw.with_name("raw.complete")  # beside RAW: a file in RAW itself would be a photo to clean
    if done.is_file() and done.read_text() == str(count):
        return
    shutil.rmtree(raw, ignore_errors=True)
    for category in CATEGORIES:
        (raw / category).mkdir(parents=True)
    for n, (category, pixels) in enumerate(fashion_photos(count)):
        Image.frombytes("L", (28, 28), pixels).save(raw / category / f"{n}.jpg", quality=90)
    done.write_text(str(count))


# ------------------------------------------------------------------------ one step, in a child process


def run_step(step: str, source: Path, out: Path, options: dict) -> dict:
    if step == "clean":
        from shopvision.components.data.clean import clean

        result = clean(source, out)
        return {"photos": len(result.files), "kept": len(result.kept)}
    if step == "split":
        from shopvision.components.data.split import split

        result = split(source, out, lookalike=options["lookalike"], progress=lambda *_: None)
        return {"photos": len(result.photos)}
    from shopvision.components.data.manifest import split_photos

    if step == "balance":
        from shopvision.components.data.balance import balance

        balance(source, out)
        return {"photos": len(split_photos(source, "train"))}  # train samples of split's manifest
    if step == "augment":
        from shopvision.components.data.augment import augment

        augment(source, out)
        return {"photos": len(split_photos(source, "train"))}
    if step == "embeddings":
        from shopvision.components.data.lookalike import embed_photos

        paths = sorted(source.rglob("*.jpg"))[: options["sample"] + 8]
        embed_photos(paths[:8])  # loads torch and the weights: once per split, not per photo
        started, cpu = time.perf_counter(), time.process_time()
        embed_photos(paths[8:])
        return {
            "photos": len(paths) - 8,
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu,
        }
    raise SystemExit(f"unknown step {step}")


def child(argv: list[str]) -> None:
    step, source, out, options = argv[0], Path(argv[1]), Path(argv[2]), json.loads(argv[3])
    started = time.perf_counter()
    counted = {"seconds": None, **run_step(step, source, out, options)}
    counted["seconds"] = counted["seconds"] or time.perf_counter() - started
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        "RESULT "
        + json.dumps(
            {
                "cpu_seconds": own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime,
                **counted,
                "rss_kib": own.ru_maxrss,  # KiB on Linux
                "worker_rss_kib": workers.ru_maxrss,
            }
        )
    )


def measure(step: str, source: Path, out: Path, options: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, __file__, "--child", step, str(source), str(out), json.dumps(options)],
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def written_bytes(folder: Path, seen: set[tuple[int, int]]) -> tuple[int, int]:
    """(bytes of every file, a hard link counted as a copy; bytes of inodes not in `seen`), then adds them."""
    every = new = 0
    for path in folder.rglob("*"):
        info = path.stat(follow_symlinks=False)
        if not path.is_file():
            continue
        every += info.st_size
        key = (info.st_dev, info.st_ino)
        if key not in seen:
            seen.add(key)
            new += info.st_size
    return every, new


def inodes(folder: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_dev, p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,20000,70000", help="photo counts, comma-separated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shopvision-scale"))
    parser.add_argument("--split-lookalike", choices=("none", "embedding"), default="none")
    parser.add_argument(
        "--embed-sample", type=int, default=512, help="photos for the embeddings row (0: none)"
    )
    parser.add_argument("--steps", default=",".join(STEPS), help="a prefix of clean,split,balance,augment")
    parser.add_argument("--keep", action="store_true", help="keep the step outputs (default: removed)")
    args = parser.parse_args()
    ensure_dataset()
    print(f"bench: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    header = (
        f"{'photos':>7} {'step':<17} {'read':>7} {'s':>8} {'photos/s':>9} {'CPU ms/photo':>12} "
        f"{'RSS MiB':>8} {'worker MiB':>10} {'written MB':>11} {'new MB':>8}"
    )
    rows = []
    print(header, flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        work = args.work / str(size)
        raw = work / "raw"
        write_raw(raw, size)
        seen = inodes(raw)
        source = raw
        for step in args.steps.split(","):
            out = work / step
            row = measure(step, source, out, {"lookalike": args.split_lookalike})
            every, new = written_bytes(out, seen)
            label = step if step != "split" else f"split ({args.split_lookalike})"
            rows.append(_row(size, label, row, every, new))
            print(rows[-1], flush=True)
            if step == "clean" and args.embed_sample and args.split_lookalike == "none":
                sample = measure("embeddings", out, work / "embeddings", {"sample": args.embed_sample})
                rows.append(_row(size, "split embeddings*", sample, 0, 0))
                print(rows[-1], flush=True)
            source = out
        if not args.keep:
            for step in (*STEPS, "embeddings"):
                shutil.rmtree(work / step, ignore_errors=True)
    print(f"bench: load average {os.getloadavg()[0]:.2f} at the end")
    if args.embed_sample and args.split_lookalike == "none":
        print(
            f"* embeddings timed on the first {args.embed_sample} cleaned photos only, not part of split's row"
        )


def _row(size: int, step: str, row: dict, every: int, new: int) -> str:
    return (
        f"{size:>7} {step:<17} {row['photos']:>7} {row['seconds']:>8.1f} {row['photos'] / row['seconds']:>9.0f} "
        f"{1000 * row['cpu_seconds'] / row['photos']:>12.2f} "
        f"{row['rss_kib'] / 1024:>8.0f} {row['worker_rss_kib'] / 1024:>10.0f} {every / 1e6:>11.1f} {new / 1e6:>8.1f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
