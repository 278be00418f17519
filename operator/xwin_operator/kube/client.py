"""The operator's thin I/O layer to the API server: exactly the Kubernetes API calls it makes.

* `KubeApi`: the API calls, made with the official client (`kubernetes`, its ApiClient: the
  login of kubeconfig.load_login, TLS, exec-plugin token refresh) in a pool of worker threads,
  so kopf's event loop never blocks: list children by label, create (409 Conflict = already
  there), delete (404 = already gone), suspend/resume a child, merge-patch an AlignmentRun's
  status through the status subresource, post an Event, tell whether a Secret exists (its
  reply is never read, so its data is never parsed, kept, logged or returned). Bodies are the
  manifests' plain dicts, sent as JSON: no conversion to the client's model classes. On a 401
  the login is loaded again (rotated tokens, a plugin's new token) and the call retried once.

Errors are `ApiError` (with `.transient` for 429/5xx/connection failures); a login that fails
is kubeconfig.LoginError. The store reads are store_reader.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..api.spec import API_GROUP, API_VERSION, PLURAL
from ..core.children import MANAGED_BY
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
# calls in flight at once (worker threads of the synchronous official client, and as many pooled
# connections): under a burst the API server serves its clients' requests in turn, so this is the
# operator's share of it (the aiohttp client it replaced kept 64 connections); an idle worker
# costs nothing but its stack
API_THREADS = 64
# status patches (bookkeeping: nobody waits on them to start work) run in a pool of their own, so
# under a burst of new runs a child's create never queues behind them for a thread (it did: 0.3 s
# p50 in the queue of one shared pool, 1000 runs at once, load 6); so do awaited Events
# (`post_event`, the benchmark's peer)
BULK_THREADS = 48
# Events are posted by threads of their own, each with its queue, fed without the event loop
# (`post_events`): nobody waits for an Event, so posting one costs kopf's loop nothing. Few: a
# posting thread holds the GIL while it encodes and sends, taking turns from the event loop. One
# thread posted 2000 Events about as fast as 16 against the test API server (730 and 790/s, the
# server in the same process); 4 keep one slow reply from holding up every run's Events
EVENT_THREADS = 4
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
    `threads` calls run at once (the client is synchronous), and beside them `bulk_threads`
    status patches (`bulk=True`), so creates, deletes and lookups never wait for a thread
    behind the bookkeeping; Events go to `event_threads` threads of their own (`post_events`)."""

    def __init__(self, login: Callable[[], Login], *, timeout: float = 30.0, threads: int = API_THREADS,
                 bulk_threads: int = BULK_THREADS, event_threads: int = EVENT_THREADS):
        self._login, self._timeout = login, timeout
        self._threads = threads + bulk_threads + event_threads
        self._client: Any = None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kube-api")
        self._bulk = ThreadPoolExecutor(bulk_threads, thread_name_prefix="kube-api-bulk")
        self._lock = threading.Lock()  # held while logging in
        self._event_queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(event_threads)]
        for i, q in enumerate(self._event_queues):  # idle until an Event comes (blocked on the queue)
            threading.Thread(target=self._post_forever, args=(q,), daemon=True, name=f"kube-api-events-{i}").start()

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._bulk.shutdown(wait=False, cancel_futures=True)
        for q in self._event_queues:
            q.put(None)
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
                      content_type: str = "application/json", *, reply: bool = True, bulk: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._bulk if bulk else self._pool, self._call, method, path, body,
                                              params, content_type, reply)
        except LoginError:
            raise
        except RuntimeError as e:  # the pool shut down: the operator is stopping
            raise ApiError(0, f"{method.upper()} {path}: {e}") from None

    # --- the calls ------------------------------------------------------------------------------
    async def list_children(self, namespace: str, run_name: str | None = None) -> list[dict]:
        """Every child of a run (or, with no run, of every run in the namespace), by its labels
        (xwin.ai/run and managed-by), all kinds."""
        selector = {"app.kubernetes.io/managed-by": MANAGED_BY}
        if run_name is not None:
            selector = {f"{API_GROUP}/run": run_name, **selector}
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        out: list[dict] = []
        for kind in CHILD_KINDS:
            try:
                data = await self.request("get", path_of(kind, namespace), params={"labelSelector": text})
            except ApiError as e:
                if e.status == 404:
                    continue  # its CRD is not installed (a launcher this cluster does not have)
                raise
            for item in data.get("items") or []:
                labels = (item.get("metadata") or {}).get("labels") or {}
                if all(labels.get(k) == v for k, v in selector.items()):
                    out.append({**item, "kind": kind})
        return out

    async def create(self, manifest: dict) -> bool:
        """Create; False when it already exists (409 Conflict)."""
        meta = manifest["metadata"]
        try:
            await self.request("post", path_of(manifest["kind"], meta["namespace"]), manifest, reply=False)
            return True
        except ApiError as e:
            if e.status == 409:
                return False
            raise

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (children of it go with it: background propagation); False if already gone."""
        try:
            await self.request("delete", path_of(kind, namespace, name), {"propagationPolicy": "Background"},
                               reply=False)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def set_suspended(self, kind: str, namespace: str, name: str, suspend: bool) -> None:
        patch = {"spec": {"runPolicy": {"suspend": suspend}}} if kind == "PyTorchJob" else {"spec": {"suspend": suspend}}  # Job, TrainJob
        try:
            await self.request("patch", path_of(kind, namespace, name), patch, content_type=MERGE_PATCH, reply=False)
        except ApiError as e:
            if e.status != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status_patch: dict) -> None:
        await self.request("patch", path_of("AlignmentRun", namespace, name, "status"),
                           {"status": status_patch}, content_type=MERGE_PATCH, reply=False, bulk=True)

    async def post_event(self, involved: dict, reason: str, message: str, type_: str = "Normal",
                         component: str = MANAGED_BY) -> None:
        """Post one Event and wait for it (`post_events` posts without waiting)."""
        ns = involved["namespace"]
        await self.request("post", path_of("Event", ns), _event(involved, reason, message, type_, component),
                           reply=False, bulk=True)

    def post_events(self, involved: dict, events: list[tuple[str, str, str]], component: str = MANAGED_BY) -> None:
        """Post Events (reason, message, type) on `involved` from the event threads, best effort
        (as Events are): returns at once, takes no lock, and the event loop is not involved at
        all (no task, no future, no callback). An object's Events are posted in the order given,
        across calls: they all go to the same thread (by uid). A failure is logged to EVENT_LOG
        and dropped."""
        index = zlib.crc32(str(involved.get("uid") or involved["name"]).encode()) % len(self._event_queues)
        self._event_queues[index].put((involved, events, component))

    def _post_forever(self, q: queue.SimpleQueue) -> None:
        while (item := q.get()) is not None:
            involved, events, component = item
            path, who = path_of("Event", involved["namespace"]), f"[{involved['namespace']}/{involved['name']}]"
            for reason, message, type_ in events:
                try:
                    self._call("post", path, _event(involved, reason, message, type_, component),
                               None, "application/json", False)
                except (ApiError, LoginError) as err:
                    EVENT_LOG.warning(f"{who} could not post Event {reason}: {err}")
                except Exception:  # noqa: BLE001 - a bug here must not end the thread (later Events)
                    EVENT_LOG.exception(f"{who} could not post Event {reason}")

    async def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict]:
        """The pods carrying every label of `labels` (a server Deployment's pods)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        data = await self.request("get", path_of("Pod", namespace), params={"labelSelector": selector})
        return list(data.get("items") or [])

    async def secret_exists(self, namespace: str, name: str) -> bool:
        try:
            await self.request("get", path_of("Secret", namespace, name), reply=False)  # its data is not even parsed
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise
