"""Which photos are the same picture: exact (SHA-256) and near (pHash + thumbnail) duplicate groups.

Near pairs are found by banding the 64-bit hashes (pigeonhole) instead of comparing all pairs, so a
million photos cost a few buckets each, not a trillion comparisons.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from .images import signature_distance


class Hashed(Protocol):
    sha256: str | None
    phash: int | None
    signature: bytes | None


class UnionFind:
    """Disjoint sets over positions 0..n-1; a set's root is its smallest position, and its size is kept
    so split can cap how large a look-alike group grows."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            self.size[min(ra, rb)] += self.size[max(ra, rb)]


def near_pairs(decoded: Sequence[Hashed], bits: int) -> list[tuple[int, int, int]]:
    """Pairs within `bits` Hamming distance, found without comparing all pairs.

    Pigeonhole: split the 64 bits into bits+1 bands; two hashes within `bits` share a band.
    """
    bands = bits + 1
    widths = [64 // bands + (1 if i < 64 % bands else 0) for i in range(bands)]
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, item in enumerate(decoded):
        shift = 0
        for band, width in enumerate(widths):
            buckets[(band, (item.phash >> shift) & ((1 << width) - 1))].append(position)
            shift += width
    pairs: set[tuple[int, int, int]] = set()
    for members in buckets.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                distance = (decoded[a].phash ^ decoded[b].phash).bit_count()
                if distance <= bits:
                    pairs.add((a, b, distance))
    return sorted(pairs)


def group_duplicates(
    decoded: Sequence[Hashed], bits: int, grey: float
) -> tuple[dict[int, list[int]], dict[tuple[int, int], str]]:
    """Duplicate groups ({root: positions in `decoded`}, groups of two or more) and why each pair was linked.

    Exact copies share a SHA-256; near copies are within `bits` pHash bits and `grey` mean thumbnail
    difference, the second test catching different photos whose low frequencies happen to agree.
    """
    union = UnionFind(len(decoded))
    why: dict[tuple[int, int], str] = {}
    by_sha: dict[str, int] = {}
    for position, item in enumerate(decoded):
        first = by_sha.setdefault(item.sha256, position)
        if first != position:
            union.union(first, position)
            why[(first, position)] = "exact"
    for a, b, distance in near_pairs(decoded, bits):
        if decoded[a].sha256 == decoded[b].sha256:
            continue
        if signature_distance(decoded[a].signature, decoded[b].signature) <= grey:
            union.union(a, b)
            why[(a, b)] = f"near (pHash distance {distance})"
    groups: dict[int, list[int]] = defaultdict(list)
    for position in range(len(decoded)):
        groups[union.find(position)].append(position)
    return {root: members for root, members in groups.items() if len(members) > 1}, why
