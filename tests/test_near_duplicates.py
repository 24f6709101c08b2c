"""Multi-index near-pair search against the comparison of all pairs it replaced."""

from dataclasses import dataclass

import numpy as np
import pytest

from shopvision.components.data.near_duplicates import near_pair_arrays, near_pairs


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


def test_every_photo_the_same_hash_pairs_all_of_them():
    pairs = near_pairs([Item(0xABCDEF)] * 6, 6)
    assert pairs == [(a, b, 0) for a in range(6) for b in range(a + 1, 6)]


def test_negative_bits_is_refused():
    with pytest.raises(ValueError, match="at least 0"):
        near_pair_arrays(np.zeros(3, np.uint64), -1)
