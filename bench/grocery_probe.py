"""Which ImageNet backbone and input size to fine-tune on the grocery photos, by a linear probe.

    .venv/bin/python bench/grocery_probe.py CLEANED [--backbones efficientnet_lite0:160,...]
        [--features DIR] [--seeds 3]

A fine-tune costs 40-60 minutes here; a logistic regression on frozen pooled features costs under a
minute once the features are computed (one forward pass per photo), so every backbone and size is probed in
one run. Per backbone the probe is trained on the `train_*` photos less a validation share (15% of
each category, seeded), and the same probe is scored on that validation share (what a choice may look
at) and on the held-out `val_*` photos (reported, never chosen on).

It also prints why no validation share of `train_*` can stand in for `val_*`: the mean cosine
similarity of two `train_*` photos of one category by the distance of their file numbers (a shooting
order would make near numbers more alike) and the probe on a block of the highest-numbered photos.

CLEANED is the grocery set after `shopvision clean ../shared/datasets/grocery-store/raw CLEANED`.
--features DIR keeps the features as .npy files, so a second run probes without the forward passes
(its "features s" column then reads nan).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _features(files: list[Path], arch: str, size: int, cache: Path | None) -> tuple[np.ndarray, float]:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from components.data.lookalike import _load
    from components.training.weights import imagenet_weights_file

    stored = cache / f"{arch}_{size}.npy" if cache else None
    if stored and stored.exists():
        return np.load(stored), float("nan")  # computed by an earlier run
    model = EfficientNet.from_name(arch.replace("_", "-"), num_classes=1000)
    model.load_state_dict(torch.load(imagenet_weights_file(arch), map_location="cpu", weights_only=True))
    model.eval()
    started, rows = time.perf_counter(), []
    with torch.inference_mode():
        for start in range(0, len(files), 32):
            batch = torch.stack([_load(p, size) for p in files[start : start + 32]])
            rows.append(torch.flatten(model._avg_pooling(model.extract_features(batch)), 1).numpy())
    features = np.concatenate(rows)
    if stored:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.save(stored, features)
    return features, time.perf_counter() - started


def _probe(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, tests: list[np.ndarray]
) -> list[float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(max_iter=2000, C=0.05).fit(scaler.transform(features[train]), labels[train])
    return [float((model.predict(scaler.transform(features[t])) == labels[t]).mean()) for t in tests]


def _share(members: dict[str, np.ndarray], fraction: float, pick) -> np.ndarray:
    """One index array: `pick(indices, k)` of each category's train_* photos, k = fraction of them."""
    return np.concatenate([pick(idx, max(1, round(fraction * len(idx)))) for idx in members.values()])


def _backbones(text: str) -> list[tuple[str, int]]:
    """'efficientnet_lite0:160,...' → [(arch, size), ...]; argparse turns a ValueError into one line."""
    from components.training.architectures import EFFICIENTNET_LITES

    pairs = []
    for item in text.split(","):
        arch, _, size = item.strip().partition(":")
        if arch not in EFFICIENTNET_LITES or not size.isdigit() or int(size) < 32:
            raise ValueError(item)
        pairs.append((arch, int(size)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cleaned", type=Path, help="the grocery set after `shopvision clean`")
    parser.add_argument(
        "--backbones", type=_backbones, default="efficientnet_lite0:160,efficientnet_lite0:224,"
        "efficientnet_lite1:224,efficientnet_lite2:224",
        help="ARCH:SIZE,... with ARCH an efficientnet_lite<0-2> and SIZE ≥ 32 (a 224-px clean allows up to 224)"
    )  # fmt: skip
    parser.add_argument("--features", type=Path, help="folder that keeps the features between runs")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    files = sorted(args.cleaned.glob("*/*.jpg"))
    train = np.array([p.name.startswith("train_") for p in files], dtype=bool)
    held = np.nonzero([p.name.startswith("val_") for p in files])[0]
    if not train.any() or not len(held):
        parser.error(
            f"{args.cleaned}: no CATEGORY/train_*.jpg and CATEGORY/val_*.jpg photos (clean's output of the grocery set)"
        )
    labels = np.array([p.parent.name for p in files])
    numbers = np.array([int(m.group(1)) if (m := re.search(r"_(\d+)\.jpg$", p.name)) else -1 for p in files])
    # Each category's train_* photos in file-number order (the block probe takes the last ones).
    members = {}
    for category in np.unique(labels[train]):
        idx = np.nonzero(train & (labels == category))[0]
        members[category] = idx[np.argsort(numbers[idx], kind="stable")]

    print(f"{'backbone':26} {'features s':>10} {'validation':>11} {'val_*':>7} {'gap':>6}")
    first = None
    for arch, size in args.backbones:
        features, seconds = _features(files, arch, size, args.features)
        first = first if first is not None else features
        scores = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            val = _share(members, 0.15, lambda idx, k, rng=rng: rng.choice(idx, k, replace=False))
            rest = np.setdiff1d(np.nonzero(train)[0], val)
            scores.append(_probe(features, labels, rest, [val, held]))
        (v, h), (vs, hs) = np.mean(scores, axis=0), np.std(scores, axis=0)
        print(f"{arch + '@' + str(size):26} {seconds:10.0f} {v:7.3f}±{vs:.3f} {h:.3f}±{hs:.3f} {v - h:+.3f}")

    normed = first / np.linalg.norm(first, axis=1, keepdims=True)
    by_distance = {d: [] for d in (1, 2, 5, 10, 20)}
    for idx in members.values():
        similarity = normed[idx] @ normed[idx].T
        for d, values in by_distance.items():
            values.extend(np.diag(similarity, d))
    print("train_* cosine by file-number distance (first backbone): "
          + ", ".join(f"{d}: {np.mean(v):.3f}" for d, v in by_distance.items() if v))  # fmt: skip
    block = _share(members, 0.15, lambda idx, k: idx[-k:])
    (score,) = _probe(first, labels, np.setdiff1d(np.nonzero(train)[0], block), [block])
    print(f"probe on the highest-numbered 15% of train_* (first backbone): {score:.3f}")


if __name__ == "__main__":
    main()
