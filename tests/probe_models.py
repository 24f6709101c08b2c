"""A small real classifier that generalises, for the drift and shadow tests: EfficientNet-Lite0 with its
ImageNet weights (shipped offline) at 64 px and a linear head fitted on half the sample photos.

tiny_models' random-backbone ResNets memorise their photos and answer others almost at random, so
their answers on unseen photos barely depend on the photo: drift would be untestable on them. This
probe gets ~85% of unseen sample photos right, so a stream of photos of two categories, or of
heavily blurred photos, changes its answers the way it would change a trained model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shopvision.components.data.images import decode_image
from shopvision.components.training.models import (
    ModelSpec,
    build_model,
    eval_transform,
    features_and_logits,
    load_backbone,
    save_classifier,
)
from shopvision.components.training.weights import fetch_pretrained

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "raw"
LABELS = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())


def sample_photos(category: str) -> list[Path]:
    return sorted((SAMPLE / category).glob("*.jpg"))


def training_photos() -> list[Path]:
    """Every other photo of each category (the probe's head is fitted on these)."""
    return [p for c in LABELS for p in sample_photos(c)[0::2]]


def held_out(offset: int) -> list[Path]:
    """Unseen photos: every fourth photo of each category from `offset` (1 or 3), so the two halves
    keep the categories' proportions."""
    return [p for c in LABELS for p in sample_photos(c)[offset::4]]


def probe_model(directory: Path, *, image_size: int = 64, steps: int = 150) -> Path:
    photos = training_photos()
    categories = [p.parent.name for p in photos]
    return imagenet_head_model(directory, LABELS, photos, categories, image_size=image_size, steps=steps)


def imagenet_head_model(
    directory: Path,
    labels: list[str],
    photos: list[Path],
    categories: list[str],
    *,
    image_size: int,
    steps: int,
    lr: float = 0.01,
    fit: int | None = None,
) -> Path:
    """EfficientNet-Lite0 with its ImageNet backbone and a linear head fitted to `photos` (labelled
    `categories`) by L2-regularised logistic regression on its pooled features."""
    spec = ModelSpec("efficientnet_lite0", list(labels), image_size=image_size)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    load_backbone(model, spec.arch, fetch_pretrained("imagenet", spec.arch))
    transform = eval_transform(spec)
    decode = {} if fit is None else {"fit": fit}
    images = torch.stack([transform(decode_image(p.read_bytes(), **decode).image) for p in photos])
    with torch.inference_mode():
        features, _ = features_and_logits(model, spec.arch, images)
    features = features.clone()
    targets = torch.tensor([spec.labels.index(c) for c in categories])
    weight = torch.zeros(spec.num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(spec.num_classes, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, targets)
        (loss + 1e-3 * weight.square().sum()).backward()
        optimiser.step()
    with torch.no_grad():
        model._fc.weight.copy_(weight)
        model._fc.bias.copy_(bias)
    save_classifier(Path(directory), model, spec)
    return Path(directory)


def resized_copy(source: Path, directory: Path, image_size: int, **spec_changes) -> Path:
    """The same weights under another spec (a larger input size: the same model, slower)."""
    from shopvision.components.training.models import SPEC_NAME, WEIGHTS_NAME

    spec = ModelSpec.from_json((source / SPEC_NAME).read_text())
    changed = ModelSpec(**{**spec.__dict__, "image_size": image_size, "resize_size": None, **spec_changes})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_NAME).write_bytes((source / WEIGHTS_NAME).read_bytes())
    (directory / SPEC_NAME).write_text(changed.to_json())
    return directory


def cached_probe_model(tmp_path_factory) -> Path:
    """One probe per test session (fitting it takes ~20 s on 2 cores), shared by the modules using it."""
    directory = tmp_path_factory.getbasetemp() / "probe-model"
    if not (directory / "weights.pt").is_file():
        probe_model(directory)
    return directory
