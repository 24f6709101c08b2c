"""Promotion past a gate, by moving the registry aliases @champion and @previous.

Both models are scored photo by photo on the registered model's frozen evaluation set
(evaluation_set.py: fixed at the first promotion, grown with new test photos, never shrunk). The
candidate replaces the champion only when, in this order:

1. its top-1 reaches the floor `min_accuracy` (with no champion this is the only test);
2. the champion can be loaded (else it is replaced only with `force`; the broken one does not
   become @previous: a rollback must not restore a model that cannot load);
3. neither model trained on the evaluation set: each version's run records its train/val photos
   (`data/training_photos.txt.gz`), compared by hash prefix with the frozen set. A candidate that
   trained on it is refused. A champion that did is refused too unless `force` (its score is
   inflated, so comparing anyway only makes the gate stricter). A version whose run has no record
   (trained before the record existed, or outside the pipeline) is refused unless
   `allow_unknown_training_data`: then the check is skipped for it, the summary says so, and no new
   test photos are added to the set (nothing can be checked against them);
4. it is strictly better (a tie never moves the alias: the served model would change with no
   measured benefit), by at least `min_gain`, and the difference is significant: exact McNemar
   on the photos where the two disagree, p < `alpha` (significance.py). On a few dozen photos a
   gain of one or two photos is chance, and the summary says so.

Two promotes of one model at once are serialised by a lease on the registered model
(lease.py), held from reading the aliases to writing them; before the aliases move the
champion is read again and, if something else moved it meanwhile, the candidate is compared with
the new one. The decision, both scores, the discordant counts, the p-value and the interval are
tags on the candidate version (`promotion.*`).

Rolling back is rollback.py.
"""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepError
from ..evaluation.evaluate import find_test_dir, tag_value
from .evaluation_set import (
    EvaluationPhoto,
    EvaluationSet,
    data_photos,
    evaluation_set,
    load_frozen_set,
    scoring_pool,
    set_fingerprint,
    store_frozen_set,
    training_prefixes,
)
from .lease import DEFAULT_LEASE_SECONDS, DEFAULT_LEASE_WAIT, DEFAULT_SETTLE, RegistryLease
from .promotion_gate import DEFAULT_ALPHA, Score, compare, decide, training_refusal
from .register import CHAMPION, PREVIOUS, aliases, connect, first_line, model_version, set_version_tags
from .significance import PairedComparison

_RECHECKS = 3  # times the champion may change under a promotion before it gives up


# ----------------------------------------------------------------------------------------- scoring


def download_model(uri: str, into: Path, tracking_uri: str) -> Path:
    """Fetch a registered model version into `into` and return the folder with its spec and weights."""
    import mlflow

    from ..training.models import SPEC_NAME, WEIGHTS_NAME

    try:
        if uri.startswith("models:/") and "/" in uri.removeprefix("models:/"):
            # MLflow resolves models:/NAME/VERSION against the global registry URI whatever registry_uri
            # says; resolved here, a `--tracking-uri` works without $MLFLOW_TRACKING_URI.
            from mlflow import MlflowClient

            model_name, version = uri.removeprefix("models:/").rsplit("/", 1)
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            uri = client.get_model_version_download_uri(model_name, version)
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
    photos: list[EvaluationPhoto],
    *,
    tracking_uri: str,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    tta: str | None = None,
) -> tuple[Score, int]:
    """(per-photo top-1 score keyed by content hash, unreadable files) of a registered model version.

    Per photo, not a count: the paired test needs which photos each model got right. `tta` is the
    version's test_time_augmentation tag: each version is judged as it is served.
    """
    from ..evaluation.predict import pick_device, predict_files
    from ..training.models import TTA_KEY, load_classifier, with_test_time_augmentation

    with tempfile.TemporaryDirectory(prefix="shopvision-promote-") as scratch:
        model_dir = download_model(uri, Path(scratch), tracking_uri)
        try:
            network, spec = load_classifier(model_dir, pick_device(device))
        except StepError:
            raise
        except Exception as exc:  # e.g. weights whose names or shapes do not fit the spec's network
            raise StepError(f"cannot load {uri}: {type(exc).__name__}: {first_line(exc)}") from None
    if tta:
        spec.extra[TTA_KEY] = tta
        network = with_test_time_augmentation(network, spec)
    files = [p.path for p in photos]
    result = predict_files(network, spec, files, top_k=1, batch_size=batch_size, progress=progress)
    by_path = {p.path: p for p in photos}
    right = {by_path[p.path].sha256: p.labels[0] == by_path[p.path].category for p in result.predictions}
    return Score.of(right), len(result.unreadable)


