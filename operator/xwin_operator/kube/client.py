"""The operator's thin I/O layer to the API server: exactly the Kubernetes API calls it makes.

* `KubeApi`: the API calls, made with the official client (`kubernetes`, its ApiClient: the
  login of kubeconfig.load_login, TLS, exec-plugin token refresh) in a small pool of worker
  threads, so kopf's event loop never blocks: create (409 Conflict = already there), delete
  (404 = already gone), suspend/resume or stop a child, merge-patch an AlignmentRun's status
  through the status subresource, post Events, read the one Secret the operator itself uses
  (a run's store key) and tell whether another exists (its reply is never read). Bodies are
  the manifests' plain dicts, sent as JSON. On a 401 the login is loaded again (rotated
  tokens, a plugin's new token) and the call retried once. Reads of children, pods and Kueue
  Workloads are not here: kopf's indexes hold them (handlers.py).

Errors are `ApiError` (with `.transient` for 429/5xx/connection failures); a login that fails
is kubeconfig.LoginError. Each failed call (not the statuses a call takes as an answer: 409 on
create, 404 on delete or a read) is reported to `on_error(verb, status)` (metrics.py). The
store reads are store_reader.py's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..api.spec import API_GROUP, API_VERSION, PLURAL
from ..core.children import ANNOTATION_FAILED, ANNOTATION_SUSPENDED, MANAGED_BY
from ..core.types import now_iso
from .kubeconfig import Login, LoginError

# kind -> (group/version, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "PyTorchJob": ("kubeflow.org/v1", "pytorchjobs"),
    "TrainJob": ("trainer.kubeflow.org/v1alpha1", "trainjobs"),
    "Job": ("batch/v1", "jobs"),
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "Pod": ("v1", "pods"),
    "Secret": ("v1", "secrets"),
    "Event": ("v1", "events"),
    "AlignmentRun": (f"{API_GROUP}/{API_VERSION}", PLURAL),
}
CHILD_KINDS = ("PyTorchJob", "TrainJob", "Job", "Deployment", "Service")
MERGE_PATCH = "application/merge-patch+json"
API_THREADS = 8  # calls in flight at once (the official client is synchronous)
EVENT_LOG = logging.getLogger("xwin_operator.events")  # Events that could not be posted


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status, self.reason, self.message = status, reason, message

    @property
    def transient(self) -> bool:
        return self.status in (0, 408, 429) or self.status >= 500


def path_of(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    group_version, plural = RESOURCES[kind]
    path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path += f"/namespaces/{namespace}" if namespace else ""
    path += f"/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")
    return path


def _error_of(status: int, reason: str, data: bytes | None) -> ApiError:
    try:
        d = json.loads(data) if data else {}
    except ValueError:
        d = {}
    d = d if isinstance(d, dict) else {}
    return ApiError(status, str(d.get("message") or reason or ""), str(d.get("reason") or reason or ""))


def _send(client: Any, method: str, path: str, *, body: Any = None, params: dict | None = None,
          content_type: str = "application/json", timeout: float = 30.0) -> Any:
    """One request through the official ApiClient (its auth, token refresh and TLS): the
    client's RESTResponse, whatever its status."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    # the body is left out of param_serialize: its sanitize_for_serialization walks every value
    # of a body to convert the client's model classes and dates, and ours are plain JSON dicts
    # (the builders'), so it would only copy them; the client's RESTClient json-encodes them
    method, url, headers, _, post_params = client.param_serialize(
        method=method.upper(), resource_path=path, query_params=list((params or {}).items()),
        header_params=headers, auth_settings=["BearerToken"])
    return client.call_api(method, url, headers, body, post_params, _request_timeout=timeout)


def suspend_patch(kind: str, suspend: bool, annotations: dict[str, str | None]) -> dict:
    """The merge patch (un)suspending a child of `kind` (PyTorchJob: spec.runPolicy.suspend;
    Job, TrainJob: spec.suspend) and setting `annotations` (None removes one)."""
    spec = {"runPolicy": {"suspend": suspend}} if kind == "PyTorchJob" else {"suspend": suspend}
    return {"metadata": {"annotations": annotations}, "spec": spec}


