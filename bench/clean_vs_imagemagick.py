"""Benchmark: `shopvision clean` against the classic ImageMagick shell way of shrinking photos.

Why this exists: the issue that asked for a Python clean step set the goal that it be at least 8×
faster than what it replaces, a shell script that ran

    mogrify -path OUT -format jpg -resize '224x224>' FILES...

per category folder. This script measures both on the same photos, on this machine, so the claim is
a number anyone can re-run rather than a promise. It times three things:

- `clean()` from shopvision with all cores (its default; it also hashes, finds duplicates and
  writes a report, which mogrify does not);
- mogrify, parallel: one mogrify process per category, at most os.cpu_count() at once (what
  `xargs -P $(nproc)` would do), each limited to one thread (MAGICK_THREAD_LIMIT=1) so the
  parallelism is the same as clean's one-process-per-core;
- mogrify, single process: the literal shell-script way, one category after another, with
  ImageMagick's own default threading.

Nothing is written into the repository: every output goes to a temporary folder that is removed at
the end. Run from the repository root:

    .venv/bin/python bench/clean_vs_imagemagick.py [--raw DIR] [--repeat N] [--size 224]

Needs ImageMagick's mogrify on PATH (Debian/Ubuntu: `apt-get install imagemagick`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from shopvision.components.data.clean import REPORT_NAME, clean

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO_ROOT.parent / "shared" / "datasets" / "grocery-store" / "raw"
GOAL = 8.0  # the goal: clean at least this many times faster than mogrify
# Files per mogrify call: keeps a huge category under the kernel's argument-length limit
# (like `xargs -n`); with the grocery photos every category fits in one call.
FILES_PER_CALL = 1000


@dataclass
class Timing:
    tool: str
    seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def find_mogrify() -> str:
    """The path of ImageMagick's mogrify, or exit with a message saying how to install it."""
    mogrify = shutil.which("mogrify")
    hint = "install ImageMagick first, e.g. `sudo apt-get install -y imagemagick` (Debian/Ubuntu)"
    if mogrify is None:
        sys.exit(f"error: mogrify not found on PATH; {hint}")
    try:
        version = subprocess.run([mogrify, "-version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        sys.exit(f"error: {mogrify} does not run ({exc}); {hint}")
    if "ImageMagick" not in version:
        sys.exit(f"error: {mogrify} is not ImageMagick's mogrify; {hint}")
    return mogrify


def imagemagick_version(mogrify: str) -> str:
    first = subprocess.run([mogrify, "-version"], capture_output=True, text=True).stdout.splitlines()
    return first[0].removeprefix("Version: ").strip() if first else "unknown"


def photos_by_category(raw: Path) -> dict[str, list[Path]]:
    """Every regular file under RAW/<category>/ (any depth), as clean() sees them."""
    categories: dict[str, list[Path]] = {}
    for category in sorted(p for p in raw.iterdir() if p.is_dir()):
        files = sorted(p for p in category.rglob("*") if p.is_file())
        if files:
            categories[category.name] = files
    return categories


def warm_page_cache(categories: dict[str, list[Path]]) -> None:
    """Read every photo once, so no tool pays for the first trip to the disk."""
    for files in categories.values():
        for path in files:
            path.read_bytes()


def mogrify_jobs(mogrify: str, categories: dict[str, list[Path]], out: Path, size: int) -> list[list[str]]:
    """One command line per category (split only if a category is huge), each into OUT/<category>."""
    jobs: list[list[str]] = []
    for category, files in categories.items():
        target = out / category
        target.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(files), FILES_PER_CALL):
            chunk = [str(p) for p in files[start : start + FILES_PER_CALL]]
            jobs.append(
                [mogrify, "-path", str(target), "-format", "jpg", "-resize", f"{size}x{size}>", *chunk]
            )
    return jobs


def run_mogrify(jobs: list[list[str]], processes: int, env: dict[str, str]) -> None:
    def one(command: list[str]) -> None:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mogrify failed ({done.returncode}): {done.stderr.strip()[:500]}")

    if processes <= 1:
        for command in jobs:
            one(command)
        return
    # Threads only wait on child processes here: the work happens in up to `processes` mogrifys.
    with ThreadPoolExecutor(max_workers=processes) as pool:
        for _ in pool.map(one, jobs):
            pass


def time_once(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def check_outputs(out: Path, size: int, expected: int | None, tool: str) -> int:
    """Count the JPEGs a tool wrote and make sure each fits size×size; returns the count."""
    photos = [p for p in out.rglob("*.jpg") if p.is_file()]
    for path in photos:
        with Image.open(path) as image:
            if image.width > size or image.height > size:
                sys.exit(f"error: {tool} wrote {path.name} at {image.width}x{image.height}, over {size}")
    if expected is not None and len(photos) != expected:
        sys.exit(f"error: {tool} wrote {len(photos)} photos, expected {expected}")
    return len(photos)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--raw", type=Path, default=DEFAULT_RAW, help=f"RAW/<category>/<photo> (default: {DEFAULT_RAW})"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per tool; the best run counts (default 1)"
    )
    parser.add_argument("--size", type=int, default=224, help="fit photos inside size×size (default 224)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.size < 16:
        parser.error("--size must be at least 16 (clean's minimum)")
    if not args.raw.is_dir():
        parser.error(f"--raw {args.raw} is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mogrify = find_mogrify()
    cpus = os.cpu_count() or 1
    categories = photos_by_category(args.raw)
    photos = sum(len(files) for files in categories.values())
    if not photos:
        sys.exit(f"error: no photos under {args.raw}/<category>/")
    largest = max(len(files) for files in categories.values())
    processes = min(cpus, sum(-(-len(f) // FILES_PER_CALL) for f in categories.values()))

    print(f"raw:      {args.raw}")
    print(f"photos:   {photos} in {len(categories)} categories (largest {largest})")
    print(f"machine:  {cpus} CPUs (os.cpu_count())")
    print(f"mogrify:  {mogrify} ({imagemagick_version(mogrify)})")
    print(f"size:     {args.size}x{args.size}, repeat {args.repeat} (best run counts)")
    print(
        f"fairness: clean uses {cpus} worker processes; mogrify (parallel) runs one process per category, "
        f"{processes} at once like `xargs -P {cpus}`, each with MAGICK_THREAD_LIMIT=1"
    )
    print()

    warm_page_cache(categories)
    parallel_env = {**os.environ, "MAGICK_THREAD_LIMIT": "1"}
    timings = {
        name: Timing(name) for name in ("shopvision clean", "mogrify (parallel)", "mogrify (1 process)")
    }
    kept = 0
    with tempfile.TemporaryDirectory(prefix="shopvision-bench-") as tmp:
        work = Path(tmp)
        for run in range(args.repeat):
            # A fresh output folder every run: clean must not find last run's photos to keep.
            clean_out = work / f"clean-{run}"
            with contextlib.redirect_stderr(io.StringIO()):  # clean's progress bar
                seconds = time_once(lambda out=clean_out: clean(args.raw, out, size=args.size))
            timings["shopvision clean"].seconds.append(seconds)
            kept = check_outputs(clean_out, args.size, None, "clean")
            if not (clean_out / REPORT_NAME).is_file():
                sys.exit("error: clean wrote no report")
            shutil.rmtree(clean_out)

            for name, procs, env in (
                ("mogrify (parallel)", processes, parallel_env),
                ("mogrify (1 process)", 1, dict(os.environ)),
            ):
                out = work / f"mogrify-{procs}-{run}"
                jobs = mogrify_jobs(mogrify, categories, out, args.size)
                timings[name].seconds.append(time_once(lambda j=jobs, p=procs, e=env: run_mogrify(j, p, e)))
                check_outputs(out, args.size, photos, name)
                shutil.rmtree(out)

    print(f"{'tool':<22}{'seconds':>9}{'median':>9}{'photos/s':>10}")
    for timing in timings.values():
        print(f"{timing.tool:<22}{timing.best:>9.2f}{timing.median:>9.2f}{photos / timing.best:>10.0f}")
    print()
    print(
        f"clean kept {kept} of {photos} photos (the rest are duplicates it found; mogrify converts every file)"
    )
    clean_best = timings["shopvision clean"].best
    for name in ("mogrify (parallel)", "mogrify (1 process)"):
        ratio = timings[name].best / clean_best
        verdict = "meets" if ratio >= GOAL else "misses"
        compared = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
        print(f"clean is {compared} than {name}  ({verdict} the {GOAL:.0f}× goal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