# ----------------------------------------------------------------------------------------- promote


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
    alpha: float = DEFAULT_ALPHA
    comparison: PairedComparison | None = None
    evaluation: EvaluationSet | None = None
    notes: list[str] = field(default_factory=list)  # lease waits, unchecked training data, re-checks


def promote(
    name: str,
    version: str | int,
    data: Path,
    *,
    min_gain: float = 0.0,
    min_accuracy: float = 0.0,
    alpha: float = DEFAULT_ALPHA,
    force: bool = False,
    allow_unknown_training_data: bool = False,
    add_test_photos: bool = True,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    lease_wait: float = DEFAULT_LEASE_WAIT,
    lease_settle: float = DEFAULT_SETTLE,
    tracking_uri: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
    require_shadow_agreement: float | None = None,
    shadow_url: str | None = None,
    shadow_min_photos: int = 100,
    roots: Mapping[str, Path] | None = None,
) -> PromotionDecision:
    """Score the candidate and the current @champion on the frozen evaluation set and apply the gate.

    `data` is split's output (a manifest; `roots` says where its photos lie here, default: where
    they were written), a split root in the folder layout (train/ val/ test/ and split.json), or a
    plain <category>/ test folder.
    """
    if min_gain < 0:
        raise StepError(f"--min-gain must be >= 0, got {min_gain}")
    if not 0.0 <= min_accuracy <= 1.0:
        raise StepError(f"--min-accuracy must be in [0, 1], got {min_accuracy}")
    if not 0.0 < alpha < 1.0:
        raise StepError(f"--alpha must be in (0, 1), got {alpha}")
    shadow_refused, shadow_note = None, None
    if require_shadow_agreement is not None:  # before any scoring: the live report is cheap to read
        from .shadow_gate import shadow_refusal

        if not shadow_url:
            raise StepError("--require-shadow-agreement needs --shadow-url (the server's drift route)")
        shadow_refused, shadow_note = shadow_refusal(
            shadow_url, str(version), require_shadow_agreement, min_photos=shadow_min_photos
        )
    client, uri = connect(tracking_uri)
    version = str(version)
    candidate_run = _run_id(model_version(client, name, version))
    photos = data_photos(Path(data), roots)
    fingerprint = _folder_fingerprint(photos.root, roots)
    scores: dict[tuple[str, str], tuple[Score, int]] = {}

    def score(v: str, pool: list[EvaluationPhoto]) -> tuple[Score, int]:
        from ..training.models import TTA_KEY

        key = (v, set_fingerprint(p.sha256 for p in pool))
        if key not in scores:
            scores[key] = score_model(
                f"models:/{name}/{v}",
                pool,
                tta=(model_version(client, name, v).tags or {}).get(TTA_KEY),
                tracking_uri=uri,
                batch_size=batch_size,
                device=device,
                progress=progress,
            )
        return scores[key]

    lease = RegistryLease(
        lambda: connect(uri)[0],
        name,
        seconds=lease_seconds,
        wait=lease_wait,
        settle=lease_settle,
        notify=notify,
    )
    with lease:
        notes = list(lease.notes)
        trained_on = {version: training_prefixes(client, candidate_run, uri)}
        for _ in range(_RECHECKS):
            champion_version = aliases(client, name).get(CHAMPION)
            if champion_version == version:
                raise StepError(f"{name} version {version} is already @{CHAMPION}: nothing to promote")
            if champion_version is not None and champion_version not in trained_on:
                champion_run = _run_id(model_version(client, name, champion_version))
                trained_on[champion_version] = training_prefixes(client, champion_run, uri)
            stored = load_frozen_set(client, name, uri)
            involved = {v: trained_on[v] for v in (version, champion_version) if v is not None}
            evaluation = evaluation_set(
                name, version, photos, stored, trained_on=involved, add_new=add_test_photos
            )
            hashes = [p.sha256 for p in evaluation.photos]
            pool = scoring_pool(photos, stored)
            full, unreadable = score(version, pool)
            candidate = full.restricted(hashes)
            if not candidate.right:
                raise StepError(f"none of the {len(hashes)} photos of {name}'s evaluation set could be read")
            champion, champion_error = None, None
            if champion_version is not None:
                try:
                    champion = score(champion_version, pool)[0].restricted(candidate.right)
                    candidate = candidate.restricted(champion.right)
                except StepError as exc:
                    champion_error = str(exc)
            refusal, checked = training_refusal(
                evaluation.frozen.photos,
                trained_on,
                version,
                champion_version if champion_error is None else None,
                allow_unknown=allow_unknown_training_data,
                force=force,
            )
            refusal = refusal or shadow_refused
            promoted, reason = decide(
                candidate,
                champion,
                min_gain=min_gain,
                min_accuracy=min_accuracy,
                alpha=alpha,
                champion_error=champion_error,
                force=force,
                refusal=refusal,
            )
            now = aliases(client, name)
            if now.get(CHAMPION) == champion_version:
                break
            notes.append(
                f"@{CHAMPION} moved from v{champion_version} to v{now.get(CHAMPION)} while scoring "
                "(outside this lease): compared again"
            )
        else:
            raise StepError(f"{name}'s @{CHAMPION} kept moving while it was being scored; no alias moved")
        notes += checked + ([shadow_note] if shadow_note else [])
        lease.ensure_held()
        if evaluation.changed:  # before any alias moves: a set that failed to store moves nothing
            store_frozen_set(client, name, evaluation.frozen, version, candidate_run)
        previous = now.get(PREVIOUS)
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
            alpha=alpha,
            comparison=compare(candidate, champion, alpha) if champion is not None else None,
            evaluation=evaluation,
            notes=notes,
        )
        set_version_tags(client, name, version, decision_tags(decision))
    return decision


