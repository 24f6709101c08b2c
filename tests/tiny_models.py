"""Tiny real classifiers for evaluation and registry tests, made in seconds instead of trained for minutes.

Both are ResNet-18 at 32 px saved with `save_classifier`, so they load, run and log exactly like a
trained model; only how their classifier layer got its values differs:

- `constant_model`: every photo goes to one category with ~0.9999 probability (zero weights, one
  large bias), so its accuracy on a test folder is that category's share: reliably better, worse or
  equal to another constant model by choosing categories with more, fewer or as many photos;
- `fitted_model`: the classifier layer is fitted (logistic regression, a few hundred Adam steps) on
  the pooled features of the randomly initialised backbone for the given photos: near-perfect on
  those photos, much weaker on others, with confidences that vary from photo to photo.
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
    save_classifier,
)

IMAGE_SIZE = 32


def _network(labels: list[str], seed: int) -> tuple[torch.nn.Module, ModelSpec]:
    spec = ModelSpec("resnet18", list(labels), image_size=IMAGE_SIZE)
    torch.manual_seed(seed)
    return build_model(spec).eval(), spec


def constant_model(directory: Path, labels: list[str], category: str, seed: int = 0) -> Path:
    model, spec = _network(labels, seed)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(0.0)
        model.fc.bias[spec.labels.index(category)] = 12.0
    save_classifier(Path(directory), model, spec)
    return Path(directory)


def fitted_model(
    directory: Path,
    labels: list[str],
    photos: list[Path],
    categories: list[str],
    seed: int = 0,
    steps: int = 300,
) -> Path:
    model, spec = _network(labels, seed)
    transform = eval_transform(spec)
    images = torch.stack([transform(decode_image(p.read_bytes()).image) for p in photos])
    targets = torch.tensor([spec.labels.index(c) for c in categories])
    with torch.inference_mode():
        features, _ = features_and_logits(model, spec.arch, images)
    features = features.clone()
    mean, std = features.mean(0), features.std(0) + 1e-6
    standardised = (features - mean) / std
    weight = torch.zeros(spec.num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(spec.num_classes, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(standardised @ weight.T + bias, targets)
        (loss + 1e-3 * weight.square().sum()).backward()
        optimiser.step()
    with torch.no_grad():  # fold the standardisation into the layer: fc(x) = W (x - mean) / std + b
        model.fc.weight.copy_(weight / std)
        model.fc.bias.copy_(bias - (weight / std) @ mean)
    save_classifier(Path(directory), model, spec)
    return Path(directory)
