"""Which model version to serve: resolve the registry alias at start, and follow it with `--watch-alias`.

`models:/NAME@ALIAS` is resolved to a concrete version once, at start, and logged, so the log says what
answered. With a watch interval, `AliasWatcher` asks the registry where the alias points; when it
moved, the new version is downloaded, loaded and warmed up beside the serving one (on a worker thread,
while requests keep flowing) and handed to `swap`, which replaces the model reference in one step. If
loading fails the old version keeps serving, the error is logged and counted, and that version is tried
again only after a back-off.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shopvision.components.errors import StepError
from shopvision.components.training.model_source import resolve_model_dir
from shopvision.components.training.models import TTA_KEY

from .metrics import ServingMetrics
from .model import THRESHOLD_TAG, PhotoClassifier
from .settings import DEFAULT_MODEL_NAME

log = logging.getLogger("shopvision.serving")

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")
MAX_BACKOFF_S = 600.0


@dataclass(frozen=True)
class ModelRef:
    """A model to serve, pinned: the concrete version an alias pointed to when resolved."""

    requested: str  # as given on the command line
    uri: str  # what is downloaded: models:/NAME/VERSION, or the requested path or URI
    version: str  # registry version, or "unregistered"
    name: str | None = None  # registered model name
    alias: str | None = None
    threshold_tag: str | None = None  # the version's confidence_threshold tag
    tta_tag: str | None = None  # the version's test_time_augmentation tag (flip, or none)
    run_id: str | None = None

    def describe(self) -> str:
        if self.alias:
            return f"{self.requested} -> version {self.version} (run {self.run_id})"
        if self.name:
            return f"{self.requested} (run {self.run_id})"
        return self.requested


def parse_registry_uri(text: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) for models:/NAME@ALIAS and models:/NAME/VERSION; None otherwise."""
    match = _REGISTRY_URI.match(text)
    if not match:
        return None
    return match["name"], match["alias"], match["version"]


def public_source(requested: str) -> str:
    """What answers and metrics may say about where the model came from: a registry or run URI as
    given (its name and version, or run), and "local" for anything else. A folder's path on this
    machine, or a bucket's layout, is nobody's business outside it (the log still has it)."""
    if parse_registry_uri(requested) is not None or requested.startswith("runs:/"):
        return requested
    return "local"


def served_name(requested: str, override: str | None) -> str:
    """The NAME in /v2/models/NAME: `--model-name` when given, else the registered model's name for
    models:/NAME@ALIAS and models:/NAME/V (what an Open Inference Protocol client that knows the
    registry asks for), else "shopvision"."""
    if override:
        return override
    parsed = parse_registry_uri(requested)
    return parsed[0] if parsed is not None else DEFAULT_MODEL_NAME


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _registry_error(what: str, exc: Exception) -> StepError:
    first_line = (str(exc).splitlines() or [""])[0]
    return StepError(f"cannot resolve {what} in the MLflow registry: {type(exc).__name__}: {first_line}")


def resolve(requested: str) -> ModelRef:
    """Pin `requested` to a concrete version (registry URIs) or take it as it is (paths, runs:/...)."""
    parsed = parse_registry_uri(requested)
    if parsed is None:
        return ModelRef(requested=requested, uri=requested, version="unregistered")
    name, alias, version = parsed
    try:
        client = _client()
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except Exception as exc:  # MLflow's RestException, connection errors, a missing database
        raise _registry_error(requested, exc) from None
    return ModelRef(
        requested=requested,
        uri=f"models:/{name}/{found.version}",
        version=str(found.version),
        name=name,
        alias=alias,
        threshold_tag=(found.tags or {}).get(THRESHOLD_TAG),
        tta_tag=(found.tags or {}).get(TTA_KEY),
        run_id=found.run_id,
    )


def alias_version(name: str, alias: str) -> str:
    """The version the alias points to now (raises when the registry cannot say)."""
    return str(_client().get_model_version_by_alias(name, alias).version)


def load_version(ref: ModelRef, *, warm_up: tuple[int, ...] = (1,), **options) -> PhotoClassifier:
    """Download `ref`, build the classifier and warm it up; `options` go to PhotoClassifier."""
    started = time.perf_counter()
    model = PhotoClassifier(
        resolve_model_dir(ref.uri),
        version=ref.version,
        threshold_tag=ref.threshold_tag,
        tta_tag=ref.tta_tag,
        **options,
    )
    model.warm_up(warm_up)
    log.info("loaded %s: %s in %.1f s", ref.describe(), model.describe(), time.perf_counter() - started)
    return model


class AliasWatcher:
    """Polls the alias every `interval` seconds and hot-swaps to where it points."""

    def __init__(
        self,
        current: ModelRef,
        *,
        interval: float,
        load: Callable[[ModelRef], PhotoClassifier],
        swap: Callable[[PhotoClassifier, ModelRef], None],
        metrics: ServingMetrics,
    ) -> None:
        if not (current.name and current.alias):
            raise StepError(f"--watch-alias needs a models:/NAME@ALIAS model, not {current.requested}")
        self.current = current
        self.interval = interval
        self.load = load
        self.swap = swap
        self.metrics = metrics
        self._failures: dict[str, tuple[int, float]] = {}  # version -> (failures, retry not before)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> bool:
        """One poll; True when a new version was swapped in."""
        found = await asyncio.to_thread(self._fetch_new)
        if found is None:
            return False
        model, ref = found
        self.swap(model, ref)
        self.current = ref
        self._failures.pop(ref.version, None)
        return True

    def _fetch_new(self) -> tuple[PhotoClassifier, ModelRef] | None:
        name, alias = self.current.name, self.current.alias
        try:
            version = alias_version(name, alias)
        except Exception as exc:  # registry down, alias deleted: keep serving what we have
            self.metrics.registry_errors.inc()
            log.warning("alias poll of %s@%s failed (%s: %s); still serving version %s",
                        name, alias, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                        self.current.version)  # fmt: skip
            return None
        if version == self.current.version:
            return None
        failures, retry_at = self._failures.get(version, (0, 0.0))
        if time.monotonic() < retry_at:
            return None
        log.info("alias %s@%s moved from version %s to %s: loading it beside the serving one",
                 name, alias, self.current.version, version)  # fmt: skip
        try:
            ref = resolve(f"models:/{name}/{version}")
            ref = replace(ref, requested=self.current.requested, alias=alias)
            return self.load(ref), ref
        except Exception as exc:  # anything at all: the serving version must survive it
            failures += 1
            backoff = min(self.interval * 2**failures, MAX_BACKOFF_S)
            self._failures[version] = (failures, time.monotonic() + backoff)
            self.metrics.swap_failures.inc()
            log.error("version %s of %s could not be loaded (%s: %s); still serving version %s, "
                      "retrying in %.0f s", version, name, type(exc).__name__, exc, self.current.version,
                      backoff)  # fmt: skip
            return None
