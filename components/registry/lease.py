"""A lease on a registered model, so two promotions of one model never interleave their alias moves.

Two pipelines finishing together each run `promote` for the same registered model. Without a lock,
both read @champion, both score for minutes, and both write: the last writer wins even if it is the
worse model, and @previous names a champion that never served next to it. The lease serialises them:

    the registered-model tag `promotion.lease` = {"owner": "<host>:<pid>:<uuid>", "expires": <unix s>}

1. Read the tag. Free (absent), expired (its holder died or stalled: a stale lease) or ours: write
   our lease. Held by a live owner: poll until it is released or expires, up to `wait` seconds, then
   fail with a clear message.
2. Wait `settle` seconds and read it again: ownership counts only if our owner string is still there.
3. While held, a thread renews the expiry every `seconds / 3`, so a long scoring keeps it and a
   crashed holder blocks others for at most `seconds`. `ensure_held` re-reads it right before the
   aliases move; `release` deletes it only if it is still ours.

MLflow has no compare-and-set: a tag write is an unconditional last-writer-wins update, and there is
no version number to condition it on. Two writers that both read "free" both write; the settle and
re-read make the later write win for both of them, as long as each writer's read and write happen
within `settle` of each other. The race left is a writer that reads "free", then stalls for more than
`settle` (one HTTP round trip normally takes milliseconds), then writes over a lease another promote
already confirmed. With settle = 1 s on a registry answering in milliseconds that window is negligible
for promotions that happen a few times a day. Expiry uses wall-clock time, so hosts' clocks must
agree to well within `seconds` (NTP does). The lease is advisory: it binds `promote` and `rollback`,
not someone moving aliases by hand, which is why promote re-reads @champion after scoring as well.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StepError

LEASE_TAG = "promotion.lease"
DEFAULT_LEASE_SECONDS = 300.0
DEFAULT_LEASE_WAIT = 1800.0
DEFAULT_SETTLE = 1.0
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    expires: float

    def to_json(self) -> str:
        return json.dumps({"owner": self.owner, "expires": round(self.expires, 3)})


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def read_lease(client, name: str) -> LeaseRecord | None:
    """The lease tag of NAME; an unreadable tag counts as a stale lease (expires 0)."""
    from .register import registered_model

    raw = (registered_model(client, name).tags or {}).get(LEASE_TAG)
    if not raw:
        return None
    try:
        body = json.loads(raw)
        return LeaseRecord(str(body["owner"]), float(body["expires"]))
    except (ValueError, KeyError, TypeError):
        return LeaseRecord(f"unreadable lease {raw[:60]!r}", 0.0)


class RegistryLease:
    """`with RegistryLease(...) as lease:` holds the lease on NAME for the block (see the module docstring)."""

    def __init__(
        self,
        client_factory: Callable[[], object],
        name: str,
        *,
        seconds: float = DEFAULT_LEASE_SECONDS,
        wait: float = DEFAULT_LEASE_WAIT,
        settle: float = DEFAULT_SETTLE,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        if seconds <= 3 * settle or seconds <= 0:
            raise StepError(
                f"--lease-seconds must exceed 3 × the settle time ({settle:g} s), got {seconds:g}"
            )
        if wait < 0:
            raise StepError(f"--lease-wait must be >= 0, got {wait:g}")
        if settle < 0:
            raise StepError(f"--lease-settle must be >= 0, got {settle:g}")
        self.client_factory, self.name = client_factory, name
        self.client = client_factory()
        self.seconds, self.wait, self.settle = seconds, wait, settle
        self.notify = notify or (lambda _message: None)
        self.owner = new_owner()
        self.notes: list[str] = []  # what happened on the way in: waits, stale takeovers
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -------------------------------------------------------------------------------- acquire

    def _write(self, client) -> None:
        record = LeaseRecord(self.owner, time.time() + self.seconds)
        client.set_registered_model_tag(self.name, LEASE_TAG, record.to_json())

    def acquire(self) -> None:
        started = time.monotonic()
        announced = None
        while True:
            current = read_lease(self.client, self.name)
            now = time.time()
            if current is None or current.expires <= now or current.owner == self.owner:
                self._write(self.client)
                time.sleep(self.settle)
                confirmed = read_lease(self.client, self.name)
                if confirmed is not None and confirmed.owner == self.owner:
                    if current is not None and current.owner != self.owner:
                        self.notes.append(
                            f"took over a stale promotion lease of {current.owner} "
                            f"(expired {max(0.0, now - current.expires):.0f} s before)"
                        )
                    if announced:
                        self.notes.append(
                            f"waited {time.monotonic() - started:.1f} s for the promotion lease held by {announced}"
                        )
                    break
                current = confirmed  # another promote wrote after us and won: wait for it
            waited = time.monotonic() - started
            if current is not None and current.owner != announced:
                announced = current.owner
                self.notify(
                    f"waiting for the promotion lease on {self.name} held by {current.owner} "
                    f"(expires in {max(0.0, current.expires - time.time()):.0f} s; waiting up to {self.wait:g} s)"
                )
            if waited >= self.wait:
                holder = current.owner if current else "another promote"
                raise StepError(
                    f"{self.name} is being promoted by {holder}: its promotion lease ({LEASE_TAG}) was still "
                    f"held after waiting {waited:.0f} s (--lease-wait {self.wait:g}); no alias moved. "
                    f"If that process is gone, its lease expires by itself, or delete the tag {LEASE_TAG}"
                )
            time.sleep(min(POLL_SECONDS * (0.5 + random.random()), max(0.05, self.wait - waited)))
        self._renewer = threading.Thread(target=self._renew, name="promotion-lease", daemon=True)
        self._renewer.start()

    # -------------------------------------------------------------------------------- hold

    def _renew(self) -> None:
        client = self.client_factory()  # a client of its own: the main thread keeps using self.client
        while not self._stop.wait(self.seconds / 3):
            try:
                current = read_lease(client, self.name)
                if current is None or current.owner != self.owner:
                    self.lost.set()
                    return
                self._write(client)
            except Exception:  # a failed renewal is retried; the next one still has 2/3 of the lease left
                continue

    def ensure_held(self) -> None:
        """Raise unless the lease is still ours (re-read from the registry)."""
        current = read_lease(self.client, self.name)
        if self.lost.is_set() or current is None or current.owner != self.owner:
            holder = current.owner if current else "nobody"
            raise StepError(
                f"lost the promotion lease on {self.name} (now held by {holder}; this process stalled past "
                f"--lease-seconds {self.seconds:g}): no alias moved"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        try:
            current = read_lease(self.client, self.name)
            if current is not None and current.owner == self.owner:
                self.client.delete_registered_model_tag(self.name, LEASE_TAG)
        except Exception:  # the lease then simply expires
            pass

    def __enter__(self) -> RegistryLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
