"""Promotion past a gate, and rollback, by moving the registry aliases @champion and @previous.

Promotion rule (`decide`): the candidate is scored against the current champion on the same test
photos, and it replaces the champion only when

    candidate top-1 >= min_accuracy                      (the floor), and
    candidate top-1 >  champion top-1                    (strictly better: a tie keeps the champion), and
    candidate top-1 -  champion top-1 >= min_gain        (the margin; 0 by default)

A tie never moves the alias: the served model would change with no measured benefit, and which
of two equal models serves would depend on the order they were registered in. With no champion
the candidate only has to pass the floor. A champion that cannot be loaded is reported and
replaced only with `force`; `force` never lets a candidate below the floor or below a loadable
champion through, and the broken champion does not become @previous (a rollback must not restore
a model that cannot load; @previous keeps what it named before).

`rollback` moves @champion to @previous and removes @previous, so a second rollback is a clear
error instead of a flip back to the version just rolled away from.

The decision and both scores are written as tags on the candidate version (`promotion.*`).
"""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import StepError
from .evaluate import compute_metrics, find_test_dir, labelled_photos, tag_value
from .registry import CHAMPION, PREVIOUS, aliases, connect, first_line, model_version

_TOLERANCE = 1e-9  # accuracies are ratios of counts; this only absorbs float rounding in min_gain


# ----------------------------------------------------------------------------------------- promote


@dataclass
class Score:
    top1_accuracy: float
    correct: int
    images: int


@dataclass
class PromotionDecision:
    name: str
    candidate_version: str
    candidate: Score
    champion_version: str | None
    champion: Score | None  # None: no champion, or it could not be loaded
    champion_error: str | None
    min_gain: float
    min_accuracy: float
    promoted: bool
    reason: str
    forced: bool = False
    previous_version: str | None = None  # @previous after the decision
    test_data_fingerprint: str | None = None
    unreadable: int = 0


def decide(
    candidate: Score,
    champion: Score | None,
    *,
    min_gain: float = 0.0,
    min_accuracy: float = 0.0,
    champion_error: str | None = None,
    force: bool = False,
) -> tuple[bool, str]:
    """The gate (see the module docstring): (promote?, why), from the two scores alone."""
    if candidate.top1_accuracy < min_accuracy - _TOLERANCE:
        return False, f"top-1 {candidate.top1_accuracy:.4f} is below the floor {min_accuracy:.4f}"
    if champion_error is not None:
        if force:
            return True, f"the champion cannot be loaded ({champion_error}); replaced with --force"
        return False, f"the champion cannot be loaded ({champion_error}); use --force to replace it"
    if champion is None:
        return (
            True,
            f"no champion yet and top-1 {candidate.top1_accuracy:.4f} passes the floor {min_accuracy:.4f}",
        )
    if candidate.images != champion.images:
        raise ValueError("candidate and champion were scored on different photo sets")
    gain = candidate.top1_accuracy - champion.top1_accuracy
    if candidate.correct <= champion.correct:
        how = "ties" if candidate.correct == champion.correct else "is below"
        return False, (
            f"top-1 {candidate.top1_accuracy:.4f} {how} the champion's {champion.top1_accuracy:.4f} "
            "(a candidate must be strictly better)"
        )
    if gain < min_gain - _TOLERANCE:
        return False, f"gain {gain:+.4f} over the champion is less than the minimum gain {min_gain:.4f}"
    return (
        True,
        f"gain {gain:+.4f} over the champion's {champion.top1_accuracy:.4f} (minimum gain {min_gain:.4f})",
    )


