"""The fine-tuning levers beyond crop-and-flip: online augmentation policy, random erasing,
mixup/cutmix, a warm-up then cosine schedule, a learning rate for the new head apart from the
backbone's, an exponential moving average of the weights, and low-resolution epochs before the
final size.

Why they live together: each is a knob of one recipe (README's accuracy section measures them on
the grocery photos), every one defaults to off, so a run without them trains exactly as before, and
both data paths (`--decode cpu|gpu`) call the same `augment_crop` so their photos stay alike.

Randomness stays keyed: the policy and erasing of photo `index` in `epoch` draw from a generator
seeded by (seed, epoch, index), like the crop box, so any number of loader workers gives the same
photos; mixup/cutmix draw from the training process's own generator.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import StepError

POLICIES = ("crop-flip", "trivialaugment", "randaugment")


@dataclass(frozen=True)
class Augmentation:
    """What a training photo goes through after its crop box and flip."""

    policy: str = "crop-flip"  # crop-flip only, or TrivialAugmentWide / RandAugment on the crop
    erasing: float = 0.0  # probability of one random-erasing box on the normalised photo
    image_size: int = 224  # the final training size (the model spec's)
    low_res_size: int | None = None  # size of the first `low_res_epochs` epochs
    low_res_epochs: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise StepError(f"--augment {self.policy!r}: choose from {', '.join(POLICIES)}")
        if not 0 <= self.erasing <= 1:
            raise StepError(f"--random-erasing {self.erasing}: a probability in [0, 1]")
        if self.low_res_epochs and not self.low_res_size:
            raise StepError("--low-res-epochs needs --low-res-size")

    def size_for(self, epoch: int) -> int:
        """The training crop size in `epoch`: low resolution first, then the final size."""
        if self.low_res_size and epoch < self.low_res_epochs:
            return self.low_res_size
        return self.image_size


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """0–255 floats (CHW or NCHW) → (x/255 − mean)/std per channel. `mean`/`std` may already be
    tensors on the images' device: building them from Python numbers copies to the GPU, and a copy
    from pageable memory waits for the GPU, so the bytes path builds them once."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images / 255 - mean) / std


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    digest = hashlib.blake2b(f"recipe/{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _policy_transform(policy: str):
    from torchvision.transforms import v2

    return {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}[policy]()


def augment_crop(
    crop: torch.Tensor, aug: Augmentation, seed: int, epoch: int, index: int, mean, std
) -> torch.Tensor:
    """A cropped float photo in 0–255 (CHW) → the normalised training tensor, with the policy
    applied before normalising and random erasing after, both drawn from (seed, epoch, index)."""
    if aug.policy == "crop-flip" and not aug.erasing:
        return normalise(crop, mean, std)
    generator = _generator(seed, epoch, index)
    if aug.policy != "crop-flip":
        # torchvision's v2 policies draw from the global generator: fork it so the draw is keyed
        # and the caller's stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            as_bytes = crop.round().clamp(0, 255).to(torch.uint8)
            crop = _policy_transform(aug.policy)(as_bytes.cpu()).to(crop.device, torch.float32)
    image = normalise(crop, mean, std)
    if aug.erasing and float(torch.rand((), generator=generator)) < aug.erasing:
        image = _erase(image, generator)
    return image


def _erase(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandomErasing's box (scale 0.02–0.33, ratio 0.3–3.3), filled with noise."""
    _, height, width = image.shape
    for _ in range(10):
        area = height * width * float(torch.empty(()).uniform_(0.02, 0.33, generator=generator))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(3.3), generator=generator)))
        h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if h < height and w < width:
            top = int(torch.randint(height - h + 1, (1,), generator=generator))
            left = int(torch.randint(width - w + 1, (1,), generator=generator))
            image = image.clone()
            noise = torch.randn((image.shape[0], h, w), generator=generator).to(image.device, image.dtype)
            image[:, top : top + h, left : left + w] = noise
            return image
    return image


class BatchMixer:
    """Mixup and/or cutmix on a training batch (one of them per batch when both are on): the
    targets become class probabilities, which `nn.CrossEntropyLoss` takes as they are."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, seed: int) -> None:
        if mixup < 0 or cutmix < 0:
            raise StepError("--mixup and --cutmix are Beta-distribution alphas: 0 (off) or more")
        from torchvision.transforms import v2

        choices = []
        if mixup:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.transform = v2.RandomChoice(choices) if len(choices) > 1 else (choices or [None])[0]
        self.seed = seed

    @property
    def active(self) -> bool:
        return self.transform is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step_key: int):
        if self.transform is None:
            return images, targets
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + step_key)
            mixed, soft = self.transform(images.float(), targets)
        return mixed.to(images.dtype), soft


def hard_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices for accuracy counting, from indices or (mixed) class probabilities."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def warmup_cosine(epochs: int, warmup_epochs: int):
    """LR multiplier per epoch: linear warm-up over `warmup_epochs`, then cosine to zero over the
    rest (with no warm-up, exactly CosineAnnealingLR(T_max=epochs))."""
    if warmup_epochs < 0 or (epochs and warmup_epochs >= epochs):
        raise StepError(f"--warmup-epochs {warmup_epochs}: must be at least 0 and below --epochs {epochs}")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        span = max(epochs - warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))

    return factor


def parameter_groups(model: nn.Module, head: str, lr: float, head_lr_scale: float) -> list[dict]:
    """The optimiser's groups: the new head at `lr * head_lr_scale`, the (pretrained) rest at `lr`."""
    if head_lr_scale <= 0:
        raise StepError(f"--head-lr-scale {head_lr_scale}: must be above 0")
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
    head_params = [p for n, p in named if n.startswith(head)]
    body = [p for n, p in named if not n.startswith(head)]
    groups = [{"params": body, "lr": lr}] if body else []
    return groups + [{"params": head_params, "lr": lr * head_lr_scale}]


def ema_model(model: nn.Module, decay: float):
    """An exponential moving average of the weights and buffers (None when `decay` is 0): what is
    validated and kept as model_best, since it generalises better than the last step's weights."""
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise StepError(f"--ema {decay}: a decay in (0, 1), e.g. 0.999, or 0 for off")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
