"""Benchmark: clean's near-duplicate search (`near_pair_arrays`) at 100k, 200k and 1M hashes.

Why this exists: the first release compared hashes within pigeonhole bands of ~9 bits, so at a
million photos each band held ~2,000 hashes and the search was quadratic in practice (3.0 s / 11.4 s
/ 46 s at 50k / 100k / 200k). This script shows the growth of the multi-index search that replaced
it, on two kinds of hash sets:

- uniform: random 64-bit hashes (distinct photos);
- clustered: product photos on white backgrounds. Groups of 10 hashes within 3 bits of a centre
  (burst shots, re-encodes), and 16 of the 64 bits shared by 90% of all photos (the background's low
  frequencies), which is what makes buckets of a naive chunking blow up.

It prints wall and CPU seconds, pairs found, and the time ratio per doubling of N (≈2 is linear;
the first release's was ≈4). Run from the repository root:

    .venv/bin/python bench/near_duplicates.py [--sizes 100000 200000 1000000] [--bits 6]

Wall time depends on what else runs on the machine: CPU seconds are the steadier number.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from shopvision.components.data.clean import NEAR_DUPLICATE_BITS
from shopvision.components.data.near_duplicates import near_pair_arrays

BACKGROUND_BITS = 16
BACKGROUND_SHARE = 0.9
CLUSTER = 10
CLUSTER_FLIPS = 3


def uniform(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def clustered(n: int, rng: np.random.Generator) -> np.ndarray:
    """Clusters of CLUSTER hashes, each up to CLUSTER_FLIPS bits from its centre; the centres share
    BACKGROUND_BITS bits (spread over the hash) with probability BACKGROUND_SHARE each."""
    centres = uniform(-(-n // CLUSTER), rng)
    background = rng.choice(64, BACKGROUND_BITS, replace=False)
    pattern = uniform(1, rng)[0]
    for bit in background.tolist():
        one = np.uint64(1) << np.uint64(bit)
        shared = rng.random(len(centres)) < BACKGROUND_SHARE
        centres = np.where(shared, (centres & ~one) | (pattern & one), centres)
    hashes = np.repeat(centres, CLUSTER)[:n]
    for _ in range(CLUSTER_FLIPS):
        flip = rng.random(n) < 0.7
        hashes ^= flip.astype(np.uint64) << rng.integers(0, 64, n).astype(np.uint64)
    return rng.permutation(hashes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000, 1_000_000])
    parser.add_argument("--bits", type=int, default=NEAR_DUPLICATE_BITS, help="clean's default unless given")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; bits {args.bits}")
    print(f"{'hashes':<10}{'N':>10}{'wall s':>9}{'CPU s':>8}{'pairs':>10}{'×/doubling':>12}")
    for name, make in (("uniform", uniform), ("clustered", clustered)):
        previous = None
        for n in args.sizes:
            hashes = make(n, np.random.default_rng(args.seed))
            wall, cpu = time.perf_counter(), time.process_time()
            a, _, _ = near_pair_arrays(hashes, args.bits)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            growth = ""
            if previous is not None:
                # Per doubling of N: (t2 / t1) ** (1 / log2(n2 / n1)), on CPU seconds.
                growth = f"{(cpu / previous[1]) ** (1 / math.log2(n / previous[0])):.2f}"
            print(f"{name:<10}{n:>10}{wall:>9.2f}{cpu:>8.2f}{len(a):>10}{growth:>12}", flush=True)
            previous = (n, cpu)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
