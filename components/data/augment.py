"""The augment step: mirrored, rotated (cw / ccw) and grainy copies of the train photos.

Offline augmentation as the source recipe did it; training adds random crops and flips online on
top. Outputs are named <stem>.<operation>.jpg after their source. A balance copy (x.copy2.jpg) gets
its own grain (seeded by its own name) but its mirror and rotations would be the same pixels as its
source's, so they are hard links to those: class proportions set by balance are kept, bytes are not
duplicated. Everything is seeded by (seed, output name): reruns are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import StepError
from ..progress import Progress
from .balance import source_of_copy
from .dataset import carry_split_manifest, category_photos, link_split, prepare_output
from .images import ImageDecodeError, decode_image, encode_jpeg
from .naming import atomic_write_bytes, atomic_write_text, link_or_copy

MANIFEST = "augment.json"
OPERATIONS = ("mirror", "rot_cw", "rot_ccw", "grain")
DETERMINISTIC = {"mirror", "rot_cw", "rot_ccw"}  # same source pixels → same output pixels


@dataclass
class AugmentResult:
    operations: list[str]
    angle: float
    grain: float
    seed: int
    categories: dict[str, dict] = field(default_factory=dict)  # category -> photos, created, linked

    def to_json(self) -> str:
        body = {
            "step": "augment",
            "operations": self.operations,
            "angle": self.angle,
            "grain": self.grain,
            "seed": self.seed,
            "categories": self.categories,
        }
        return json.dumps(body, indent=1) + "\n"


def rotate_edge_filled(image: Image.Image, degrees: float) -> Image.Image:
    """Rotate counter-clockwise by `degrees` about the centre, same size; corners repeat the edge.

    Black corners would teach the model that black wedges mean something; replicating the border
    pixels before rotating fills them with plausible background instead.
    """
    width, height = image.size
    pad = max(width, height) // 2 + 2
    padded = np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    rotated = Image.fromarray(padded).rotate(degrees, resample=Image.Resampling.BICUBIC)
    return rotated.crop((pad, pad, pad + width, pad + height))


def add_grain(image: Image.Image, strength: float, seed_text: str) -> Image.Image:
    """Gaussian luminance grain (σ = strength × 255), seeded by text so reruns match."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, strength * 255.0, pixels.shape[:2])[..., None]
    return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8), "RGB")


def apply_operation(
    image: Image.Image, operation: str, angle: float, grain: float, seed_text: str
) -> Image.Image:
    if operation == "mirror":
        return ImageOps.mirror(image)
    if operation == "rot_cw":
        return rotate_edge_filled(image, -angle)
    if operation == "rot_ccw":
        return rotate_edge_filled(image, angle)
    if operation == "grain":
        return add_grain(image, grain, seed_text)
    raise StepError(f"unknown augmentation {operation!r}; choose from {', '.join(OPERATIONS)}")


def augmented_name(source_name: str, operation: str) -> str:
    stem, _, suffix = source_name.rpartition(".")
    return f"{stem}.{operation}.{suffix}"


def _augment_photo(job: tuple[str, str, list[str], float, float, int]) -> None:
    source, category_out, operations, angle, grain, seed = job
    source_path = Path(source)
    try:
        image = decode_image(source_path.read_bytes()).image
    except (ImageDecodeError, OSError) as exc:
        raise StepError(
            f"cannot augment {source}: {exc} (run 'shopvision clean' on raw photos first)"
        ) from None
    for operation in operations:
        name = augmented_name(source_path.name, operation)
        result = apply_operation(image, operation, angle, grain, f"{seed}\0{Path(category_out).name}/{name}")
        atomic_write_bytes(Path(category_out) / name, encode_jpeg(result))


def augment(
    balanced_dir: Path,
    out: Path,
    *,
    operations: tuple[str, ...] | list[str] = OPERATIONS,
    angle: float = 15.0,
    grain: float = 0.06,
    seed: int = 0,
    workers: int | None = None,
) -> AugmentResult:
    balanced_dir, out = Path(balanced_dir), Path(out)
    operations = list(dict.fromkeys(operations))
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown:
        raise StepError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(OPERATIONS)}")
    if not 0 < angle <= 45:
        raise StepError(f"--angle must be in (0, 45] degrees, got {angle}")
    if not 0 < grain <= 1:
        raise StepError(f"--grain must be in (0, 1], got {grain}")
    train = category_photos(balanced_dir / "train") if (balanced_dir / "train").is_dir() else {}
    if not any(train.values()):
        raise StepError(f"no train photos in {balanced_dir}/train/<category>/: run 'shopvision split' first")
    prepare_output(out, MANIFEST, "augment")
    result = AugmentResult(operations, angle, grain, seed)

    jobs, links = [], []
    for category, files in train.items():
        category_out = out / "train" / category
        names = {p.name for p in files}
        for path in files:
            link_or_copy(path, category_out / path.name)
            original = source_of_copy(path.name)
            if original in names:
                # A balance copy: link the deterministic outputs of its source, make its own grain.
                for op in operations:
                    if op in DETERMINISTIC:
                        links.append(
                            (
                                category_out / augmented_name(original, op),
                                category_out / augmented_name(path.name, op),
                            )
                        )
                own = [op for op in operations if op not in DETERMINISTIC]
            else:
                own = operations
            if own:
                jobs.append((str(path), str(category_out), own, angle, grain, seed))
        result.categories[category] = {"photos": len(files), "augmented": len(files) * len(operations)}

    progress = Progress(len(jobs), "augment")
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        for job in jobs:
            _augment_photo(job)
            progress.advance()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_augment_photo, jobs, chunksize=max(1, math.ceil(len(jobs) / (workers * 8)))):
                progress.advance()
    progress.close()
    for source, target in links:
        link_or_copy(source, target)
    for split_name in ("val", "test"):
        link_split(balanced_dir, out, split_name)
    carry_split_manifest(Path(balanced_dir), out)
    atomic_write_text(out / MANIFEST, result.to_json())
    return result


def summary(result: AugmentResult) -> str:
    photos = sum(r["photos"] for r in result.categories.values())
    made = sum(r["augmented"] for r in result.categories.values())
    return (
        f"augment: {photos} train photos + {made} augmented ({', '.join(result.operations)}) "
        f"in {len(result.categories)} categories"
    )
