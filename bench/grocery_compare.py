"""Two or more finished `bench/grocery_accuracy.sh` runs, paired on the same held-out photos.

    .venv/bin/python bench/grocery_compare.py BASELINE OTHER [OTHER ...]

Each WORKDIR is a run's output folder (its eval/metrics.json and eval/predictions.csv). Every run
is scored on the same val_* photos, so the comparison is paired: only the photos one run gets right
and the other wrong count, and the exact McNemar p-value says how sure a difference is. Two
unpaired runs of ~300 photos differ by 3.5 points of standard error; paired, a real gain of a few
points can show. Nothing here is chosen: it reads what each run already reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RunError(Exception):
    """A workdir that is not a finished run: said in one line, not a traceback."""


def read_run(work: Path) -> tuple[dict, dict[str, bool]]:
    """(metrics.json, {category/file: top-1 right?}) of a finished run's evaluation."""
    metrics_path, predictions_path = work / "eval" / "metrics.json", work / "eval" / "predictions.csv"
    for path in (metrics_path, predictions_path):
        if not path.is_file():
            raise RunError(f"{work}: no {path.relative_to(work)} (is it a finished grocery_accuracy.sh run?)")
    from shopvision.components.evaluation.report import read_predictions

    right = {f"{p.true_category}/{p.file}": p.correct for p in read_predictions(predictions_path)}
    return json.loads(metrics_path.read_text()), right


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compare(works: list[Path]) -> list[str]:
    """The table's lines: each run's headline numbers and its paired difference to the first."""
    from shopvision.components.registry.promotion_gate import Score
    from shopvision.components.registry.promotion_gate import compare as paired_scores

    runs = [(work, *read_run(work)) for work in works]
    base = Score.of(runs[0][2])
    lines = [
        f"{'run':28} {'val_* top-1':>11} {'top-5':>6} {'macro':>6} {'threshold':>9} {'covered':>8} "
        f"{'acc there':>9}  vs {runs[0][0].name}"
    ]
    for work, metrics, right in runs:
        try:
            paired = paired_scores(Score.of(right), base)
        except ValueError:
            raise RunError(f"{work}: scored other photos than {runs[0][0]}, or none (not paired)") from None
        b, c = paired.candidate_only, paired.champion_only
        cov = metrics["coverage"]
        macro = metrics.get("macro_category", {}).get("accuracy")
        chosen = metrics.get("confidence_threshold")
        lines.append(
            f"{work.name:28} {metrics['top1_accuracy']:11.3f} {metrics['top5_accuracy']:6.3f} "
            f"{_number(macro, 3):>6} {_number(chosen, 2):>9} {cov['coverage']:8.3f} "
            f"{_number(cov['accuracy'], 3):>9}  "
            f"{paired.difference:+.3f} [{paired.ci_low:+.3f}, {paired.ci_high:+.3f}] "
            f"(+{b}/-{c}, McNemar p={paired.p_value:.3f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("works", nargs="+", type=Path, metavar="WORKDIR", help="the first is the baseline")
    args = parser.parse_args(argv)
    try:
        print("\n".join(compare([w.resolve() for w in args.works])))
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
