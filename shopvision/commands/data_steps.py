"""clean, split, balance, augment: the data steps."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import add_root_flag, add_step, positive_int

ORDER = 10


def _run_clean(args: argparse.Namespace) -> None:
    from shopvision.components.data.clean import clean, summary
    from shopvision.components.data.corrections import read_corrections

    result = clean(
        args.raw,
        args.out,
        size=args.size,
        workers=args.workers,
        report=args.report,
        max_pixels=args.max_pixels,
        corrections=read_corrections(args.corrections) if args.corrections else None,
    )
    print(summary(result))
    print(f"report: {args.report or args.out / 'clean_report.json'}")


def _run_split(args: argparse.Namespace) -> None:
    from shopvision.components.data.split import split, summary

    result = split(
        args.clean_dir,
        args.out,
        val=args.val,
        test=args.test,
        seed=args.seed,
        lookalike=args.lookalike,
        similarity=args.similarity,
        max_group_share=args.max_group_share,
        frozen=args.frozen,
    )
    print(summary(result))


def _run_balance(args: argparse.Namespace) -> None:
    from shopvision.components.data.balance import balance, summary

    print(summary(balance(args.split_dir, args.out, percentile=args.percentile)))


def _run_augment(args: argparse.Namespace) -> None:
    from shopvision.components.data.augment import OPERATIONS, augment, summary
    from shopvision.components.data.manifest import parse_roots

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
        roots=parse_roots(args.roots),
    )
    print(summary(result))


def add_parser(steps) -> None:
    clean = add_step(
        steps,
        "clean",
        "decode every raw photo safely, drop unreadable files and duplicates, write JPEGs that fit SIZE×SIZE "
        "and a report",
        _run_clean,
    )
    clean.add_argument("raw", type=Path, help="raw photos: RAW/<category>/**/<file>")
    clean.add_argument("out", type=Path, help="output: OUT/<category>/<name>.jpg and OUT/clean_report.json")
    clean.add_argument("--size", type=positive_int, default=224, help="fit inside SIZE×SIZE (default 224)")
    clean.add_argument("--report", type=Path, help="also write the JSON report here")
    clean.add_argument(
        "--workers", type=positive_int, default=os.cpu_count(), help="decoding processes (default: all cores)"
    )
    clean.add_argument(
        "--max-pixels",
        type=positive_int,
        default=64_000_000,
        help="refuse images with more pixels (decompression bombs; default 64M)",
    )
    clean.add_argument(
        "--corrections",
        type=Path,
        metavar="FILE",
        help="corrections.csv from the audit report (photo,category,corrected_category): file those photos "
        "under the corrected category; every row must apply, or nothing is written",
    )

    split = add_step(
        steps,
        "split",
        "train/val/test by look-alike group (one product, or photos that look alike), before any copying",
        _run_split,
    )
    split.add_argument("clean_dir", type=Path, help="output of 'shopvision clean'")
    split.add_argument(
        "out",
        type=Path,
        help="output: OUT/manifest.jsonl.gz (each photo's split and group, by reference to CLEAN_DIR: "
        "no photo is copied) and OUT/split.json",
    )
    split.add_argument("--val", type=float, default=0.1, help="validation fraction (default 0.1)")
    split.add_argument("--test", type=float, default=0.1, help="test fraction (default 0.1)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument(
        "--lookalike",
        choices=["embedding", "none"],
        default="embedding",
        help="keep photos that look alike in one split: 'embedding' (ImageNet EfficientNet-Lite0 features, "
        "offline) or 'none' (group by product id only); default embedding",
    )
    split.add_argument(
        "--similarity",
        type=float,
        default=0.82,
        help="cosine similarity at which two photos of a category are look-alikes (default 0.82)",
    )
    split.add_argument(
        "--max-group-share",
        type=float,
        default=0.5,
        help="a look-alike group holds at most this share of its category (default 0.5)",
    )
    split.add_argument(
        "--frozen",
        type=Path,
        help="frozen evaluation set (JSON of content hashes from the registry): these photos stay in test",
    )

    balance = add_step(
        steps,
        "balance",
        "oversample rare train categories up to a percentile of category counts",
        _run_balance,
    )
    balance.add_argument(
        "split_dir", type=Path, help="output of 'shopvision split' (or SPLIT/train/<category>/ folders)"
    )
    balance.add_argument(
        "out",
        type=Path,
        help="output: OUT/manifest.jsonl.gz (the same photos by reference, train copy counts raised) and "
        "OUT/balance.json",
    )
    balance.add_argument("--percentile", type=float, default=98.0, help="target percentile (default 98)")

    augment = add_step(
        steps, "augment", "add mirrored, rotated (cw/ccw) and grainy copies of the train photos", _run_augment
    )
    augment.add_argument("balanced_dir", type=Path, help="output of 'shopvision balance' (or split)")
    augment.add_argument(
        "out",
        type=Path,
        help="output: the new photos OUT/train/<category>/<name>.<op>.jpg and OUT/manifest.jsonl.gz (them, "
        "and the input's photos by reference)",
    )
    add_root_flag(augment)
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
    augment.add_argument("--workers", type=positive_int, default=os.cpu_count())
