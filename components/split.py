"""The split step: stratified train / val / test by product, on cleaned photos, before any copying.

Photos of one listing (same product id) always land in the same split, and exact or near
duplicates were already removed by clean, so no photo or a copy of it is both trained and tested on
(the mistake of the source article, which tested on its own training images).

Assignment is by a seeded hash of (category, product id), not a shuffled list, so adding photos to
the catalogue does not move the photos that were already assigned.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import SPLITS, category_photos, prepare_output
from .errors import StepError
from .naming import atomic_write_text, link_or_copy, product_id

MANIFEST = "split.json"


@dataclass
class SplitResult:
    seed: int
    fractions: dict[str, float]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> split -> photos
    assignments: dict[str, str] = field(default_factory=dict)  # "<category>/<file>" -> split
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "step": "split",
                    "seed": self.seed,
                    "fractions": self.fractions,
                    "counts": self.counts,
                    "warnings": self.warnings,
                    "assignments": self.assignments,
                },
                indent=1,
            )
            + "\n"
        )


def _rank(seed: int, category: str, product: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{product}".encode()).hexdigest()


def assign_category(category: str, files: list[Path], val: float, test: float, seed: int):
    """Split one category's photos by product; returns ({split: [files]}, warning or None)."""
    by_product: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_product[product_id(path.name)].append(path)
    products = sorted(by_product, key=lambda p: _rank(seed, category, p))
    wanted_splits = 1 + (val > 0) + (test > 0)
    chosen: dict[str, list[Path]] = {split: [] for split in SPLITS}
    if len(products) < wanted_splits:
        chosen["train"] = sorted(files)
        return chosen, (
            f"category {category!r} has {len(files)} photo(s) of {len(products)} product(s): it needs at least "
            f"{wanted_splits} products to appear in every split, so all its photos go to train"
        )
    total = len(files)
    targets = {
        "test": max(1, round(total * test)) if test > 0 else 0,
        "val": max(1, round(total * val)) if val > 0 else 0,
    }
    remaining = list(products)
    # Each split still to fill keeps at least one product in reserve (train last).
    for split, reserve in (("test", 1 + (targets["val"] > 0)), ("val", 1)):
        while len(chosen[split]) < targets[split] and len(remaining) > reserve:
            chosen[split].extend(by_product[remaining.pop(0)])
    for product in remaining:
        chosen["train"].extend(by_product[product])
    return {split: sorted(paths) for split, paths in chosen.items()}, None


def split(clean_dir: Path, out: Path, *, val: float = 0.1, test: float = 0.1, seed: int = 0) -> SplitResult:
    clean_dir, out = Path(clean_dir), Path(out)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise StepError(
            f"--val and --test must be fractions in [0, 1) that sum below 1, got {val} and {test}"
        )
    photos = category_photos(clean_dir)
    photos = {category: files for category, files in photos.items() if files}
    if not photos:
        raise StepError(f"no photos found in {clean_dir}: expected {clean_dir}/<category>/<photo>.jpg")
    prepare_output(out, MANIFEST, "split")
    result = SplitResult(seed, {"train": round(1 - val - test, 6), "val": val, "test": test})
    for category, files in photos.items():
        chosen, warning = assign_category(category, files, val, test, seed)
        if warning:
            result.warnings.append(warning)
        result.counts[category] = {s: len(chosen[s]) for s in SPLITS}
        for split_name, paths in chosen.items():
            for path in paths:
                link_or_copy(path, out / split_name / category / path.name)
                result.assignments[f"{category}/{path.name}"] = split_name
    atomic_write_text(out / MANIFEST, result.to_json())
    return result


def summary(result: SplitResult) -> str:
    totals = {s: sum(c[s] for c in result.counts.values()) for s in SPLITS}
    lines = [f"split: {len(result.counts)} categories; " + ", ".join(f"{s} {n}" for s, n in totals.items())]
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)
