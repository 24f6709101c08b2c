"""Which photos are the same picture: exact (SHA-256) and near (pHash + thumbnail) duplicate groups.

Near pairs are found by multi-index hashing, in numpy, instead of comparing all pairs:

- identical hashes (re-encoded copies) are searched once, as one unique hash;
- the 64 bits are split into m chunks; two hashes within `bits` differ in at most floor(bits/m) bits
  of some chunk (pigeonhole), so each hash looks up, in one table per chunk, only the chunk values
  within that radius of its own, and every candidate is checked with the exact distance;
- the bits are dealt to chunks so each chunk holds as much entropy as the others: pHash bits are
  not fair coins (bit 0, the DC term, is nearly always set; photos on white backgrounds share their
  low frequencies), and a chunk of biased bits would put most photos in one bucket.

Any split of the bits finds every pair within `bits`, so the verdicts equal a comparison of all
pairs (tests/test_near_duplicates.py checks it against a brute force); the split only changes the
cost. At a million uniform hashes that is seconds, not the ~20 minutes of all pairs
(bench/near_duplicates.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from math import comb
from typing import Protocol

import numpy as np

from .images import signature_distance

HASH_BITS = 64
# Dense lookup tables per chunk have 2**width entries: chunks narrower than this keep them small.
MAX_CHUNK_WIDTH = 22
# Candidates checked per numpy batch: bounds the memory of one step (~100 bytes each).
BATCH_CANDIDATES = 2_000_000


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
    """Pairs (a, b, distance), a < b, of positions within `bits` pHash bits, sorted."""
    hashes = np.fromiter((item.phash for item in decoded), dtype=np.uint64, count=len(decoded))
    a, b, distance = near_pair_arrays(hashes, bits)
    return list(zip(a.tolist(), b.tolist(), distance.tolist(), strict=True))


def near_pair_arrays(hashes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of positions within `bits` Hamming distance, as arrays (a, b, distance), a < b,
    sorted by (a, b)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if bits < 0:
        raise ValueError(f"bits must be at least 0, got {bits}")
    unique, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    u, v, distance = _unique_pairs(unique, bits)
    return _positions(inverse.ravel(), counts, u, v, distance)


def _unique_pairs(unique: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs u < v of distinct hashes (indices into `unique`) within `bits`."""
    if len(unique) < 2:
        return (np.zeros(0, np.int64),) * 3
    found = [_chunk_pairs(unique, chunk_bits, radius, bits) for chunk_bits, radius in _chunks(unique, bits)]
    u, v, d = (np.concatenate([f[i] for f in found] + [np.zeros(0, np.int64)]) for i in range(3))
    # A pair close in more than one chunk was found once per chunk.
    _, first = np.unique(u * len(unique) + v, return_index=True)
    return u[first], v[first], d[first]


def _chunk_pairs(
    unique: np.ndarray, chunk_bits: list[int], radius: int, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs u < v within `bits` whose values on these chunk bits are within `radius`.

    Each pair of buckets (k, k ^ mask) is visited once: within a bucket, each hash meets the hashes
    after it; across buckets, only from the bucket whose key has the mask's top bit clear. The hashes
    are read in bucket order, so a bucket's hashes are one contiguous run.
    """
    n = len(unique)
    keys = _chunk_keys(unique, chunk_bits)
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_hashes = keys[order], unique[order]
    counts = np.bincount(keys, minlength=1 << len(chunk_bits))
    ends = np.cumsum(counts)
    starts = ends - counts
    masks = _masks(len(chunk_bits), radius)[1:]  # mask 0 (the own bucket) is handled apart
    top = np.left_shift(1, np.floor(np.log2(np.maximum(masks, 1))).astype(np.int64))
    slot = np.arange(n)
    # Runs of slots each hash (in bucket order) is compared with: the rest of its own bucket, then the
    # buckets one mask away (empty where the key has the mask's top bit set: seen from there).
    run_start = np.concatenate([(slot + 1)[:, None], starts[sorted_keys[:, None] ^ masks[None, :]]], axis=1)
    run_end = np.concatenate(
        [ends[sorted_keys][:, None], ends[sorted_keys[:, None] ^ masks[None, :]]], axis=1
    )
    seen_there = np.concatenate([np.zeros((n, 1), bool), (sorted_keys[:, None] & top[None, :]) != 0], axis=1)
    run_end = np.where(seen_there, run_start, run_end)
    sizes = run_end - run_start
    per_item = sizes.sum(axis=1)
    batch = (np.cumsum(per_item) - per_item) // BATCH_CANDIDATES
    edges = np.concatenate(([0], np.flatnonzero(np.diff(batch)) + 1, [n])).tolist()
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for first, last in zip(edges[:-1], edges[1:], strict=True):
        run_sizes = sizes[first:last].ravel()
        total = int(run_sizes.sum())
        if total == 0:
            continue
        offsets = np.cumsum(run_sizes) - run_sizes
        slots = np.arange(total) + np.repeat(run_start[first:last].ravel() - offsets, run_sizes)
        owners = np.repeat(slot[first:last], per_item[first:last])
        distance = np.bitwise_count(sorted_hashes[owners] ^ sorted_hashes[slots])
        close = np.flatnonzero(distance <= bits)
        a, b = order[owners[close]], order[slots[close]]
        found.append((np.minimum(a, b), np.maximum(a, b), distance[close].astype(np.int64)))
    return tuple(np.concatenate([f[i] for f in found] + [np.zeros(0, np.int64)]) for i in range(3))


def _chunks(unique: np.ndarray, bits: int) -> list[tuple[list[int], int]]:
    """(bit positions, search radius) per chunk: the number of chunks that costs least for this many
    hashes, each chunk's bits chosen to balance their entropy."""
    n = len(unique)
    best = None
    for m in range(max(1, -(-HASH_BITS // MAX_CHUNK_WIDTH)), max(bits + 1, 3) + 1):
        width, radius = -(-HASH_BITS // m), bits // m
        probes = sum(comb(width, k) for k in range(radius + 1))
        # A probe costs about as much as a few candidates; candidates per probe ~ n / 2**width.
        cost = m * probes * (4 + n / (1 << width))
        if best is None or cost < best[0]:
            best = (cost, m, radius)
    _, m, radius = best
    ones = np.array([np.count_nonzero((unique >> np.uint64(i)) & np.uint64(1)) for i in range(HASH_BITS)])
    p = np.clip(ones / n, 1e-9, 1 - 1e-9)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    sizes = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
    chunks: list[list[int]] = [[] for _ in range(m)]
    totals = [0.0] * m
    for bit in np.argsort(-entropy, kind="stable").tolist():  # most informative first, to the poorest
        open_chunks = [c for c in range(m) if len(chunks[c]) < sizes[c]]
        target = min(open_chunks, key=lambda c: (totals[c], c))
        chunks[target].append(bit)
        totals[target] += float(entropy[bit])
    return [(chunk, radius) for chunk in chunks]


def _chunk_keys(unique: np.ndarray, chunk_bits: list[int]) -> np.ndarray:
    keys = np.zeros(len(unique), dtype=np.int64)
    for place, bit in enumerate(chunk_bits):
        keys |= ((unique >> np.uint64(bit)) & np.uint64(1)).astype(np.int64) << place
    return keys


def _masks(width: int, radius: int) -> np.ndarray:
    """Every width-bit value with at most `radius` bits set: the chunk values to look up."""
    values = np.arange(1 << width, dtype=np.int64) if width <= 16 else None
    if values is not None:
        return values[np.bitwise_count(values) <= radius]
    masks = [0]
    frontier = [0]
    for _ in range(radius):
        frontier = sorted({f | (1 << b) for f in frontier for b in range(width) if not f >> b & 1})
        masks.extend(frontier)
    return np.array(masks, dtype=np.int64)


def _positions(
    inverse: np.ndarray, counts: np.ndarray, u: np.ndarray, v: np.ndarray, distance: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique-hash pairs back to position pairs: every copy of u with every copy of v, plus the
    copies of one hash with each other (distance 0)."""
    members = np.argsort(inverse, kind="stable")  # positions grouped by hash, ascending in each
    first = np.cumsum(counts) - counts
    same = np.flatnonzero(counts > 1)
    # Copies of one hash: all ordered pairs of the group, then keep x < y.
    pairs_u = np.concatenate((u, same))
    pairs_v = np.concatenate((v, same))
    pairs_d = np.concatenate((distance, np.zeros(len(same), np.int64)))
    sizes = counts[pairs_u] * counts[pairs_v]
    total = int(sizes.sum())
    pair = np.repeat(np.arange(len(pairs_u)), sizes)
    local = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    width = counts[pairs_v][pair]
    a = members[first[pairs_u][pair] + local // width]
    b = members[first[pairs_v][pair] + local % width]
    d = pairs_d[pair]
    keep = (pairs_u[pair] != pairs_v[pair]) | (a < b)
    a, b, d = a[keep], b[keep], d[keep]
    a, b = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((b, a))
    return a[order], b[order], d[order].astype(np.int64)


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
    hashes = np.fromiter((item.phash for item in decoded), dtype=np.uint64, count=len(decoded))
    a, b, distance = near_pair_arrays(hashes, bits)
    sha_ids = np.array([by_sha[item.sha256] for item in decoded], dtype=np.int64)
    other_bytes = sha_ids[a] != sha_ids[b]  # exact copies are linked above
    a, b, distance = a[other_bytes], b[other_bytes], distance[other_bytes]
    alike = _signature_distances(decoded, a, b) <= grey
    for x, y, d in zip(a[alike].tolist(), b[alike].tolist(), distance[alike].tolist(), strict=True):
        union.union(x, y)
        why[(x, y)] = f"near (pHash distance {d})"
    groups: dict[int, list[int]] = defaultdict(list)
    for position in range(len(decoded)):
        groups[union.find(position)].append(position)
    return {root: members for root, members in groups.items() if len(members) > 1}, why


def _signature_distances(decoded: Sequence[Hashed], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """signature_distance of each pair (a[i], b[i]), in numpy batches when every signature has one
    length (sums of small integers are exact in float64, so the values equal signature_distance's)."""
    signatures = [item.signature for item in decoded]
    lengths = {len(s) for s in signatures if s is not None}
    if len(a) == 0 or None in signatures or len(lengths) != 1:
        return np.array([signature_distance(signatures[x], signatures[y]) for x, y in zip(a, b, strict=True)])
    length = lengths.pop()
    grey = np.frombuffer(b"".join(signatures), np.uint8).reshape(len(signatures), length)
    step = max(1, 50_000_000 // max(1, 2 * length))
    return np.concatenate(
        [
            np.abs(grey[a[i : i + step]].astype(np.int16) - grey[b[i : i + step]]).mean(axis=1)
            for i in range(0, len(a), step)
        ]
    )