def download_model(uri: str, into: Path, tracking_uri: str) -> Path:
    """Fetch a registered model version into `into` and return the folder with its spec and weights."""
    import mlflow

    from .models import SPEC_NAME, WEIGHTS_NAME

    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(into), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        )
    except Exception as exc:  # MLflow, requests and OS errors all mean "cannot fetch"
        raise StepError(f"cannot fetch {uri}: {type(exc).__name__}: {first_line(exc)}") from None
    found = sorted(p.parent for p in local.rglob(SPEC_NAME) if (p.parent / WEIGHTS_NAME).is_file())
    if not found:
        raise StepError(f"{uri} holds no shopvision model ({SPEC_NAME} + {WEIGHTS_NAME})")
    return found[0]


def score_model(
    uri: str,
    files: list[Path],
    categories: list[str],
    *,
    tracking_uri: str,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Score, int]:
    """(top-1 score, unreadable files) of a registered model version on labelled photos."""
    from .models import load_classifier
    from .predict import pick_device, predict_files

    with tempfile.TemporaryDirectory(prefix="shopvision-promote-") as scratch:
        model_dir = download_model(uri, Path(scratch), tracking_uri)
        try:
            network, spec = load_classifier(model_dir, pick_device(device))
        except StepError:
            raise
        except Exception as exc:  # e.g. weights whose names or shapes do not fit the spec's network
            raise StepError(f"cannot load {uri}: {type(exc).__name__}: {first_line(exc)}") from None
    result = predict_files(network, spec, files, top_k=1, batch_size=batch_size, progress=progress)
    category_of = dict(zip(files, categories, strict=True))
    true_categories = [category_of[p.path] for p in result.predictions]
    metrics, *_ = compute_metrics(spec.labels, true_categories, result.predictions)
    counts = metrics["counts"]
    return Score(metrics["top1_accuracy"], counts["correct_top1"], counts["images"]), len(result.unreadable)


