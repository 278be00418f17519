"""`Cluster`: a FakeApiServer (apiserver.py) on 127.0.0.1 in a background thread with its own
event loop, a small synchronous API for tests (create/get/list/patch/delete/history/wait_for),
and a kubeconfig for the operator process. Background tasks (the test kubelet) run on the same
loop.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import aiohttp.test_utils
import kmock

from .apiserver import BUILTIN_RESOURCES, FakeApiServer, now_iso
from .paths import VERBS, crd_resource, resource_path

class _TlsTestServer(aiohttp.test_utils.RawTestServer):
    """KMock's server over HTTPS."""

    def __init__(self, *args: Any, tls: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._tls = tls

    async def __aenter__(self) -> "_TlsTestServer":
        await self.start_server(loop=self._loop, ssl=self._tls)
        return self


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class Cluster:
    """A FakeApiServer on 127.0.0.1 in a background thread, with a synchronous API for tests."""

    def __init__(self, *, namespaces: tuple[str, ...] = ("default",), crds: tuple[dict, ...] = (),
                 keep_history: bool = True, port: int | None = None, tls: Any = None,
                 auth: Any = None, admin_token: str = "", work: Path | None = None,
                 without: tuple[str, ...] = ()):
        """`tls` (tls.Pki, with `work` for the server's key files): serve HTTPS; `auth`
        (tls.TokenAuth): refuse unauthenticated requests, the test's own client sending
        `admin_token`. `without`: built-in resources this cluster does not serve (a CRD not
        installed, e.g. `trainer.kubeflow.org/v1alpha1/trainjobs`)."""
        self.without = without
        self.namespaces, self.crds, self.keep_history, self._port = namespaces, crds, keep_history, port
        self.tls, self.auth, self.admin_token, self.work = tls, auth, admin_token, work
        self.loop = asyncio.new_event_loop()
        self.api: FakeApiServer | None = None
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fake-apiserver", daemon=True)
        self._error: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        self._thread.start()
        self._ready.wait(30)
        if self._error or not self.url:
            raise RuntimeError(f"the fake API server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        kwargs: dict[str, Any] = {"port": self._port} if self._port else {}
        if self.tls is not None:
            server_tls = self.tls.server_context(Path(self.work or ".") / "apiserver-tls")
            client_tls = self.tls.client_context()
            kwargs["server_cls"] = functools.partial(_TlsTestServer, tls=server_tls)
            headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
            kwargs["client_fct"] = lambda url: aiohttp.ClientSession(
                url, headers=headers, connector=aiohttp.TCPConnector(ssl=client_tls))
        async with FakeApiServer(keep_history=self.keep_history, authenticate=self.auth) as api, \
                kmock.Server(api, host="127.0.0.1", **kwargs) as srv:
            self.api = api
            self.url = str(srv.url).rstrip("/")
            for res, (kind, namespaced, subresources) in BUILTIN_RESOURCES.items():
                if res in self.without:
                    continue
                api.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                        subresources=set(subresources))
            for ns in self.namespaces:  # KMock cannot route /api/v1/namespaces: store them directly
                api.objects["v1/namespaces", None, ns] = {
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now_iso()}}
            for crd in self.crds:
                res, info = crd_resource(crd)
                api.resources[res] = kmock.ResourceInfo(**info)
                api.crds[res] = crd
                await self._request("post", resource_path("apiextensions.k8s.io/v1/customresourcedefinitions"), crd)
            self._ready.set()
            await self._stop.wait()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5) if tasks else None

    def kubeconfig_doc(self, user: dict | None = None, cluster: dict | None = None) -> dict:
        """A kubeconfig document pointing at this server; `user` (default: no auth) and extra
        `cluster` fields (certificate-authority-data, ...) as a kubeconfig holds them."""
        ca = {"certificate-authority-data": base64.b64encode(self.tls.ca).decode()} if self.tls else {}
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url, **ca, **(cluster or {})}}],
            "users": [{"name": "fake", "user": dict(user or {})}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespaces[0]}}],
        }

    def kubeconfig(self, path: str | Path, user: dict | None = None, cluster: dict | None = None) -> Path:
        """`kubeconfig_doc` written to `path`, for the operator process and kubectl."""
        path = Path(path)
        path.write_text(json.dumps(self.kubeconfig_doc(user, cluster)))
        return path

    # --- running things on the server's loop ------------------------------------------------
    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def spawn(self, fn: Callable[[], Awaitable[Any]]) -> "asyncio.Future[Any]":
        """Start a background task on the server's loop (cancelled when the cluster closes)."""
        async def start() -> asyncio.Task:
            return asyncio.ensure_future(fn())
        return self.call(start)

    async def _request(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        assert self.api is not None
        kwargs: dict[str, Any] = {"params": params} if params else {}
        if body is not None:
            kwargs["json"] = body
        async with self.api.request(method, path, **kwargs) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise ApiError(resp.status, data)
            return data

    # --- a synchronous API for test bodies ---------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        return self.call(lambda: self._request(method, path, body, params))

    def create(self, resource: str, obj: dict) -> dict:
        ns = obj.get("metadata", {}).get("namespace")
        return self.request("post", resource_path(resource, ns), obj)

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self.request("get", resource_path(resource, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, resource: str, namespace: str | None = None, labels: str | None = None) -> list[dict]:
        params = {"labelSelector": labels} if labels else None
        return self.request("get", resource_path(resource, namespace), params=params)["items"]

    def patch(self, resource: str, namespace: str | None, name: str, patch: dict,
              subresource: str | None = None) -> dict:
        return self.request("patch", resource_path(resource, namespace, name, subresource), patch)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        self.request("delete", resource_path(resource, namespace, name))

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict | None]:
        """Every stored version of an object (None marks a deletion), oldest first."""
        def read() -> list:
            assert self.api is not None
            key = (kmock.resource(resource), namespace, name)
            if key not in self.api.objects:
                return []
            return [None if v is None else copy.deepcopy(dict(v.raw if hasattr(v, "raw") else v))
                    for v in self.api.objects[key].history]
        async def run() -> list:
            return read()
        return self.call(run)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)