def verify_login(login: Login, timeout: float = 10.0) -> None:
    """Raise LoginError when the API server refuses `login`'s credentials (401 on GET /api),
    so a login that cannot work is reported (and retried) instead of handed to kopf, which
    exits once every credential it was given has been refused. Unreachable: left to the caller."""
    import urllib3
    from kubernetes.client import ApiClient
    from kubernetes.client.exceptions import ApiException

    client = ApiClient(login.configuration)
    try:
        resp = _send(client, "get", "/api", timeout=timeout)
        resp.read()
    except (ApiException, urllib3.exceptions.HTTPError, OSError):
        return
    finally:
        client.close()
    if resp.status == 401:
        raise LoginError(f"{login.source}: the API server refused the credentials (401 Unauthorized): the token "
                         "expired and could not be refreshed, or the user or certificate is unknown to the cluster")


def _event(involved: dict, reason: str, message: str, type_: str, component: str) -> dict:
    now = now_iso()
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": involved["namespace"]},
            "involvedObject": involved, "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": component}, "reportingComponent": component,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}


class KubeApi:
    """The API calls of the handlers, through the official client. `login()` gives a
    kubeconfig.Login: called lazily, and again after a 401 (rotated or expired credentials).
    `threads` calls run at once. `on_error(verb, status)` hears of each call that failed (status
    0: no connection; "login": no login could be loaded)."""

    def __init__(self, login: Callable[[], Login], *, timeout: float = 30.0, threads: int = API_THREADS,
                 on_error: Callable[[str, int | str], None] | None = None):
        self._login, self._timeout, self._threads = login, timeout, threads
        self._on_error = on_error
        self._client: Any = None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kube-api")
        self._lock = threading.Lock()  # held while logging in

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
            self._client = None

    def _api_client(self) -> Any:
        with self._lock:  # one login, however many threads ask at once
            if self._client is None:
                from kubernetes.client import ApiClient

                cfg = self._login().configuration
                cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, self._threads)
                self._client = ApiClient(cfg)
            return self._client

    def _call(self, method: str, path: str, body: Any, params: dict | None, content_type: str,
              reply: bool) -> Any:
        """One request in a worker thread: the decoded JSON reply, or None with reply=False (the
        body of a success is then not even read; an error's is, for its message)."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        for attempt in (1, 2):
            client = self._api_client()
            try:
                resp = _send(client, method, path, body=body, params=params, content_type=content_type,
                             timeout=self._timeout)
            except ApiException as e:
                raise ApiError(int(e.status or 0), f"{method.upper()} {path}: {e.reason}") from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise ApiError(0, f"{method.upper()} {path}: {type(e).__name__}: {e}") from None
            if resp.status == 401 and attempt == 1:
                resp.read()
                self._client = None   # log in again: a new token, a rotated certificate
                continue
            if resp.status >= 400:
                return self._raise(resp)
            if not reply:
                resp.response.drain_conn()
                resp.response.release_conn()
                return None
            data = resp.read()
            return json.loads(data) if data else None
        raise ApiError(401, "unauthorized", "Unauthorized")

    @staticmethod
    def _raise(resp: Any) -> None:
        error = _error_of(resp.status, resp.reason, resp.read())
        if resp.status == 401:
            error.message = ("the API server refused the credentials (401 Unauthorized), also after logging "
                             "in again: the token expired and could not be refreshed, or the user is unknown")
        raise error

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", *, reply: bool = True, ok: tuple[int, ...] = ()) -> Any:
        """One call; an ApiError whose status is in `ok` is still raised, but is no failure (on_error)."""
        loop = asyncio.get_running_loop()
        try:
            try:
                return await loop.run_in_executor(self._pool, self._call, method, path, body, params, content_type,
                                                  reply)
            except RuntimeError as e:  # the pool shut down: the operator is stopping
                raise ApiError(0, f"{method.upper()} {path}: {e}") from None
        except ApiError as e:
            if e.status not in ok and self._on_error is not None:
                self._on_error(method, e.status)
            raise
        except LoginError:
            if self._on_error is not None:
                self._on_error(method, "login")
            raise

    # --- the calls ------------------------------------------------------------------------------
    async def create(self, manifest: dict) -> bool:
        """Create; False when it already exists (409 Conflict)."""
        meta = manifest["metadata"]
        try:
            await self.request("post", path_of(manifest["kind"], meta["namespace"]), manifest, reply=False,
                               ok=(409,))
            return True
        except ApiError as e:
            if e.status == 409:
                return False
            raise

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (children of it go with it: background propagation); False if already gone."""
        try:
            await self.request("delete", path_of(kind, namespace, name), {"propagationPolicy": "Background"},
                               reply=False, ok=(404,))
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def set_suspended(self, kind: str, namespace: str, name: str, suspend: bool) -> None:
        """Suspend or resume a child, marking it as suspended by the operator (or unmarking it):
        only a child it suspended itself is ever resumed by it (Kueue holds the others)."""
        await self._patch_child(kind, namespace, name, suspend_patch(kind, suspend, {
            ANNOTATION_SUSPENDED: MANAGED_BY if suspend else None}))

    async def fail_child(self, kind: str, namespace: str, name: str, reason: str, message: str) -> None:
        """Stop a child that never started and mark it failed (annotation `xwin.ai/failed`):
        a Deployment is scaled to 0, anything else suspended (its pods deleted by its
        controller, its object kept as its attempt's record)."""
        mark = {ANNOTATION_FAILED: json.dumps({"reason": reason, "message": message, "at": now_iso()})}
        patch = ({"metadata": {"annotations": mark}, "spec": {"replicas": 0}} if kind == "Deployment"
                 else suspend_patch(kind, True, mark))
        await self._patch_child(kind, namespace, name, patch)

    async def _patch_child(self, kind: str, namespace: str, name: str, patch: dict) -> None:
        try:
            await self.request("patch", path_of(kind, namespace, name), patch, content_type=MERGE_PATCH, reply=False,
                               ok=(404,))
        except ApiError as e:
            if e.status != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status_patch: dict) -> None:
        await self.request("patch", path_of("AlignmentRun", namespace, name, "status"),
                           {"status": status_patch}, content_type=MERGE_PATCH, reply=False)

    async def post_event(self, involved: dict, reason: str, message: str, type_: str = "Normal",
                         component: str = MANAGED_BY) -> None:
        """Post one Event and wait for it."""
        await self.request("post", path_of("Event", involved["namespace"]),
                           _event(involved, reason, message, type_, component), reply=False)

    async def post_events(self, involved: dict, events: list[tuple[str, str, str]],
                          component: str = MANAGED_BY) -> None:
        """Post Events (reason, message, type) on `involved` in order, best effort (as Events
        are): one that cannot be posted is logged to EVENT_LOG and the rest still go."""
        who = f"[{involved['namespace']}/{involved['name']}]"
        for reason, message, type_ in events:
            try:
                await self.post_event(involved, reason, message, type_, component)
            except (ApiError, LoginError) as err:
                EVENT_LOG.warning(f"{who} could not post Event {reason}: {err}")

    async def read_secret(self, namespace: str, name: str) -> tuple[str, dict[str, str]] | None:
        """(resourceVersion, its data decoded) of a Secret, or None when it does not exist. Only
        for a Secret the operator itself must use (a run's store key): never logged or kept
        beyond the caller's cache."""
        try:
            body = await self.request("get", path_of("Secret", namespace, name), ok=(404,))
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (body.get("data") or {}).items()}
        data.update(body.get("stringData") or {})
        return str((body.get("metadata") or {}).get("resourceVersion", "")), data

    async def secret_exists(self, namespace: str, name: str) -> bool:
        try:
            await self.request("get", path_of("Secret", namespace, name), reply=False, ok=(404,))  # data not even parsed
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise
