"""Multi-index near-pair search against the comparison of all pairs it replaced."""

from dataclasses import dataclass

import numpy as np
import pytest

from shopvision.components.data.images import signature_distance
from shopvision.components.data.near_duplicates import (
    UnionFind,
    group_duplicates,
    near_pair_arrays,
    near_pairs,
)


def all_pairs(hashes: list[int], bits: int) -> list[tuple[int, int, int]]:
    """The reference: every pair compared, as the first release's verdicts were defined."""
    return [
        (a, b, (hashes[a] ^ hashes[b]).bit_count())
        for a in range(len(hashes))
        for b in range(a + 1, len(hashes))
        if (hashes[a] ^ hashes[b]).bit_count() <= bits
    ]


def flip_bits(hashes: np.ndarray, flips: int, rng: np.random.Generator) -> np.ndarray:
    for _ in range(flips):
        hashes = hashes ^ (np.uint64(1) << rng.integers(0, 64, len(hashes)).astype(np.uint64))
    return hashes


def uniform(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def clustered(n: int, rng: np.random.Generator) -> np.ndarray:
    """Groups around few centres, some exact copies, and a shared 'white background' half."""
    hashes = flip_bits(uniform(max(1, n // 15), rng)[rng.integers(0, max(1, n // 15), n)], 3, rng)
    hashes[: n // 10] = hashes[n // 10 : 2 * (n // 10)]  # exact copies (re-encoded files)
    return hashes | np.uint64(0x00FF00FF00FF00FF)  # 32 bits every photo shares


@dataclass
class Item:
    phash: int
    sha256: str = ""
    signature: bytes = b""


@pytest.mark.parametrize("make", [uniform, clustered])
@pytest.mark.parametrize("bits", [0, 1, 6, 10])
def test_pairs_equal_all_pairs_compared(make, bits):
    rng = np.random.default_rng(bits)
    hashes = make(700, rng)
    expected = all_pairs(hashes.tolist(), bits)
    assert near_pairs([Item(h) for h in hashes.tolist()], bits) == expected
    if make is clustered:
        assert len(expected) > 200  # the test really has near pairs to find (and copies at 0)
        assert any(d == 0 for *_, d in expected) and any(d > 0 for *_, d in expected) == (bits > 0)


def test_many_sizes_and_radii_against_all_pairs():
    # Small sets pick other chunkings (more chunks, radius 0) than big ones: each must agree.
    rng = np.random.default_rng(7)
    for trial in range(25):
        n = int(rng.integers(0, 300))
        hashes = clustered(n, rng) if trial % 2 else uniform(n, rng)
        bits = int(rng.integers(0, 16))
        a, b, d = near_pair_arrays(hashes, bits)
        assert list(zip(a.tolist(), b.tolist(), d.tolist(), strict=True)) == all_pairs(hashes.tolist(), bits)


def groups_as_compared_pair_by_pair(items, bits, grey):
    """The first release's group_duplicates: every pair of the all-pairs reference, one at a time."""
    union, why, by_sha = UnionFind(len(items)), {}, {}
    for position, item in enumerate(items):
        first = by_sha.setdefault(item.sha256, position)
        if first != position:
            union.union(first, position)
            why[(first, position)] = "exact"
    for a, b, distance in all_pairs([item.phash for item in items], bits):
        if (
            items[a].sha256 != items[b].sha256
            and signature_distance(items[a].signature, items[b].signature) <= grey
        ):
            union.union(a, b)
            why[(a, b)] = f"near (pHash distance {distance})"
    groups = {}
    for position in range(len(items)):
        groups.setdefault(union.find(position), []).append(position)
    return {root: members for root, members in groups.items() if len(members) > 1}, why


def test_groups_and_reasons_equal_the_pair_by_pair_verdicts():
    rng = np.random.default_rng(3)
    hashes = clustered(600, rng).tolist()
    base = rng.integers(0, 256, (40, 256), dtype=np.uint8)
    items = []
    for i, h in enumerate(hashes):
        # Thumbnails: a few shared scenes with noise, so some near pairs pass the grey test and some fail.
        noise = rng.integers(-12, 13, 256) if i % 3 else rng.integers(-2, 3, 256)
        signature = np.clip(base[h % 40].astype(int) + noise, 0, 255).astype(np.uint8).tobytes()
        items.append(Item(h, sha256=f"sha{h if i % 7 == 0 else i}", signature=signature))
    groups, why = group_duplicates(items, 6, 8.0)
    expected_groups, expected_why = groups_as_compared_pair_by_pair(items, 6, 8.0)
    assert groups == expected_groups and why == expected_why
    reasons = set(why.values())
    assert "exact" in reasons and any(r.startswith("near") for r in reasons)
    assert len(why) < len(all_pairs(hashes, 6))  # the grey test refused some pHash pairs


def test_every_photo_the_same_hash_pairs_all_of_them():
    pairs = near_pairs([Item(0xABCDEF)] * 6, 6)
    assert pairs == [(a, b, 0) for a in range(6) for b in range(a + 1, 6)]


def test_bits_every_photo_shares_are_dealt_evenly_to_the_chunks():
    # 16 constant bits (a white background's low frequencies) in one chunk would put every photo in
    # a few buckets; dealt by entropy, each of the 4 chunks gets 4 of them.
    from shopvision.components.data.near_duplicates import _chunks

    shared = list(range(0, 64, 4))
    mask = sum(1 << bit for bit in shared)
    hashes = np.unique(uniform(100_000, np.random.default_rng(5)) | np.uint64(mask))
    chunks = _chunks(hashes, 6)
    assert [len(bits) for bits, _ in chunks] == [16, 16, 16, 16] and {r for _, r in chunks} == {1}
    assert [len(set(bits) & set(shared)) for bits, _ in chunks] == [4, 4, 4, 4]


def test_negative_bits_is_refused():
    with pytest.raises(ValueError, match="at least 0"):
        near_pair_arrays(np.zeros(3, np.uint64), -1)
