"""What an audit finds: likely mislabelled photos, category pairs that mix, and the whole result.

Plain data, apart from both the analysis (`audit.py`) that makes it and the files (`audit_report.py`)
that show it, so neither of those imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MislabelledPhoto:
    position: int  # row in the index
    category: str  # where the photo is filed
    suggested_category: str
    suggested_count: int  # neighbours in the suggested category
    own_count: int  # neighbours in the photo's own category
    neighbours: int  # k, or fewer when the index holds fewer photos of other listings
    mean_similarity: float  # to its neighbours in the suggested category
    examples: tuple[int, ...]  # the nearest of those neighbours, best first

    @property
    def share(self) -> float:
        return self.suggested_count / self.neighbours


@dataclass(frozen=True)
class CategoryPair:
    category_a: str  # the two names in sorted order
    category_b: str
    photos_a: int
    photos_b: int
    links_a_to_b: int  # neighbours of a-photos that are b-photos
    links_b_to_a: int
    links_from_a: int  # all neighbour links of a-photos (photos_a × k unless the index is tiny)
    links_from_b: int
    examples: tuple[tuple[int, int, float], ...] = ()  # (photo, neighbour, similarity), most similar first

    @property
    def cross_links(self) -> int:
        return self.links_a_to_b + self.links_b_to_a

    @property
    def mix(self) -> float:
        return self.cross_links / max(1, self.links_from_a + self.links_from_b)

    @property
    def share_a_to_b(self) -> float:
        return self.links_a_to_b / max(1, self.links_from_a)

    @property
    def share_b_to_a(self) -> float:
        return self.links_b_to_a / max(1, self.links_from_b)


@dataclass
class AuditResult:
    out: Path
    photos: int
    categories: int
    k: int
    min_share: float
    mislabelled: list[MislabelledPhoto] = field(default_factory=list)
    pairs: list[CategoryPair] = field(default_factory=list)
    seconds: float = 0.0
