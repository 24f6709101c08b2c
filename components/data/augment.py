"""The augment step: mirrored, rotated (cw / ccw) and grainy copies of the train photos.

Offline augmentation as the source recipe did it; training adds random crops and flips online on
top. augment writes only the photos it makes, OUT/train/<category>/<stem>.<operation>.jpg, and a
manifest that lists them (root "augmented": the manifest's own folder) beside the input's rows
carried by reference (the cleaned photos are not copied). A photo balance repeats (`copies` k) gets
one mirror and one of each rotation, repeated k times too (the same pixels, so one file), and its own
grain per copy (`x.grain.jpg`, `x.copy1.grain.jpg`, ...: noise seeded by that name), so class
proportions set by balance are kept. Everything is seeded by (seed, output name): reruns are
byte-identical, and so are the files against the folder layout that augment wrote before manifests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import StepError
from ..progress import Progress
from .dataset import prepare_output
from .images import ImageDecodeError, decode_image, encode_jpeg
from .manifest import (
    HASH_PREFIX,
    Entry,
    carried_roots,
    copy_name,
    has_manifest,
    input_manifest,
    resolve,
    root_folders,
    write_manifest,
)
from .naming import atomic_write_bytes, atomic_write_text

MANIFEST = "augment.json"
AUGMENTED_ROOT = "augmented"  # the root name of the photos augment makes: its own output folder
OPERATIONS = ("mirror", "rot_cw", "rot_ccw", "grain")
DETERMINISTIC = {"mirror", "rot_cw", "rot_ccw"}  # same source pixels → same output pixels


@dataclass
class AugmentResult:
    operations: list[str]
    angle: float
    grain: float
    seed: int
    categories: dict[str, dict] = field(default_factory=dict)  # category -> photos, augmented, created

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


def _augment_photo(job: tuple[str, str, list[tuple[str, str]], float, float, int]) -> None:
    """Decode one source photo and write each (operation, output name) of the job beside the others."""
    source, category_out, outputs, angle, grain, seed = job
    source_path = Path(source)
    try:
        image = decode_image(source_path.read_bytes()).image
    except (ImageDecodeError, OSError) as exc:
        raise StepError(
            f"cannot augment {source}: {exc} (run 'shopvision clean' on raw photos first)"
        ) from None
    for operation, name in outputs:
        result = apply_operation(image, operation, angle, grain, f"{seed}\0{Path(category_out).name}/{name}")
        atomic_write_bytes(Path(category_out) / name, encode_jpeg(result))


def photo_outputs(name: str, copies: int, operations: list[str]) -> list[tuple[str, str, int]]:
    """(operation, output name, copies) of a photo that balance repeats COPIES times: one file per
    deterministic operation standing for every copy, one grain per copy (the names the copies of the
    folder layout had, so the noise is the same)."""
    outputs = []
    for operation in operations:
        if operation in DETERMINISTIC:
            outputs.append((operation, augmented_name(name, operation), copies))
        else:
            names = [name] + [copy_name(name, k) for k in range(1, copies)]
            outputs += [(operation, augmented_name(n, operation), 1) for n in names]
    return outputs


def augment(
    balanced_dir: Path,
    out: Path,
    *,
    operations: tuple[str, ...] | list[str] = OPERATIONS,
    angle: float = 15.0,
    grain: float = 0.06,
    seed: int = 0,
    workers: int | None = None,
    roots: Mapping[str, Path | str] | None = None,
) -> AugmentResult:
    """Write the new photos to OUT/train/<category>/ and OUT/manifest.jsonl.gz (the input's rows by
    reference, plus the new photos). BALANCED_DIR is balance's or split's output, or a folder layout;
    `roots` says where the photos its manifest references lie (default: where they were written)."""
    balanced_dir, out = Path(balanced_dir), Path(out)
    operations = list(dict.fromkeys(operations))
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown:
        raise StepError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(OPERATIONS)}")
    if not 0 < angle <= 45:
        raise StepError(f"--angle must be in (0, 45] degrees, got {angle}")
    if not 0 < grain <= 1:
        raise StepError(f"--grain must be in (0, 1], got {grain}")
    missing = f"no train photos in {balanced_dir}/train/<category>/: run 'shopvision split' first"
    if not has_manifest(balanced_dir) and not (balanced_dir / "train").is_dir():
        raise StepError(missing)
    source = input_manifest(balanced_dir)
    if AUGMENTED_ROOT in {e.root for e in source.entries}:
        raise StepError(f"{balanced_dir} is augment's output already: augment balance's or split's output")
    train = sorted((e for e in source.entries if e.split == "train"), key=lambda e: (e.category, e.file))
    if not train:
        raise StepError(missing)
    folders = root_folders(source, roots)
    prepare_output(out, MANIFEST, "augment")
    result = AugmentResult(operations, angle, grain, seed)

    jobs, made = [], []
    for entry in train:
        category_out = out / "train" / entry.category
        outputs = photo_outputs(Path(entry.path).name, entry.copies, operations)
        if outputs:
            jobs.append(
                (
                    str(resolve(entry, folders)),
                    str(category_out),
                    [(op, n) for op, n, _ in outputs],
                    angle,
                    grain,
                    seed,
                )
            )
        made += [
            Entry(
                AUGMENTED_ROOT,
                f"train/{entry.category}/{n}",
                entry.category,
                "train",
                entry.group,
                k,
                entry.product_id,
            )
            for _, n, k in outputs
        ]
        row = result.categories.setdefault(entry.category, {"photos": 0, "augmented": 0, "created": 0})
        row["photos"] += entry.copies
        row["augmented"] += entry.copies * len(operations)
        row["created"] += len(outputs)

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
    carried = [replace(e, sha256=e.sha256[:HASH_PREFIX]) for e in source.entries]
    roots_here = carried_roots(source, {name: folders[name] for name in folders})
    used = {e.root for e in carried}
    write_manifest(
        out,
        "augment",
        carried + made,
        {**{n: f for n, f in roots_here.items() if n in used}, AUGMENTED_ROOT: out},
        own_root=AUGMENTED_ROOT,
    )
    atomic_write_text(out / MANIFEST, result.to_json())
    return result


def summary(result: AugmentResult) -> str:
    photos = sum(r["photos"] for r in result.categories.values())
    made = sum(r["augmented"] for r in result.categories.values())
    return (
        f"augment: {photos} train photos + {made} augmented ({', '.join(result.operations)}) "
        f"in {len(result.categories)} categories"
    )
