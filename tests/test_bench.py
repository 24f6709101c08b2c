"""The benchmarks still run: a tiny smoke run of each one that needs nothing outside the venv.

Speed is not asserted here (timed unit tests lie on a shared CI machine); the ratios come from the
benchmarks themselves, run by hand (bench/README.md).
"""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_throughput_bench_measures_both_loops(sample_raw):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--raw", str(sample_raw)]
        + ["--depths", "18", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1"]
        + ["--workers", "0", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = re.search(r"^resnet18\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)×$", done.stdout, re.MULTILINE)
    assert row, done.stdout
    ours, reference, ratio = map(float, row.groups())
    assert ours > 0 and reference > 0 and abs(ratio - ours / reference) < 0.02


def test_train_throughput_bench_refuses_an_unknown_depth(sample_raw):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train_throughput.py"),
            "--raw",
            str(sample_raw),
            "--depths",
            "19",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unknown ResNet depth" in done.stderr and "Traceback" not in done.stderr
