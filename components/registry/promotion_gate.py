"""The promotion gate's rules, from scores alone: the floor, training overlap, gain and significance.

`decide` is the whole rule (promotion.py explains it and applies it to registry versions); kept apart
from the registry code so each rule can be tested on hand-made per-photo scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .evaluation_set import prefix
from .significance import PairedComparison, paired_comparison

DEFAULT_ALPHA = 0.05
_TOLERANCE = 1e-9  # accuracies are ratios of counts; this only absorbs float rounding in min_gain


# ------------------------------------------------------------------------------------ the gate


@dataclass
class Score:
    top1_accuracy: float
    correct: int
    images: int
    right: dict[str, bool] = field(default_factory=dict, repr=False)  # content hash -> top-1 right

    @classmethod
    def of(cls, right: Mapping[str, bool]) -> Score:
        right = dict(right)
        correct = sum(right.values())
        return cls(correct / len(right) if right else 0.0, correct, len(right), right)

    def restricted(self, hashes: Iterable[str]) -> Score:
        return Score.of({h: self.right[h] for h in hashes if h in self.right})


def compare(candidate: Score, champion: Score, alpha: float = DEFAULT_ALPHA) -> PairedComparison:
    """Discordant counts and McNemar test of two scores on the same photos."""
    if set(candidate.right) != set(champion.right) or not candidate.right:
        raise ValueError("candidate and champion must be scored on the same, non-empty photo set")
    b = sum(1 for h, ok in candidate.right.items() if ok and not champion.right[h])
    c = sum(1 for h, ok in candidate.right.items() if not ok and champion.right[h])
    return paired_comparison(b, c, len(candidate.right), alpha)


def decide(
    candidate: Score,
    champion: Score | None,
    *,
    min_gain: float = 0.0,
    min_accuracy: float = 0.0,
    alpha: float = DEFAULT_ALPHA,
    champion_error: str | None = None,
    force: bool = False,
    refusal: str | None = None,
) -> tuple[bool, str]:
    """The gate (see the module docstring): (promote?, why). `refusal` is the training-overlap verdict."""
    if candidate.top1_accuracy < min_accuracy - _TOLERANCE:
        return False, f"top-1 {candidate.top1_accuracy:.4f} is below the floor {min_accuracy:.4f}"
    if champion_error is not None and not force:
        return False, f"the champion cannot be loaded ({champion_error}); use --force to replace it"
    if refusal is not None:
        return False, refusal
    if champion_error is not None:
        return True, f"the champion cannot be loaded ({champion_error}); replaced with --force"
    if champion is None:
        return (
            True,
            f"no champion yet and top-1 {candidate.top1_accuracy:.4f} passes the floor {min_accuracy:.4f}",
        )
    paired = compare(candidate, champion, alpha)
    b, c, gain = paired.candidate_only, paired.champion_only, paired.difference
    if b <= c:
        how = "ties" if b == c else "is below"
        return False, (
            f"top-1 {candidate.top1_accuracy:.4f} {how} the champion's {champion.top1_accuracy:.4f} "
            "(a candidate must be strictly better)"
        )
    if gain < min_gain - _TOLERANCE:
        return False, f"gain {gain:+.4f} over the champion is less than the minimum gain {min_gain:.4f}"
    if not paired.significant:
        return False, (
            f"gain {gain:+.4f} is not significant: of {paired.photos} photos the candidate alone gets {b} "
            f"right and the champion alone {c}; if the two were equally good, a difference this large "
            f"would still come up by chance with p = {paired.p_value:.4f} (needs < {alpha:g}), so these "
            "photos cannot tell them apart"
        )
    return True, (
        f"gain {gain:+.4f} over the champion's {champion.top1_accuracy:.4f} (minimum gain {min_gain:.4f}) "
        f"is significant: exact McNemar p = {paired.p_value:.4f} < {alpha:g}"
    )


def training_refusal(
    frozen_hashes: Iterable[str],
    trained_on: Mapping[str, set[str] | None],
    candidate_version: str,
    champion_version: str | None,
    *,
    allow_unknown: bool = False,
    force: bool = False,
) -> tuple[str | None, list[str]]:
    """(why the gate must refuse, or None; notes) from the models' training photos and the frozen set.

    `champion_version` is the champion actually compared (None when there is none or it cannot load).
    """
    frozen = {prefix(h) for h in frozen_hashes}
    notes: list[str] = []
    for role, version in (("candidate", candidate_version), ("champion", champion_version)):
        if version is None:
            continue
        prefixes = trained_on.get(version)
        if prefixes is None:
            if not allow_unknown:
                return (
                    f"the {role} v{version}'s training photos are unknown (its run has no "
                    "data/training_photos.txt.gz: trained before that record or outside the pipeline), so "
                    "it cannot be checked against the frozen evaluation set; pass "
                    "--allow-unknown-training-data to accept that risk",
                    notes,
                )
            notes.append(
                f"{role} v{version}: training photos unknown, overlap with the evaluation set NOT checked"
            )
            continue
        overlap = len(frozen & prefixes)
        if not overlap:
            continue
        what = f"the {role} v{version} trained on {overlap} of the {len(frozen)} photos of the frozen evaluation set"
        if role == "champion" and force:
            notes.append(f"{what}; compared anyway (--force): its score is inflated")
            continue
        if role == "champion":
            return f"{what}, so its score there is not a test score; use --force to compare anyway", notes
        return f"{what}, so its score there is not a test score", notes
    return None, notes
