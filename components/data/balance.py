"""The balance step: oversample rare categories of the train split up to a percentile of counts.

The target is the given percentile (default 98th) of the train photos per category, so a handful of
huge categories does not set the bar; categories above it are left as they are. Extra samples cycle
through a category's photos in name order so every photo is repeated as evenly as possible. val and
test are carried over untouched: balancing them would distort the measured accuracy.

balance copies no photo: it writes a manifest whose rows reference the photos its input references
(the cleaned folder, for split's output) with `copies`, how many samples each photo stands for. A
reader expands a row of 3 copies into `x.jpg`, `x.copy1.jpg`, `x.copy2.jpg`: the names, and so the
sample order, that the hard links of the folder layout had. Its rows carry the 64-bit hash prefix
that train logs, not the full hash (promote reads split's output, which has it).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import StepError
from .dataset import prepare_output
from .manifest import (
    HASH_PREFIX,
    Entry,
    Manifest,
    carried_roots,
    has_manifest,
    input_manifest,
    write_manifest,
)
from .manifest import copy_name as _copy_name
from .manifest import source_of_copy as source_of_copy  # re-exported: callers and tests use it from here
from .naming import atomic_write_text

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
    return _copy_name(Path(source).name, k)


def copy_counts(count: int, target: int) -> list[int]:
    """Samples per photo of a category of COUNT photos raised to TARGET: extra copies cycle through the
    photos in name order, so the first `(target - count) % count` photos get one more."""
    added = max(0, target - count)
    return [1 + added // count + (i < added % count) for i in range(count)]


def balance(split_dir: Path, out: Path, *, percentile: float = 98.0) -> BalanceResult:
    """Write OUT/manifest.jsonl.gz (train rows with copy counts; val and test as they were) and
    OUT/balance.json. SPLIT_DIR is split's output, or a folder layout DATA/train/<category>/."""
    split_dir, out = Path(split_dir), Path(out)
    if not 0 < percentile <= 100:
        raise StepError(f"--percentile must be in (0, 100], got {percentile}")
    missing = f"no train photos in {split_dir}/train/<category>/: run 'shopvision split' first"
    if not has_manifest(split_dir) and not (split_dir / "train").is_dir():
        raise StepError(missing)
    source = input_manifest(split_dir)
    train: dict[str, list[Entry]] = defaultdict(list)
    for entry in source.entries:
        if entry.split == "train":
            train[entry.category].append(entry)
    if not train:
        raise StepError(missing)
    prepare_output(out, MANIFEST, "balance")
    # Samples, not photos: an input balanced already (copies > 1) counts its copies.
    counts = {c: sum(e.copies for e in rows) for c, rows in sorted(train.items())}
    target = balance_target(list(counts.values()), percentile)
    result = BalanceResult(percentile, target)
    rows: list[Entry] = []
    for category, entries in sorted(train.items()):
        entries = sorted(entries, key=lambda e: e.file)
        added = max(0, target - counts[category])
        extra = [k - 1 for k in copy_counts(len(entries), len(entries) + added)]
        rows += [
            replace(e, copies=e.copies + x, sha256=e.sha256[:HASH_PREFIX])
            for e, x in zip(entries, extra, strict=True)
        ]
        result.categories[category] = {
            "count": counts[category],
            "added": added,
            "factor": round((counts[category] + added) / counts[category], 4),
        }
    rows += [replace(e, sha256=e.sha256[:HASH_PREFIX]) for e in source.entries if e.split != "train"]
    write_manifest(out, "balance", rows, _used_roots(source, rows))
    atomic_write_text(out / MANIFEST, result.to_json())
    return result


def _used_roots(source: Manifest, rows: list[Entry]) -> dict:
    """The roots the rows name, as the input had them: a manifest records only what it references."""
    roots = carried_roots(source)
    used = {e.root for e in rows}
    return {name: folder for name, folder in roots.items() if name in used}


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
