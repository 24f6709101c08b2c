"""What the evaluation-time levers give a finished `bench/grocery_accuracy.sh` run, with no retraining.

    .venv/bin/python bench/grocery_levers.py [WORKDIR]     (default: grocery-accuracy/)

One trained model, four ways of answering with it:
- as trained: the EMA weights of the best epoch, evaluated at the spec's size (224 px);
- + flip test-time augmentation (`evaluate --tta flip`: one extra pass);
- the raw weights of the best epoch instead of their moving average (the `--ema` lever);
- evaluated at the training resolution instead (the low-resolution epochs' size: what evaluating
  at 224 px after training at 160 px gives).

Each row is scored on the validation photos (drawn from train_* only: what a choice may look at) and
on the held-out val_* photos (reported, never chosen on), with the confidence threshold chosen on the
validation photos. The paired difference to the first row on val_* comes with an exact McNemar
p-value: with ~300 photos, a point or two is within chance.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _variants(train_out: Path, scratch: Path) -> list[tuple[str, Path, str]]:
    import torch

    from shopvision.components.training.models import (
        SPEC_NAME,
        ModelSpec,
        build_model,
        read_state_dict,
        save_classifier,
    )

    best = train_out / "model_best"
    spec = ModelSpec.from_json((best / SPEC_NAME).read_text())
    rows = [
        ("as trained (EMA weights, 224 px)", best, "none"),
        ("+ flip test-time augmentation", best, "flip"),
    ]
    state = torch.load(train_out / "model_best.pt", map_location="cpu", weights_only=True)
    if state.get("ema"):
        raw = build_model(spec)
        raw.load_state_dict(read_state_dict(train_out / "model_best.pt"))
        save_classifier(scratch / "raw", raw, spec)
        rows.append(("raw weights of the best epoch (no EMA)", scratch / "raw", "none"))
    config = state["config"]
    # A low-resolution size that no epoch trained at gives no row.
    low = config.get("low_res_size") if config.get("low_res_epochs") else None
    if low and low != spec.image_size:
        small = ModelSpec(**{**json.loads(spec.to_json()), "image_size": low, "resize_size": None})
        save_classifier(scratch / "low", build_model(small).eval(), small)
        (scratch / "low" / "weights.pt").unlink()
        (scratch / "low" / "weights.pt").symlink_to((best / "weights.pt").resolve())
        rows.append((f"evaluated at the training size ({low} px)", scratch / "low", "none"))
    return rows


def _score(model: Path, test: Path, val: Path, out: Path, taxonomy: Path, tta: str) -> dict:
    from shopvision.components.evaluation.evaluate import evaluate
    from shopvision.components.evaluation.report import read_predictions

    result = evaluate(model, test, out, taxonomy=taxonomy, threshold_data=val, tta=tta)
    right = {p.file: p.correct for p in read_predictions(out / "predictions.csv")}
    return {"metrics": result.metrics, "right": right}


def main() -> None:
    from shopvision.components.registry.promotion_gate import Score, compare

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "grocery-accuracy").resolve()
    taxonomy = ROOT.parent / "shared" / "datasets" / "grocery-store" / "taxonomy.csv"
    val, held = work / "split" / "val", work / "heldout"
    with tempfile.TemporaryDirectory(prefix="grocery-levers-") as scratch:
        scratch = Path(scratch)
        rows = []
        for i, (name, model, tta) in enumerate(_variants(work / "train-out", scratch)):
            on_val = _score(model, val, val, scratch / f"v{i}", taxonomy, tta)
            on_held = _score(model, held, val, scratch / f"h{i}", taxonomy, tta)
            rows.append((name, on_val, on_held))
    first = Score.of(rows[0][2]["right"])
    print(f"{'answering with':44} {'val top-1':>9} {'val_* top-1':>11} {'macro':>6} {'covered':>8} "
          f"{'acc there':>9}  vs row 1 on val_*")  # fmt: skip
    for name, on_val, on_held in rows:
        m = on_held["metrics"]
        coverage = m["coverage"]
        paired = compare(Score.of(on_held["right"]), first)
        b, c = paired.candidate_only, paired.champion_only
        accuracy = "-" if coverage["accuracy"] is None else f"{coverage['accuracy']:.3f}"
        print(
            f"{name:44} {on_val['metrics']['top1_accuracy']:9.3f} {m['top1_accuracy']:11.3f} "
            f"{m['macro_category']['accuracy']:6.3f} {coverage['coverage']:8.3f} {accuracy:>9}  "
            f"{paired.difference:+.3f} (+{b}/-{c}, McNemar p={paired.p_value:.2f})"
        )


if __name__ == "__main__":
    main()