def _run_id(model_version) -> str | None:
    return (model_version.tags or {}).get("source_run_id") or model_version.run_id or None


def _folder_fingerprint(root: Path, roots: Mapping[str, Path] | None = None) -> str | None:
    """The test photos' fingerprint, as evaluate records it (a manifest's test rows, or the test folder)."""
    from ..data.fingerprint import data_fingerprint
    from ..data.manifest import has_manifest, photos_fingerprint, split_photos

    try:
        if has_manifest(root):
            return photos_fingerprint(split_photos(root, "test", roots)) or None
        return data_fingerprint(find_test_dir(root))
    except StepError:
        return None


def decision_tags(decision: PromotionDecision) -> dict[str, str]:
    """The decision as `promotion.*` tags on the candidate version ("none" where there is no champion)."""
    champion_score = (
        tag_value(decision.champion.top1_accuracy)
        if decision.champion
        else ("unloadable" if decision.champion_error else "none")
    )
    paired, evaluation = decision.comparison, decision.evaluation
    tags = {
        "promotion.decision": "promoted" if decision.promoted else "rejected",
        "promotion.reason": decision.reason[:4000],
        "promotion.candidate_top1_accuracy": tag_value(decision.candidate.top1_accuracy),
        "promotion.champion_top1_accuracy": champion_score,
        "promotion.champion_version": decision.champion_version or "none",
        "promotion.min_gain": tag_value(float(decision.min_gain)),
        "promotion.min_accuracy": tag_value(float(decision.min_accuracy)),
        "promotion.alpha": tag_value(float(decision.alpha)),
        "promotion.test_images": str(decision.candidate.images),
        "promotion.test_data_fingerprint": decision.test_data_fingerprint or "",
        "promotion.forced": "true" if decision.forced else "false",
        "promotion.time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "promotion.discordant_candidate_only": str(paired.candidate_only) if paired else "none",
        "promotion.discordant_champion_only": str(paired.champion_only) if paired else "none",
        "promotion.p_value": tag_value(paired.p_value) if paired else "none",
        "promotion.difference_ci_low": tag_value(paired.ci_low) if paired else "none",
        "promotion.difference_ci_high": tag_value(paired.ci_high) if paired else "none",
    }
    if evaluation is not None:
        tags["promotion.evaluation_set_fingerprint"] = evaluation.frozen.fingerprint
        tags["promotion.evaluation_photos"] = str(len(evaluation.photos))
        tags["promotion.evaluation_photos_missing"] = str(evaluation.missing)
        tags["promotion.evaluation_photos_added"] = str(evaluation.added)
    return tags


