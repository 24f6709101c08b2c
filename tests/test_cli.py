"""The console script as users run it: a real `shopvision` process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = [
    "clean",
    "split",
    "balance",
    "augment",
    "train",
    "classify",
    "evaluate",
    "register",
    "promote",
    "rollback",
    "deploy",
    "serve",
]


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("shopvision", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_help(step):
    done = run(step, "--help")
    assert done.returncode == 0 and f"usage: shopvision {step}" in done.stdout


def test_top_level_help_lists_every_step():
    done = run("--help")
    assert all(step in done.stdout for step in STEPS)


def test_missing_input_is_one_clear_line_not_a_traceback(tmp_path):
    done = run("clean", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_refuses_a_foreign_non_empty_output_and_leaves_it_alone(sample_raw, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = run("clean", str(sample_raw), str(out), "--size", "32")
    assert done.returncode == 2 and "refusing to write" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_data_steps_chain_through_the_cli(sample_raw, tmp_path):
    assert (
        run("clean", str(sample_raw), str(tmp_path / "c"), "--size", "48", "--workers", "2").returncode == 0
    )
    report = json.loads((tmp_path / "c" / "clean_report.json").read_text())
    assert report["totals"]["files"] == 174
    done = run("split", str(tmp_path / "c"), str(tmp_path / "s"))
    assert done.returncode == 0 and "train" in done.stdout
    done = run("balance", str(tmp_path / "s"), str(tmp_path / "b"), "--percentile", "98")
    assert done.returncode == 0 and "target" in done.stdout
    done = run("augment", str(tmp_path / "b"), str(tmp_path / "a"), "--skip", "grain", "--angle", "10")
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "a" / "train").rglob("*.grain.jpg"))
    assert list((tmp_path / "a" / "train").rglob("*.rot_cw.jpg"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arg", "epochs=ten"], "expected integer"),
        (["--arg", "bogus=1"], "no parameter 'bogus'"),
        (["--taxonomy", "missing.csv"], "cannot read taxonomy"),
    ],
)
def test_bad_pipeline_arguments_fail_before_anything_runs(sample_raw, tmp_path, extra, message):
    work = tmp_path / "work"
    done = run("pipeline", "run", "--data", str(sample_raw), "--workdir", str(work), *extra)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not work.exists()  # nothing started: no MLflow store, no pipeline root


HEAVY = ("torch", "torchvision", "mlflow", "kfp")
LOADED_AFTER = """
import sys
from shopvision.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["clean", "--help"], ["train", "--help"], ["pipeline", "run", "--help"]]
)
def test_help_imports_no_heavy_package(args):
    # --help must start fast: torch alone takes ~3 s to import here, so no command may pull it (or
    # mlflow, kfp) in while building the parser; the step's imports happen when it runs.
    done = subprocess.run(
        [sys.executable, "-c", LOADED_AFTER, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.splitlines()[-1].split())
    assert "argparse" in loaded and not loaded & set(HEAVY), loaded & set(HEAVY)


def test_clean_runs_without_importing_torch(sample_raw, tmp_path):
    # A whole clean (decoding, hashing, duplicates) needs Pillow and numpy only: torch's start-up was
    # most of clean's time on a small folder.
    script = LOADED_AFTER.replace("main(sys.argv[1:])", "assert main(sys.argv[1:]) == 0")
    done = subprocess.run(
        [sys.executable, "-c", script, "clean", str(sample_raw), str(tmp_path / "c"), "--size", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c" / "clean_report.json").is_file()
    loaded = set(done.stdout.splitlines()[-1].split())
    assert "PIL" in loaded and not loaded & set(HEAVY), loaded & set(HEAVY)
