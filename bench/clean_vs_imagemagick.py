"""Benchmark: `shopvision clean` against the classic ImageMagick shell way of shrinking photos.

Why this exists: the issue that asked for a Python clean step set the goal that it be at least 8×
faster than what it replaces, a shell script that ran

    mogrify -path OUT -format jpg -resize '224x224>' FILES...

per category folder. This script measures both on the same photos, on this machine, so the claim is
a number anyone can re-run rather than a promise. It times three things:

- `clean()` from shopvision with all cores (its default; it also hashes, finds duplicates and
  writes a report, which mogrify does not);
- `shopvision clean RAW OUT` as a whole command: a fresh process, so the interpreter's and the
  CLI's start-up count, as they do for whoever runs it from a shell;
- mogrify, parallel: one mogrify process per category, at most os.cpu_count() at once (what
  `xargs -P $(nproc)` would do), each limited to one thread (MAGICK_THREAD_LIMIT=1) so the
  parallelism is the same as clean's one-process-per-core;
- mogrify, single process: the literal shell-script way, one category after another, with
  ImageMagick's own default threading.

Nothing is written into the repository: every output goes to a temporary folder that is removed at
the end. Run from the repository root:

    .venv/bin/python bench/clean_vs_imagemagick.py [--raw DIR] [--repeat N] [--size 224] [--large N]

`--large N` times N photos of 1600×1200 instead (a phone camera's size, where JPEG draft scaling
helps clean and mogrify decodes every pixel): the first N photos of RAW, one per category in turn,
scaled up and written as JPEGs into the temporary folder.

Needs ImageMagick's mogrify on PATH (Debian/Ubuntu: `apt-get install imagemagick`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
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
LARGE_SIZE = (1600, 1200)


@dataclass
class Timing:
    tool: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process and its children

    def add(self, measured: tuple[float, float]) -> None:
        self.seconds.append(measured[0])
        self.cpu.append(measured[1])

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


def write_large_photos(raw: Path, count: int, out: Path) -> Path:
    """OUT/<category>/<photo>.jpg: `count` photos of RAW scaled up to LARGE_SIZE, categories in turn."""
    categories = photos_by_category(raw)
    queues = [list(files) for files in categories.values()]
    names = list(categories)
    written = 0
    while written < count and any(queues):
        for name, files in zip(names, queues, strict=True):
            if files and written < count:
                source = files.pop(0)
                target = out / name / f"{source.stem}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(source) as image:
                    large = image.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
                large.save(target, format="JPEG", quality=90)
                written += 1
    if written < count:
        sys.exit(f"error: --large {count}, but {raw} holds only {written} photos")
    return out


def shopvision_command() -> str:
    """The venv's `shopvision` console script (the one a user runs)."""
    exe = shutil.which("shopvision", path=str(Path(sys.executable).parent)) or shutil.which("shopvision")
    if exe is None:
        sys.exit("error: no `shopvision` command beside this Python; run `make install` first")
    return exe


def run_command(command: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()[:500]}")


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
    if processes <= 1:
        for command in jobs:
            run_command(command, env)
        return
    # Threads only wait on child processes here: the work happens in up to `processes` mogrifys.
    with ThreadPoolExecutor(max_workers=processes) as pool:
        for _ in pool.map(lambda command: run_command(command, env), jobs):
            pass


def time_once(action: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and the children it waited for): on a machine
    others share, the CPU seconds say what each tool costs when the wall clock cannot."""
    started, cpu = time.perf_counter(), _cpu_seconds()
    action()
    return time.perf_counter() - started, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    parser.add_argument(
        "--large",
        type=int,
        metavar="N",
        help=f"time N photos of RAW scaled up to {LARGE_SIZE[0]}x{LARGE_SIZE[1]}",
    )
    args = parser.parse_args(argv)
    if args.large is not None and args.large < 1:
        parser.error("--large must be at least 1")
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
    if args.large:
        with tempfile.TemporaryDirectory(prefix="shopvision-bench-large-") as tmp:
            args.raw = write_large_photos(args.raw, args.large, Path(tmp))
            return compare(args, mogrify)
    return compare(args, mogrify)


def compare(args: argparse.Namespace, mogrify: str) -> int:
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
    command = shopvision_command()
    timings = {
        name: Timing(name)
        for name in ("shopvision clean", "clean (command)", "mogrify (parallel)", "mogrify (1 process)")
    }
    kept = 0
    with tempfile.TemporaryDirectory(prefix="shopvision-bench-") as tmp:
        work = Path(tmp)
        for run in range(args.repeat):
            # A fresh output folder every run: clean must not find last run's photos to keep.
            clean_out = work / f"clean-{run}"
            with contextlib.redirect_stderr(io.StringIO()):  # clean's progress bar
                timings["shopvision clean"].add(
                    time_once(lambda out=clean_out: clean(args.raw, out, size=args.size))
                )
            kept = check_outputs(clean_out, args.size, None, "clean")
            if not (clean_out / REPORT_NAME).is_file():
                sys.exit("error: clean wrote no report")
            shutil.rmtree(clean_out)

            command_out = work / f"command-{run}"
            line = [command, "clean", str(args.raw), str(command_out), "--size", str(args.size)]
            timings["clean (command)"].add(time_once(lambda c=line: run_command(c)))
            check_outputs(command_out, args.size, kept, "clean (command)")
            shutil.rmtree(command_out)

            for name, procs, env in (
                ("mogrify (parallel)", processes, parallel_env),
                ("mogrify (1 process)", 1, dict(os.environ)),
            ):
                out = work / f"mogrify-{procs}-{run}"
                jobs = mogrify_jobs(mogrify, categories, out, args.size)
                timings[name].add(time_once(lambda j=jobs, p=procs, e=env: run_mogrify(j, p, e)))
                check_outputs(out, args.size, photos, name)
                shutil.rmtree(out)

    print(f"load average {os.getloadavg()[0]:.1f} at the end (others' work slows the wall clock)")
    print(f"{'tool':<22}{'seconds':>9}{'median':>9}{'photos/s':>10}{'CPU s':>8}")
    for t in timings.values():
        print(f"{t.tool:<22}{t.best:>9.2f}{t.median:>9.2f}{photos / t.best:>10.0f}{min(t.cpu):>8.2f}")
    print()
    print(
        f"clean kept {kept} of {photos} photos (the rest are duplicates it found; mogrify converts every file)"
    )
    for clean_name in ("shopvision clean", "clean (command)"):
        clean_best = timings[clean_name].best
        for name in ("mogrify (parallel)", "mogrify (1 process)"):
            ratio = timings[name].best / clean_best
            verdict = "meets" if ratio >= GOAL else "misses"
            compared = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
            cpu = min(timings[name].cpu) / min(timings[clean_name].cpu)
            print(f"{clean_name} is {compared} than {name}  ({verdict} the {GOAL:.0f}× goal; CPU {cpu:.1f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
