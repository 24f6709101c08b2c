"""Rollback: @champion back to @previous, under the same lease as promote (lease.py).

@previous is removed afterwards, so a second rollback is a clear error instead of a flip back to the
version just rolled away from.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from ..errors import StepError
from .lease import DEFAULT_LEASE_WAIT, DEFAULT_SETTLE, RegistryLease
from .register import CHAMPION, PREVIOUS, aliases, connect


@dataclass
class RollbackResult:
    name: str
    restored_version: str  # @champion now
    replaced_version: str | None  # the champion that was rolled back


def rollback(
    name: str,
    *,
    tracking_uri: str | None = None,
    lease_wait: float = DEFAULT_LEASE_WAIT,
    lease_settle: float = DEFAULT_SETTLE,
) -> RollbackResult:
    """@champion back to @previous. @previous is then removed, so a second rollback is an error
    rather than a flip back to the version just rolled away from (which stays tagged and reachable
    as models:/NAME/<version>). It holds the promotion lease, so it never interleaves with a promote."""
    client, uri = connect(tracking_uri)
    with RegistryLease(lambda: connect(uri)[0], name, wait=lease_wait, settle=lease_settle):
        return _rollback(client, name)


def _rollback(client, name: str) -> RollbackResult:
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
