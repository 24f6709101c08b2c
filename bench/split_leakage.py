"""How much a split flatters a model: a linear probe scored under each split against held-out photos.

On the grocery set the source's `val_*` photos were taken apart from its `train_*` photos, so a model
trained on `train_*` and scored on `val_*` shows what a catalogue's new photos will get. A split made
without those names should score about the same; the more it scores above, the more test photos had
a look-alike in train. Fine-tuning a network per setting costs half an hour here, so the probe is a
logistic regression on frozen ImageNet EfficientNet-Lite0 features (the embedding split itself uses):
a stand-in that reacts to leaked sessions the same way, measured for every setting in one run.

    .venv/bin/python bench/split_leakage.py [CLEANED] [--similarities 0.9,0.85,0.82,0.8] [--seeds 3]

CLEANED is the grocery set after `shopvision clean` (default: it cleans
../shared/datasets/grocery-store/raw into a temporary folder). Prints one row per split with the
probe's test accuracy (mean ± sd over seeds) and its gap to the held-out protocol.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(max_iter=1000, C=0.05).fit(scaler.transform(features[train]), labels[train])
    return float((model.predict(scaler.transform(features[test])) == labels[test]).mean())


def main() -> None:
    from shopvision.components.data.lookalike import embed_photos, links_within_categories
    from shopvision.components.data.split import cleaned_photos, group_photos, split_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cleaned", nargs="?", type=Path)
    parser.add_argument("--similarities", default="0.9,0.85,0.82,0.8")
    parser.add_argument("--max-group-share", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    cleaned = args.cleaned
    if cleaned is None:
        cleaned = Path(tempfile.mkdtemp(prefix="grocery-clean-")) / "clean"
        raw = ROOT.parent / "shared" / "datasets" / "grocery-store" / "raw"
        subprocess.run([str(ROOT / ".venv/bin/shopvision"), "clean", str(raw), str(cleaned)], check=True)
    photos = cleaned_photos(cleaned)
    categories = np.array([p.category for p in photos])
    names = [p.file.split("/", 1)[1] for p in photos]
    features = embed_photos([cleaned / p.file for p in photos])
    rows = []
    train = np.array([i for i, n in enumerate(names) if n.startswith("train_")])
    held = np.array([i for i, n in enumerate(names) if n.startswith("val_")])
    reference = _probe(features, categories, train, held)
    rows.append(("held-out val_* photos (train on train_*)", [reference], len(held)))

    def scored(links: list) -> tuple[list[float], int]:
        accuracies, sizes = [], []
        for seed in range(args.seeds):
            keys, _ = group_photos(photos, links, seed=seed, max_group_share=args.max_group_share)
            where = np.array([split_of(seed, *keys[i].split("/", 1), 0.1, 0.1) for i in range(len(photos))])
            accuracies.append(
                _probe(features, categories, np.nonzero(where == "train")[0], np.nonzero(where == "test")[0])
            )
            sizes.append(int((where == "test").sum()))
        return accuracies, int(np.mean(sizes))

    rows.append(("by product id only (here: every photo alone)", *scored([])))
    for similarity in (float(s) for s in args.similarities.split(",")):
        links = links_within_categories(features, list(categories), similarity)
        _, refused = group_photos(photos, links, seed=0, max_group_share=args.max_group_share)
        name = f"look-alike groups, similarity {similarity:g} ({sum(refused.values())} links refused)"
        rows.append((name, *scored(links)))
    print(f"\n{'split':<62} {'test photos':>11} {'probe top-1':>14} {'gap':>7}")
    for name, accuracies, count in rows:
        mean = float(np.mean(accuracies))
        spread = f"±{np.std(accuracies):.3f}" if len(accuracies) > 1 else ""
        print(f"{name:<62} {count:>11} {mean:>8.3f}{spread:>6} {100 * (mean - reference):>+6.1f}")


if __name__ == "__main__":
    main()
