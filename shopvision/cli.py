"""`shopvision <step>`: a thin command line over the step functions in shopvision.components.

Each sub-command parses flags, calls one step function and prints its summary. Bad input raises
StepError in the step and is printed here as one line, with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shopvision import __version__
from shopvision.components.errors import StepError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_clean(args: argparse.Namespace) -> None:
    from shopvision.components.clean import clean, summary

    result = clean(
        args.raw,
        args.out,
        size=args.size,
        workers=args.workers,
        report=args.report,
        max_pixels=args.max_pixels,
    )
    print(summary(result))
    print(f"report: {args.report or args.out / 'clean_report.json'}")


def _run_split(args: argparse.Namespace) -> None:
    from shopvision.components.split import split, summary

    print(summary(split(args.clean_dir, args.out, val=args.val, test=args.test, seed=args.seed)))


def _run_balance(args: argparse.Namespace) -> None:
    from shopvision.components.balance import balance, summary

    print(summary(balance(args.split_dir, args.out, percentile=args.percentile)))


def _run_augment(args: argparse.Namespace) -> None:
    from shopvision.components.augment import OPERATIONS, augment, summary

    operations = [op for op in OPERATIONS if op not in set(args.skip)]
    if args.only:
        operations = [op.strip() for op in args.only.split(",") if op.strip()]
    result = augment(
        args.balanced_dir,
        args.out,
        operations=operations,
        angle=args.angle,
        grain=args.grain,
        seed=args.seed,
        workers=args.workers,
    )
    print(summary(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shopvision", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shopvision {__version__}")
    steps = parser.add_subparsers(dest="command", required=True, metavar="STEP")

    def step(name: str, help_text: str, run: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sub = steps.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=run)
        return sub

    clean = step(
        "clean",
        "decode every raw photo safely, drop unreadable files and duplicates, "
        "write JPEGs that fit SIZE×SIZE and a report",
        _run_clean,
    )
    clean.add_argument("raw", type=Path, help="raw photos: RAW/<category>/**/<file>")
    clean.add_argument("out", type=Path, help="output: OUT/<category>/<name>.jpg and OUT/clean_report.json")
    clean.add_argument("--size", type=_positive_int, default=224, help="fit inside SIZE×SIZE (default 224)")
    clean.add_argument("--report", type=Path, help="also write the JSON report here")
    clean.add_argument(
        "--workers",
        type=_positive_int,
        default=os.cpu_count(),
        help="decoding processes (default: all cores)",
    )
    clean.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=64_000_000,
        help="refuse images with more pixels (decompression bombs; default 64M)",
    )

    split = step("split", "stratified train/val/test split by product, before any copying", _run_split)
    split.add_argument("clean_dir", type=Path, help="output of 'shopvision clean'")
    split.add_argument("out", type=Path, help="output: OUT/{train,val,test}/<category>/ and OUT/split.json")
    split.add_argument("--val", type=float, default=0.1, help="validation fraction (default 0.1)")
    split.add_argument("--test", type=float, default=0.1, help="test fraction (default 0.1)")
    split.add_argument("--seed", type=int, default=0)

    balance = step(
        "balance", "oversample rare train categories up to a percentile of category counts", _run_balance
    )
    balance.add_argument("split_dir", type=Path, help="output of 'shopvision split'")
    balance.add_argument("out", type=Path, help="output: same layout, train oversampled, OUT/balance.json")
    balance.add_argument("--percentile", type=float, default=98.0, help="target percentile (default 98)")

    augment = step(
        "augment", "add mirrored, rotated (cw/ccw) and grainy copies of the train photos", _run_augment
    )
    augment.add_argument("balanced_dir", type=Path, help="output of 'shopvision balance' (or split)")
    augment.add_argument("out", type=Path, help="output: same layout plus augmented train photos")
    augment.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["mirror", "rot_cw", "rot_ccw", "grain"],
        help="switch one operation off (repeatable)",
    )
    augment.add_argument("--only", help="comma-separated operations to apply (overrides --skip)")
    augment.add_argument("--angle", type=float, default=15.0, help="rotation in degrees (default 15)")
    augment.add_argument("--grain", type=float, default=0.06, help="grain strength σ/255 (default 0.06)")
    augment.add_argument("--seed", type=int, default=0)
    augment.add_argument("--workers", type=_positive_int, default=os.cpu_count())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except StepError as exc:
        print(f"shopvision {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shopvision {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