def promote(
    name: str,
    version: str | int,
    data: Path,
    *,
    min_gain: float = 0.0,
    min_accuracy: float = 0.0,
    force: bool = False,
    tracking_uri: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> PromotionDecision:
    """Score the candidate and the current @champion on the same test photos and apply the gate."""
    from .tracking import data_fingerprint

    if min_gain < 0:
        raise StepError(f"--min-gain must be >= 0, got {min_gain}")
    if not 0.0 <= min_accuracy <= 1.0:
        raise StepError(f"--min-accuracy must be in [0, 1], got {min_accuracy}")
    client, uri = connect(tracking_uri)
    version = str(version)
    model_version(client, name, version)
    current = aliases(client, name)
    champion_version = current.get(CHAMPION)
    if champion_version == version:
        raise StepError(f"{name} version {version} is already @{CHAMPION}: nothing to promote")

    test_dir = find_test_dir(Path(data))
    files, categories = labelled_photos(test_dir)
    fingerprint = data_fingerprint(test_dir)
    scoring = dict(tracking_uri=uri, batch_size=batch_size, device=device, progress=progress)
    candidate, unreadable = score_model(f"models:/{name}/{version}", files, categories, **scoring)
    champion, champion_error = None, None
    if champion_version is not None:
        try:
            champion, _ = score_model(f"models:/{name}/{champion_version}", files, categories, **scoring)
        except StepError as exc:
            champion_error = str(exc)

    promoted, reason = decide(
        candidate,
        champion,
        min_gain=min_gain,
        min_accuracy=min_accuracy,
        champion_error=champion_error,
        force=force,
    )
    previous = current.get(PREVIOUS)
    if promoted:
        # @previous first: if the second call fails, @champion still names a working version.
        if champion_version is not None and champion_error is None:
            client.set_registered_model_alias(name, PREVIOUS, champion_version)
            previous = champion_version
        client.set_registered_model_alias(name, CHAMPION, version)
    decision = PromotionDecision(
        name=name,
        candidate_version=version,
        candidate=candidate,
        champion_version=champion_version,
        champion=champion,
        champion_error=champion_error,
        min_gain=min_gain,
        min_accuracy=min_accuracy,
        promoted=promoted,
        reason=reason,
        forced=promoted and champion_error is not None,
        previous_version=previous,
        test_data_fingerprint=fingerprint,
        unreadable=unreadable,
    )
    for key, value in decision_tags(decision).items():
        client.set_model_version_tag(name, version, key, value)
    return decision


def decision_tags(decision: PromotionDecision) -> dict[str, str]:
    """The decision as `promotion.*` tags on the candidate version."""
    champion_score = (
        tag_value(decision.champion.top1_accuracy)
        if decision.champion
        else ("unloadable" if decision.champion_error else "none")
    )
    return {
        "promotion.decision": "promoted" if decision.promoted else "rejected",
        "promotion.reason": decision.reason[:4000],
        "promotion.candidate_top1_accuracy": tag_value(decision.candidate.top1_accuracy),
        "promotion.champion_top1_accuracy": champion_score,
        "promotion.champion_version": decision.champion_version or "none",
        "promotion.min_gain": tag_value(float(decision.min_gain)),
        "promotion.min_accuracy": tag_value(float(decision.min_accuracy)),
        "promotion.test_images": str(decision.candidate.images),
        "promotion.test_data_fingerprint": decision.test_data_fingerprint or "",
        "promotion.forced": "true" if decision.forced else "false",
        "promotion.time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def promote_summary(d: PromotionDecision) -> str:
    champion = (
        f"champion v{d.champion_version} top-1 {d.champion.top1_accuracy:.4f}"
        if d.champion
        else (f"champion v{d.champion_version} cannot be loaded" if d.champion_error else "no champion")
    )
    head = (
        f"promote: {d.name} candidate v{d.candidate_version} top-1 {d.candidate.top1_accuracy:.4f} "
        f"({d.candidate.correct}/{d.candidate.images} photos) vs {champion}"
    )
    if d.unreadable:
        head += f"; {d.unreadable} unreadable test files skipped"
    if d.promoted:
        moved = f"@{CHAMPION} → v{d.candidate_version}" + (
            f", @{PREVIOUS} → v{d.previous_version}" if d.previous_version else ""
        )
        return f"{head}\npromote: PROMOTED: {d.reason}; {moved}"
    kept = f"@{CHAMPION} stays v{d.champion_version}" if d.champion_version else f"no @{CHAMPION} set"
    return f"{head}\npromote: REJECTED: {d.reason}; {kept}"


# ---------------------------------------------------------------------------------------- rollback


@dataclass
class RollbackResult:
    name: str
    restored_version: str  # @champion now
    replaced_version: str | None  # the champion that was rolled back


def rollback(name: str, *, tracking_uri: str | None = None) -> RollbackResult:
    """@champion back to @previous. @previous is then removed, so a second rollback is an error
    rather than a flip back to the version just rolled away from (which stays tagged and reachable
    as models:/NAME/<version>)."""
    client, _ = connect(tracking_uri)
    current = aliases(client, name)
    previous = current.get(PREVIOUS)
    if previous is None:
        raise StepError(
            f"{name} has no @{PREVIOUS} version to roll back to (no promotion replaced a champion since the "
            "last rollback); promote a version explicitly instead"
        )
    champion = current.get(CHAMPION)
    if champion == previous:
        raise StepError(
            f"{name}: @{CHAMPION} and @{PREVIOUS} are both version {previous}: nothing to roll back"
        )
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    client.set_model_version_tag(name, previous, "rollback.restored_at", now)
    if champion is not None:
        client.set_model_version_tag(name, champion, "rollback.rolled_back_at", now)
        client.set_model_version_tag(name, previous, "rollback.replaced_version", champion)
    return RollbackResult(name, previous, champion)


def rollback_summary(result: RollbackResult) -> str:
    replaced = f"v{result.replaced_version}" if result.replaced_version else "no champion"
    return f"rollback: {result.name} @{CHAMPION} → v{result.restored_version} (was {replaced}); @{PREVIOUS} cleared"
