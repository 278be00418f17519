"""`xwin status NAME`: one AlignmentRun read from the cluster with the operator's own login
(kubeconfig.load_login: in-cluster service account, else $KUBECONFIG or ~/.kube/config, as
kubectl reads them) through the official client, one GET. Every failure is a `RunReadError`
whose message is one line naming the run and the cause (never a credential)."""

from __future__ import annotations

import json
from typing import Any

from .client import _error_of, _send, path_of
from .kubeconfig import LoginError, MemFiles, load_login


class RunReadError(Exception):
    """The run could not be read: the message says which run and why, in one line."""


def get_run(name: str, namespace: str | None = None, *, kubeconfig: str | None = None,
            context: str | None = None, timeout: float = 15.0) -> tuple[dict[str, Any], str]:
    """(the AlignmentRun object, its namespace). `namespace` defaults to the context's
    namespace, else "default", as kubectl's."""
    import urllib3
    from kubernetes.client import ApiClient
    from kubernetes.client.exceptions import ApiException

    try:
        login = load_login(MemFiles(), kubeconfig, context)
    except LoginError as e:
        raise RunReadError(f"cannot log in to read AlignmentRun {name}: {e}") from None
    namespace = namespace or login.namespace or "default"
    what = f"AlignmentRun {namespace}/{name}"
    login.configuration.retries = 1   # an unreachable server is said at once, not after 3 tries
    client = ApiClient(login.configuration)
    try:
        resp = _send(client, "get", path_of("AlignmentRun", namespace, name), timeout=timeout)
        data = resp.read()
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise RunReadError(f"cannot read {what} from {login.configuration.host}: "
                           f"{type(e).__name__}: {_first_line(reason)}") from None
    finally:
        client.close()
    if resp.status == 404:
        raise RunReadError(f"{what} not found ({login.source})")
    if resp.status >= 400:
        err = _error_of(resp.status, resp.reason or "", data)
        raise RunReadError(f"cannot read {what} ({login.source}): {err}")
    try:
        obj = json.loads(data)
    except ValueError:
        raise RunReadError(f"cannot read {what}: the API server's answer is not JSON") from None
    if not isinstance(obj, dict):
        raise RunReadError(f"cannot read {what}: the API server's answer is not an object")
    return obj, namespace


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
