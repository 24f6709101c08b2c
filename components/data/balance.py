"""The balance step: oversample rare categories of the train split up to a percentile of counts.

The target is the given percentile (default 98th) of the train photos per category, so a handful of
huge categories does not set the bar; categories above it are left as they are. Extra photos are
hard links named <stem>.copy<k>.jpg (no bytes copied), cycling through a category's photos in name
order so every photo is repeated as evenly as possible. val and test are carried over untouched:
balancing them would distort the measured accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StepError
from .dataset import carry_split_manifest, category_photos, link_split, prepare_output
from .naming import atomic_write_text, link_or_copy

MANIFEST = "balance.json"
COPY_MARK = ".copy"


@dataclass
class BalanceResult:
    percentile: float
    target: int
    categories: dict[str, dict] = field(default_factory=dict)  # category -> count, added, factor

    def to_json(self) -> str:
        body = {
            "step": "balance",
            "percentile": self.percentile,
            "target": self.target,
            "categories": self.categories,
        }
        return json.dumps(body, indent=1) + "\n"


def balance_target(counts: list[int], percentile: float) -> int:
    """The photo count every smaller category is raised to (rounded up: never below the percentile)."""
    return int(math.ceil(float(np.percentile(np.asarray(counts, dtype=float), percentile)) - 1e-9))


def copy_name(source: Path, k: int) -> str:
    return f"{source.stem}{COPY_MARK}{k}{source.suffix}"


def source_of_copy(name: str) -> str | None:
    """'x.copy3.jpg' → 'x.jpg'; None for a photo that is not a balance copy."""
    stem, _, suffix = name.rpartition(".")
    base, mark, k = stem.rpartition(COPY_MARK)
    return f"{base}.{suffix}" if mark and k.isdigit() else None


def balance(split_dir: Path, out: Path, *, percentile: float = 98.0) -> BalanceResult:
    split_dir, out = Path(split_dir), Path(out)
    if not 0 < percentile <= 100:
        raise StepError(f"--percentile must be in (0, 100], got {percentile}")
    train = (
        {c: files for c, files in category_photos(split_dir / "train").items() if files}
        if (split_dir / "train").is_dir()
        else {}
    )
    if not train:
        raise StepError(f"no train photos in {split_dir}/train/<category>/: run 'shopvision split' first")
    prepare_output(out, MANIFEST, "balance")
    target = balance_target([len(files) for files in train.values()], percentile)
    result = BalanceResult(percentile, target)
    for category, files in train.items():
        for path in files:
            link_or_copy(path, out / "train" / category / path.name)
        added = max(0, target - len(files))
        for i in range(added):
            source = files[i % len(files)]
            link_or_copy(source, out / "train" / category / copy_name(source, i // len(files) + 1))
        result.categories[category] = {
            "count": len(files),
            "added": added,
            "factor": round((len(files) + added) / len(files), 4),
        }
    for split_name in ("val", "test"):
        link_split(split_dir, out, split_name)
    carry_split_manifest(Path(split_dir), out)
    atomic_write_text(out / MANIFEST, result.to_json())
    return result


def summary(result: BalanceResult) -> str:
    raised = {c: r for c, r in result.categories.items() if r["added"]}
    lines = [
        f"balance: target {result.target} photos per category (percentile {result.percentile:g}); "
        f"{len(raised)} of {len(result.categories)} categories oversampled"
    ]
    lines += [
        f"  {c}: {r['count']} → {r['count'] + r['added']} (×{r['factor']:.2f})" for c, r in raised.items()
    ]
    return "\n".join(lines)
