"""Similar catalogue photos for an uploaded one: the embedding index and the model that built it.

Loaded once at start from `--similar-index DIR` (made by `shopvision features`). The query is embedded
by the index's own copy of the model (INDEX/model/), never the served champion: an index only means
something next to the network that made it, so a hot swap of the classifier leaves this alone.
Embedding runs in fp32 through `features.embed_images` (no batch-norm folding, no autocast), the code
`features` itself uses, so a catalogue photo uploaded here gets the vector of its index row.

Like `model.py`, this knows photos, vectors and catalogue records, nothing of HTTP. Search is exact
(`features.search`) on the CPU over the memory-mapped embeddings: on a GPU `search` would copy the whole
index to the device for every query, so only the embedding runs there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shopvision.components.data.images import DEFAULT_MAX_PIXELS, decode_image
from shopvision.components.similarity.features import (
    embed_images,
    load_index,
    load_index_model,
    neighbours_of,
    search,
)

from .model import check_aspect_ratio, pick_device
from .settings import DEFAULT_MAX_ASPECT_RATIO

log = logging.getLogger("shopvision.serving")


@dataclass(frozen=True)
class SimilarPhoto:
    """One catalogue photo near the query."""

    rank: int  # 1 = most similar
    similarity: float  # cosine, in [-1, 1]
    category: str
    product_id: str
    path: str  # as in the index's index.csv: relative to the catalogue root it was built from


@dataclass(frozen=True)
class SimilarAnswer:
    neighbours: tuple[SimilarPhoto, ...]  # best first; min(k, index size) of them
    embedding: np.ndarray  # the query's L2-normalised embedding (D float32)


class SimilarPhotos:
    """An embedding index with its own model, ready to answer "which catalogue photos look like this"."""

    def __init__(
        self,
        index_dir: str | Path,
        *,
        device: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    ) -> None:
        """Raises StepError for a folder that is not a finished index, ValueError for an absent device."""
        self.index = load_index(index_dir)
        self.device = pick_device(device)
        self.network, self.spec = load_index_model(self.index, self.device)
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def dims(self) -> int:
        return self.index.dims

    def decode(self, data: bytes) -> Image.Image:
        """Encoded bytes to an RGB photo, with the server's rules (pixels, aspect ratio); raises
        ImageDecodeError."""
        return check_aspect_ratio(decode_image(data, max_pixels=self.max_pixels).image, self.max_aspect_ratio)

    def find(self, image: Image.Image, k: int) -> SimilarAnswer:
        """The min(k, index size) catalogue photos most similar to a decoded photo, best first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        embedding = embed_images(self.network, self.spec, [image], self.device)
        scores, positions = search(self.index, embedding, k)  # on the CPU: see the module docstring
        paths = self.index.paths
        neighbours = tuple(
            SimilarPhoto(n.rank, n.similarity, n.category, n.product_id, paths[n.position])
            for n in neighbours_of(self.index, scores[0], positions[0])
        )
        return SimilarAnswer(neighbours, embedding[0])

    def warm_up(self) -> None:
        """One blank query, so the first request pays no start-up cost; it also pages the
        memory-mapped embeddings in."""
        started = time.perf_counter()
        blank = Image.new("RGB", (self.spec.image_size, self.spec.image_size))
        self.find(blank, 1)
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        log.debug("similar-photo index warmed up in %.2f s", time.perf_counter() - started)

    def describe(self) -> str:
        return (
            f"{self.size} photos ({self.dims}-d) in {self.index.directory}, embedded by its own "
            f"{self.spec.arch} {self.spec.image_size}px on {self.device} fp32"
        )
