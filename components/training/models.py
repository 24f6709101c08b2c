"""Model building, the JSON model spec, preprocessing and safe weight loading.

A trained model is two files: `model_spec.json` (architecture, labels, preprocessing) and
`weights.pt` (a plain state dict). Loading rebuilds the network from the spec and reads the weights
with `torch.load(weights_only=True)`, so opening a model never unpickles arbitrary objects. Training,
evaluation, the MLflow pyfunc and the server all go through `load_classifier`, so a photo is
preprocessed the same way everywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import StepError
from .architectures import ARCHITECTURES

SPEC_NAME = "model_spec.json"
WEIGHTS_NAME = "weights.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    arch: str
    labels: list[str]
    image_size: int = 224
    resize_size: int | None = None  # shorter side before the centre crop; default image_size / 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict = field(default_factory=dict)  # e.g. the confidence threshold chosen at evaluation

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise StepError(f"unknown architecture {self.arch!r}; choose from {', '.join(ARCHITECTURES)}")
        if not self.labels:
            raise StepError("a model needs at least one category label")
        if self.resize_size is None:
            self.resize_size = int(round(self.image_size / 0.875))
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))


def build_model(spec: ModelSpec) -> nn.Module:
    """The network for a spec, randomly initialised (weights come from `load_state`)."""
    if spec.arch.startswith("resnet"):
        import torchvision

        return getattr(torchvision.models, spec.arch)(weights=None, num_classes=spec.num_classes)
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(spec.arch.replace("_", "-"), num_classes=spec.num_classes)


def head_prefix(arch: str) -> str:
    """The parameter-name prefix of the classifier layer, replaced for our categories."""
    return "fc." if arch.startswith("resnet") else "_fc."


TTA_KEY = "test_time_augmentation"  # spec.extra: "flip", or absent for one pass
TTA_CHOICES = ("none", "flip")


class FlipAveraged(nn.Module):
    """Horizontal-flip test-time augmentation: the logits of the photo and of its mirror image,
    averaged. One batch of twice the photos, so the extra pass costs one forward of N more photos;
    an ONNX export of this module carries the flip, so every runtime serves what was evaluated."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.inner(torch.cat([images, images.flip(-1)]))
        plain, mirrored = logits.chunk(2)
        return (plain + mirrored) / 2


def with_test_time_augmentation(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The network as the spec says it is served: wrapped in FlipAveraged when its evaluation chose
    flip test-time augmentation (spec.extra[TTA_KEY]), else as it is."""
    inner = model.inner if isinstance(model, FlipAveraged) else model
    choice = spec.extra.get(TTA_KEY) or "none"
    if choice not in TTA_CHOICES:
        raise StepError(f"model spec: unknown test-time augmentation {choice!r}; choose from {TTA_CHOICES}")
    return FlipAveraged(inner) if choice == "flip" else inner


def features_and_logits(
    model: nn.Module, arch: str, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled features (the layer before the classifier) and the logits, in one forward pass
    (without test-time augmentation: similar-photo features are of the photo as it is)."""
    if isinstance(model, FlipAveraged):
        model = model.inner
    if arch.startswith("resnet"):
        x = model.conv1(images)
        x = model.maxpool(model.relu(model.bn1(x)))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        features = torch.flatten(model.avgpool(x), 1)
        return features, model.fc(features)
    features = torch.flatten(model._avg_pooling(model.extract_features(images)), 1)
    return features, model._fc(model._dropout(features))


def load_backbone(model: nn.Module, arch: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Load pretrained weights except the classifier head; returns the names left at their init (the
    head's). Every backbone tensor must be there with its shape, or it is a clear error."""
    head = head_prefix(arch)
    own = model.state_dict()
    usable = {
        k: v for k, v in state.items() if not k.startswith(head) and k in own and own[k].shape == v.shape
    }
    if not usable:
        raise StepError(
            f"the pretrained weights do not fit {arch}: no parameter name and shape matches "
            f"(first names: {', '.join(list(state)[:3])})"
        )
    left = sorted(k for k in own if k not in usable)
    backbone_left = [k for k in left if not k.startswith(head)]
    unused = [k for k in state if not k.startswith(head) and k not in usable]
    if backbone_left or unused:  # a partial load would train a half-random backbone without a word
        raise StepError(
            f"the pretrained weights do not fit {arch}: {len(backbone_left)} backbone tensors are missing "
            f"or of another shape (first: {', '.join(backbone_left[:3]) or '-'}), {len(unused)} are not "
            f"{arch}'s (first: {', '.join(unused[:3]) or '-'}); are they another architecture's?"
        )
    model.load_state_dict(usable, strict=False)
    return left


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, refusing pickled objects; accepts a bare state dict or a checkpoint."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad or unsafe file
        raise StepError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise StepError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    # DDP and torch.compile wrap names; strip their prefixes so any of our checkpoints loads.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in loaded.items()}


def save_classifier(directory: Path, model: nn.Module, spec: ModelSpec) -> None:
    from ..data.naming import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k.removeprefix("module.").removeprefix("_orig_mod."): v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    tmp = directory / f".{WEIGHTS_NAME}.tmp"
    torch.save(state, tmp)
    tmp.replace(directory / WEIGHTS_NAME)
    atomic_write_text(directory / SPEC_NAME, spec.to_json())


def load_classifier(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a saved classifier from its spec and weights (no arbitrary unpickling), in eval mode,
    with the test-time augmentation its evaluation chose."""
    directory = Path(directory)
    if not (directory / SPEC_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise StepError(f"{directory} is not a saved model: it needs {SPEC_NAME} and {WEIGHTS_NAME}")
    spec = ModelSpec.from_json((directory / SPEC_NAME).read_text())
    model = build_model(spec)
    model.load_state_dict(read_state_dict(directory / WEIGHTS_NAME))
    return with_test_time_augmentation(model, spec).to(device).eval(), spec


def eval_transform(spec: ModelSpec):
    """Resize the shorter side, centre-crop, normalise: the torchvision classification recipe."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(spec.resize_size, antialias=True),
            v2.CenterCrop(spec.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )
