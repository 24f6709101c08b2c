"""What the deploy step and cluster training share when they talk to the Kubernetes API.

The deploy step and the train launcher make their API client here; no module outside cluster/ imports
the Kubernetes client (tests/test_layout.py checks it).

An API client from the pod's service account or kubeconfig, what an API error says (its HTTP status
and the API server's own message), and polling an object until it is done or a deadline passes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from ..errors import StepError

REQUEST_TIMEOUT_S = 30  # one API call; a watch as a whole is bounded by its own timeout


def kube_api_client():
    """An API client from the pod's service account when running in a cluster, else from kubeconfig."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass  # a KUBERNETES_SERVICE_HOST without a service account token: try kubeconfig
    try:
        # KUBECONFIG is read now, not when the kubernetes package was imported (it may be a:b:c list).
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG") or None)
    except (config.ConfigException, OSError) as exc:
        raise StepError(
            f"no Kubernetes credentials: not in a pod with a service account, and no usable kubeconfig ({exc})"
        ) from exc


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an API error; None when no answer came (network, timeout)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and status > 0 else None


def status_message(exc: BaseException) -> str | None:
    """The `message` of the Status object in an API error's body ("" when it has none); None when the body is not one."""
    body = getattr(exc, "body", None)
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (TypeError, ValueError):
        return None
    return str(parsed.get("message") or "") if isinstance(parsed, dict) else None


def api_message(exc: BaseException) -> str:
    """One line for an API error: status and the API server's own message when there is one."""
    status = http_status(exc)
    if status is not None:
        message = status_message(exc)
        if message:
            return f"{status} {message}"
        return f"{status} {getattr(exc, 'reason', '') or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


def poll_until(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    poll_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Call `check` every `poll_s` until it returns True (then True) or `timeout_s` has passed (then False).

    `check` runs at least once, and the last sleep ends at the deadline, not after it.
    """
    deadline = clock() + timeout_s
    while True:
        if check():
            return True
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        sleep(max(0.0, min(poll_s, remaining)))