def promote_summary(d: PromotionDecision) -> str:
    champion = (
        f"champion v{d.champion_version} top-1 {d.champion.top1_accuracy:.4f} ({d.champion.correct}/{d.champion.images})"
        if d.champion
        else (f"champion v{d.champion_version} cannot be loaded" if d.champion_error else "no champion")
    )
    lines = [
        f"promote: {d.name} candidate v{d.candidate_version} top-1 {d.candidate.top1_accuracy:.4f} "
        f"({d.candidate.correct}/{d.candidate.images} photos) vs {champion}"
    ]
    e = d.evaluation
    if e is not None:
        origin = (
            f"frozen at v{e.frozen.created_version}" if e.stored else "frozen now, from these test photos"
        )
        text = f"evaluation set {e.frozen.fingerprint[:12]}: {len(e.frozen.photos)} photos ({origin})"
        if e.missing:
            text += f"; {e.missing} of them are not in this data and were not scored"
        if e.added and e.stored:
            text += f"; {e.added} new test photos added"
        if e.excluded:
            text += f"; {e.excluded} test photos left out because a model trained on them"
        if e.relabelled:
            text += f"; {e.relabelled} have another category in this data (the frozen one counts)"
        if e.not_extended:
            text += f"; {e.not_extended}"
        lines.append(f"promote: {text}")
    if d.unreadable:
        lines.append(f"promote: {d.unreadable} unreadable test files skipped")
    if d.comparison is not None:
        p = d.comparison
        lines.append(
            f"promote: paired on {p.photos} photos: candidate alone right on {p.candidate_only}, champion alone "
            f"on {p.champion_only}; difference {p.difference:+.4f}, {1 - p.alpha:.0%} CI "
            f"[{p.ci_low:+.4f}, {p.ci_high:+.4f}]; exact McNemar p = {p.p_value:.4f} (alpha {p.alpha:g}): "
            + ("significant" if p.significant else "not significant")
        )
    lines += [f"promote: note: {note}" for note in d.notes]
    if d.promoted:
        moved = f"@{CHAMPION} → v{d.candidate_version}" + (
            f", @{PREVIOUS} → v{d.previous_version}" if d.previous_version else ""
        )
        lines.append(f"promote: PROMOTED: {d.reason}; {moved}")
    else:
        kept = f"@{CHAMPION} stays v{d.champion_version}" if d.champion_version else f"no @{CHAMPION} set"
        lines.append(f"promote: REJECTED: {d.reason}; {kept}")
    return "\n".join(lines)
