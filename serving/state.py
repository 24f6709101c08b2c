"""What every route of the prediction server shares, and the one place a model is swapped."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .batcher import DynamicBatcher
from .limits import MemoryBudget, PhotoAdmission
from .metrics import ServingMetrics
from .registry_watch import public_source
from .settings import ServerSettings, auto_forward_workers, available_cores

if TYPE_CHECKING:
    from .model import PhotoClassifier
    from .registry_watch import ModelRef
    from .similar import SimilarPhotos

log = logging.getLogger("shopvision.serving")


class ServingState:
    """What the routes share: the serving model (swapped whole), the batcher, the metrics, and the
    similar-photo index when there is one (never swapped: it stays with the model that built it)."""

    def __init__(
        self,
        model: PhotoClassifier,
        settings: ServerSettings,
        source: str,
        *,
        forward_init: Callable[[], None] | None = None,
        decode_init: Callable[[], None] | None = None,
        similar: SimilarPhotos | None = None,
        similar_init: Callable[[], None] | None = None,
    ) -> None:
        """`forward_init`, `decode_init` and `similar_init` run first in each forward, decoding and
        similar-search thread (thread limits). `source` is what was asked for (`--model`); answers
        and metrics only show `public_source` of it."""
        self.model = model
        self.settings = settings
        self.source = public_source(source)
        self.metrics = ServingMetrics()
        self.batcher = DynamicBatcher(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            on_batch=self.metrics.observe_batch,
            workers=settings.forward_workers or auto_forward_workers(model.device.type, available_cores()),
            worker_init=forward_init,
        )
        self.admission = PhotoAdmission(settings.max_queue)
        self.json_budget = MemoryBudget(settings.json_budget_bytes)
        self.metrics.queued.set_function(lambda: self.batcher.queued)
        self.metrics.in_progress.set_function(lambda: self.admission.admitted)
        self.metrics.json_budget_used.set_function(lambda: self.json_budget.used)
        self.decode_pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads, thread_name_prefix="decode", initializer=decode_init
        )
        self.similar = similar
        # One thread embeds and searches, one query at a time: a query is one photo, and the search
        # itself spreads over the thread's torch threads.
        self.similar_pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="similar", initializer=similar_init)
            if similar is not None
            else None
        )
        self.similar_pending = 0
        self.metrics.similar_index_size.set(similar.size if similar is not None else 0)
        self.ready = False
        self._show_model()

    def swap(self, model: PhotoClassifier, ref: ModelRef | None = None) -> None:
        """Serve `model` from the next request on; requests already running finish on the old one."""
        old, self.model = self.model, model
        if ref is not None:
            self.source = public_source(ref.requested)
        self.metrics.swaps.inc()
        self._show_model()
        log.info("now serving version %s (was %s)", model.version, old.version)

    def _show_model(self) -> None:
        m = self.model
        self.metrics.set_model(
            model=self.settings.model_name,
            version=m.version,
            source=self.source,
            device=str(m.device),
            precision=m.precision,
            runtime=m.runtime_name,
            threads=m.threads,
        )
