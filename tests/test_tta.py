"""Horizontal-flip test-time augmentation: chosen at evaluation, carried by the model copy and the
version tag, and applied the same way by evaluate, the promotion gate's scorer and the server.

Models are tiny real ResNet-18s at 32 px (tests/tiny_models.py) on the project's sample photos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import fitted_model

from shopvision.components.errors import StepError
from shopvision.components.evaluation.evaluate import evaluate
from shopvision.components.training.models import (
    TTA_KEY,
    FlipAveraged,
    features_and_logits,
    load_classifier,
    with_test_time_augmentation,
)
from shopvision.serving.model import PhotoClassifier


def _split(root: Path, sample_raw: Path) -> tuple[Path, list[str], list[Path], list[str]]:
    labels, photos, categories = [], [], []
    for category in sorted(p for p in sample_raw.iterdir() if p.is_dir())[:3]:
        labels.append(category.name)
        files = sorted(category.glob("*.jpg"))[:6]
        for split, chosen in (("train", files[:2]), ("val", files[2:4]), ("test", files[4:6])):
            (root / split / category.name).mkdir(parents=True)
            for photo in chosen:
                shutil.copy(photo, root / split / category.name / photo.name)
                if split == "train":
                    photos.append(photo)
                    categories.append(category.name)
    return root, labels, photos, categories


def test_flip_averaging_is_the_mean_of_both_passes_and_mirror_invariant():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    images = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        inner(images)
        wrapped = FlipAveraged(inner)
        expected = (inner(images) + inner(images.flip(-1))) / 2
        assert torch.allclose(wrapped(images), expected, atol=1e-6)
        assert torch.allclose(wrapped(images.flip(-1)), wrapped(images), atol=1e-6)
        assert not torch.allclose(inner(images), inner(images.flip(-1)))  # the flip matters to the inner


def test_evaluate_tta_flip_is_measured_and_carried_by_the_model_copy(tmp_path, sample_raw):
    data, labels, photos, categories = _split(tmp_path / "data", sample_raw)
    model_dir = fitted_model(tmp_path / "model", labels, photos, categories)
    plain = evaluate(model_dir, data, tmp_path / "plain")
    flipped = evaluate(model_dir, data, tmp_path / "flip", tta="flip")
    metrics = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert metrics["test_time_augmentation"] == "flip"
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["test_time_augmentation"] == "none"
    network, spec = load_classifier(flipped.model_dir)
    assert isinstance(network, FlipAveraged) and spec.extra[TTA_KEY] == "flip"
    assert not isinstance(load_classifier(plain.model_dir)[0], FlipAveraged)
    # Features for similar photos are of the photo as it is, wrapped or not.
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        wrapped_features, _ = features_and_logits(network, spec.arch, images)
        inner_features, _ = features_and_logits(network.inner, spec.arch, images)
    assert torch.equal(wrapped_features, inner_features)
    # --tta none on the flip copy takes the flip off again.
    evaluate(flipped.model_dir, data, tmp_path / "off", tta="none")
    assert not isinstance(load_classifier(tmp_path / "off" / "model")[0], FlipAveraged)
    with pytest.raises(StepError, match="choose from none, flip"):
        evaluate(model_dir, data, tmp_path / "bad", tta="five-crop")


def test_the_server_answers_with_the_flip_the_version_tag_names(tmp_path, sample_raw):
    data, labels, photos, categories = _split(tmp_path / "data", sample_raw)
    model_dir = fitted_model(tmp_path / "model", labels, photos, categories)
    network, spec = load_classifier(model_dir)
    plain = PhotoClassifier(model_dir, device="cpu")
    served = PhotoClassifier(model_dir, device="cpu", tta_tag="flip")
    assert plain.tta == "none" and served.tta == "flip" and "flip test-time augmentation" in served.describe()
    batch = torch.rand(2, 3, 32, 32)
    spec.extra[TTA_KEY] = "flip"
    expected = with_test_time_augmentation(network, spec)
    with torch.no_grad():
        want = torch.softmax(expected(batch), dim=1).max(dim=1).values
    got = [answer.probabilities[0] for answer in served.predict(batch)]
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="choose from none, flip"):
        PhotoClassifier(model_dir, device="cpu", tta_tag="ten-crop")
