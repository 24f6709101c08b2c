"""What `shopvision pipeline run` prints: one line per task, a failing task's own error, the log file.

The whole successful run is checked in test_pipeline.py; here, the one-line summaries on hand-made
outputs, and real runs (kfp.local, subprocess tasks) that fail in their split task.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shopvision.pipelines.run_log import error_lines, step_summary, task_summary, warning_lines


def test_a_steps_own_summary_on_one_line_without_its_name():
    clean = "clean: 174 files, 170 kept in 12 categories\n  dropped      4  duplicate"
    assert step_summary("clean-photos", clean) == "174 files, 170 kept in 12 categories; dropped 4 duplicate"
    balance = (
        "balance: target 24 photos per category (percentile 98); 9 of 12 categories oversampled\n"
        + "\n".join(f"  Category{i}: 6 → 24 (×4.00)" for i in range(9))
    )
    assert step_summary("balance-photos", balance) == (
        "target 24 photos per category (percentile 98); 9 of 12 categories oversampled"
    )  # too long with every category: the first line alone
    assert step_summary("deploy-model", "3") == "3"


def test_tasks_that_return_no_summary_get_one_from_their_outputs():
    assert (
        task_summary("fingerprint-data", {"Output": "3f2a9c1d8e7b55aa0011"})
        == "content fingerprint 3f2a9c1d8e7b"
    )
    assert task_summary("fetch-photos", {"Output": 1}) == "1 photo"
    assert task_summary("frozen-test-set", {"Output": 0}).startswith("none yet")
    assert task_summary("frozen-test-set", {"Output": 26}) == "26 photos frozen in test"
    metrics = SimpleNamespace(metadata={"val_top1_error": 0.25, "val_top5_error": 0.0})
    assert task_summary("train-model", {"run_id": "abc", "metrics": metrics}) == (
        "val top-1 error 0.2500, top-5 error 0.0000; MLflow run abc"
    )
    metrics = SimpleNamespace(
        metadata={"test_top1_accuracy": 0.8, "test_top5_accuracy": 1.0, "test_images": 25.0}
    )
    assert task_summary("evaluate-model", {"Output": 0.8, "metrics": metrics}) == (
        "25 test photos: top-1 0.8000, top-5 1.0000"
    )
    assert task_summary("register-model", {"Output": "2"}) == "version 2"
    assert (
        task_summary("promote-model", {"promoted": True, "champion": "2"})
        == "PROMOTED: @champion -> version 2"
    )
    assert task_summary("promote-model", {"promoted": False, "champion": "1"}) == (
        "REJECTED: @champion stays version 1"
    )
    assert task_summary("promote-model", {"promoted": False, "champion": ""}) == "REJECTED: no @champion set"


def test_a_steps_warnings_show_under_its_task_line():
    split = "split: 12 categories; train 106, val 30, test 38\n  warning: 22 look-alike link(s) refused"
    assert step_summary("split-photos", split) == "12 categories; train 106, val 30, test 38"
    assert warning_lines({"Output": split}, "") == ["warning: 22 look-alike link(s) refused"]
    streamed = (
        "    evaluate: 38 photos in 12 categories: top-1 0.9474\n"
        "    evaluate: warning: no confidence threshold reaches 0.95 accuracy on the validation photos\n"
        "00:00:00.000 - INFO - Task 'evaluate-model' finished with status SUCCESS\n"
        "    Output: 0.9474\n"
        "  warning: in kfp's record of the outputs, not the task's own\n"
    )
    assert warning_lines({"Output": 0.9474}, streamed) == [
        "warning: no confidence threshold reaches 0.95 accuracy on the validation photos"
    ]


def test_a_failed_tasks_error_is_the_exception_its_step_raised():
    streamed = "\n".join(
        "    " + line
        for line in [
            "[KFP Executor 2026-01-01 00:00:00,000 INFO]: Got executor_input:",
            "{",
            "}",
            "Traceback (most recent call last):",
            '  File "<frozen runpy>", line 198, in _run_module_as_main',
            "    raise StepError(message)",
            "shopvision.components.errors.StepError: corrections.csv cannot be applied:",
            "  line 2: no photo 'Kiwi/x.jpg'",
        ]
    )
    text = "00:00:00.000 - INFO - Executing task 'clean-photos'\n" + streamed + "\n"
    assert error_lines(text) == [
        "shopvision.components.errors.StepError: corrections.csv cannot be applied:",
        "  line 2: no photo 'Kiwi/x.jpg'",
    ]
    assert error_lines("    one\n    two\n") == ["one", "two"]  # no traceback: its last lines


@pytest.fixture(scope="module")
def unusable_raw(tmp_path_factory) -> Path:
    """One category whose only file is not a photo: clean keeps nothing, split has nothing to split."""
    raw = tmp_path_factory.mktemp("unusable") / "raw"
    (raw / "Kiwi").mkdir(parents=True)
    (raw / "Kiwi" / "listing.jpg").write_text("<html>not a photo</html>")
    return raw


def _pipeline_run(raw: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("shopvision", path=str(Path(sys.executable).parent))
    command = [exe, "pipeline", "run", "--data", str(raw), "--workdir", str(workdir), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_failing_task_shows_its_error_and_the_log_not_the_executor_logs(unusable_raw, tmp_path):
    done = _pipeline_run(unusable_raw, tmp_path / "work")
    log = (tmp_path / "work" / "pipeline.log").resolve()
    assert done.returncode == 2
    lines = done.stdout.splitlines()
    assert lines[0] == f"pipeline: running under kfp.local; the full log is in {log}"
    finished = [line.split()[:2] for line in lines[1:] if not line.startswith("      ")]
    # kfp.local runs tasks in a topological order; frozen-test-set depends on nothing, so where it
    # lands among the others is not fixed. The chain fingerprint -> fetch -> clean -> split is.
    assert finished[-1] == ["split-photos", "FAILURE"]
    assert sorted(map(tuple, finished[:-1])) == sorted(
        (task, "SUCCESS") for task in ("fingerprint-data", "fetch-photos", "clean-photos", "frozen-test-set")
    )
    chain = [task for task, _ in finished if task != "frozen-test-set"]
    assert chain == ["fingerprint-data", "fetch-photos", "clean-photos", "split-photos"]
    assert "clean-photos      SUCCESS" in done.stdout and "1 files, 0 kept in 1 categories" in done.stdout
    failure = lines[lines.index(next(line for line in lines if "FAILURE" in line)) + 1 :]
    assert failure[0].startswith("      shopvision.components.errors.StepError: no photos found in ")
    assert failure[-1] == f"      full log: {log}"
    assert done.stderr.strip().endswith(
        f"error: the pipeline failed: task split-photos failed; the full log is in {log}"
    )
    assert "Traceback" not in done.stdout + done.stderr and "Got executor_input" not in done.stdout
    assert "Traceback (most recent call last)" in log.read_text()  # the whole story is in the log
    assert len(lines) < 12


def test_verbose_streams_the_whole_log_as_well(unusable_raw, tmp_path):
    done = _pipeline_run(unusable_raw, tmp_path / "work", "--verbose")
    assert done.returncode == 2
    assert "Got executor_input" in done.stdout and "Traceback (most recent call last)" in done.stdout
    assert "split-photos      FAILURE" in done.stdout  # the task lines too
    assert "Got executor_input" in (tmp_path / "work" / "pipeline.log").read_text()
    assert "non-Python base image" not in done.stdout + done.stderr
