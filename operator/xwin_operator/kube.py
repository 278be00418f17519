"""The operator's thin I/O layer: exactly the Kubernetes API calls and store reads it makes.

* `KubeApi` (aiohttp, async): list children by label, create (409 Conflict = already there),
  delete (404 = already gone), suspend/resume a child, merge-patch an AlignmentRun's status
  through the status subresource, post an Event, tell whether a Secret exists (its data is
  read by the API but never kept, logged or returned).
* `StoreReader`: the stages' `_SUCCESS.json` markers and the existence of external inputs,
  read with xwin_jobs' Store in worker threads (boto3 is synchronous). Credentials come from
  the operator's own environment; the endpoint from the run's `storage.endpoint`.

Errors are `ApiError` (with `.transient` for 429/5xx/connection failures) and xwin_jobs'
`StoreError`; the handlers turn them into kopf's TemporaryError.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from .builders import MANAGED_BY
from .spec import API_GROUP, API_VERSION, PLURAL

# kind -> (group/version, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "PyTorchJob": ("kubeflow.org/v1", "pytorchjobs"),
    "Job": ("batch/v1", "jobs"),
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "Secret": ("v1", "secrets"),
    "Event": ("v1", "events"),
    "AlignmentRun": (f"{API_GROUP}/{API_VERSION}", PLURAL),
}
CHILD_KINDS = ("PyTorchJob", "Job", "Deployment", "Service")
MERGE_PATCH = "application/merge-patch+json"


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


@dataclass
class Connection:
    """Where the API is and how to authenticate: built from kopf's ConnectionInfo."""

    server: str
    headers: dict[str, str] = field(default_factory=dict)
    ssl: ssl.SSLContext | bool = True

    @classmethod
    def from_info(cls, info: Any) -> "Connection":
        headers: dict[str, str] = {}
        if getattr(info, "token", None):
            headers["Authorization"] = f"{getattr(info, 'scheme', None) or 'Bearer'} {info.token}"
        elif getattr(info, "username", None):
            auth = aiohttp.BasicAuth(info.username, info.password or "")
            headers["Authorization"] = auth.encode()
        context: ssl.SSLContext | bool = True
        if info.server.startswith("https"):
            if getattr(info, "insecure", False):
                context = False
            else:
                context = ssl.create_default_context(cafile=info.ca_path or None,
                                                     cadata=_text(info.ca_data))
                if info.certificate_path or info.certificate_data:
                    context.load_cert_chain(*_cert_files(info))
        return cls(server=info.server.rstrip("/"), headers=headers, ssl=context)


def _text(data: str | bytes | None) -> str | None:
    return data.decode() if isinstance(data, bytes) else data


def _cert_files(info: Any) -> tuple[str, str | None]:
    import tempfile

    def path(p: Any, data: Any, suffix: str) -> str | None:
        if p:
            return str(p)
        if not data:
            return None
        f = tempfile.NamedTemporaryFile("wb", suffix=suffix, delete=False)
        f.write(data if isinstance(data, bytes) else data.encode())
        f.close()
        return f.name

    cert = path(info.certificate_path, info.certificate_data, ".crt")
    assert cert is not None
    return cert, path(info.private_key_path, info.private_key_data, ".key")


class KubeApi:
    """The API calls of the handlers. `connect()` (re)builds the Connection: called lazily
    and again once after a 401 (rotated service-account tokens)."""

    def __init__(self, connect: Callable[[], Connection], *, timeout: float = 30.0, limit: int = 64):
        self._connect, self._timeout, self._limit = connect, timeout, limit
        self._conn: Connection | None = None
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                      content_type: str = "application/json", *, reply: bool = True) -> Any:
        """The decoded JSON reply (None with reply=False: the body of a success is not even
        parsed; an error's still is, for its message)."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect()
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self._limit),
                    timeout=aiohttp.ClientTimeout(total=self._timeout))
            headers = {**self._conn.headers, "Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = content_type
            try:
                async with self._session.request(method, self._conn.server + path, json=body, params=params,
                                                 headers=headers, ssl=self._conn.ssl) as resp:
                    if resp.status < 400 and not reply:
                        await resp.read()  # drained, so the connection is reused
                        return None
                    data = await resp.json(content_type=None) if resp.content_length != 0 else None
                    if resp.status == 401 and attempt == 1:
                        self._conn = None
                        continue
                    if resp.status >= 400:
                        d = data if isinstance(data, dict) else {}
                        raise ApiError(resp.status, str(d.get("message") or resp.reason), str(d.get("reason") or ""))
                    return data
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                raise ApiError(0, f"{method.upper()} {path}: {type(e).__name__}: {e}") from None
        raise ApiError(401, "unauthorized", "Unauthorized")

    # --- the calls ------------------------------------------------------------------------------
    async def list_children(self, namespace: str, run_name: str) -> list[dict]:
        """Every child of a run, by its labels (xwin.ai/run and managed-by), all kinds."""
        selector = {f"{API_GROUP}/run": run_name, "app.kubernetes.io/managed-by": MANAGED_BY}
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        out: list[dict] = []
        for kind in CHILD_KINDS:
            data = await self.request("get", path_of(kind, namespace), params={"labelSelector": text})
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
        patch = {"spec": {"runPolicy": {"suspend": suspend}}} if kind == "PyTorchJob" else {"spec": {"suspend": suspend}}
        try:
            await self.request("patch", path_of(kind, namespace, name), patch, content_type=MERGE_PATCH, reply=False)
        except ApiError as e:
            if e.status != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status_patch: dict) -> None:
        await self.request("patch", path_of("AlignmentRun", namespace, name, "status"),
                           {"status": status_patch}, content_type=MERGE_PATCH, reply=False)

    async def post_event(self, involved: dict, reason: str, message: str, type_: str = "Normal",
                         component: str = MANAGED_BY) -> None:
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        ns = involved["namespace"]
        await self.request("post", path_of("Event", ns), {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": ns},
            "involvedObject": involved, "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": component}, "reportingComponent": component,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}, reply=False)

    async def secret_exists(self, namespace: str, name: str) -> bool:
        try:
            await self.request("get", path_of("Secret", namespace, name), reply=False)  # its data is not even parsed
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise


class StoreReader:
    """Markers and input existence, through xwin_jobs.store.Store (one per endpoint)."""

    def __init__(self) -> None:
        self._stores: dict[str | None, Any] = {}
        self._seen_inputs: set[str] = set()   # inputs found once are not probed again

    def store(self, endpoint: str | None) -> Any:
        if endpoint not in self._stores:
            from xwin_jobs.store import Store

            self._stores[endpoint] = Store(endpoint_url=endpoint)
        return self._stores[endpoint]

    async def markers(self, endpoint: str | None, stage_uris: dict[str, str]) -> dict[str, dict | None]:
        from xwin_jobs.store import read_marker

        store = self.store(endpoint)

        def read_all() -> dict[str, dict | None]:
            return {stage: read_marker(store, uri) for stage, uri in stage_uris.items()}
        if all(uri.startswith("file://") for uri in stage_uris.values()):
            return read_all()  # local files: cheaper than a hop to a worker thread
        return await asyncio.to_thread(read_all)

    async def missing(self, endpoint: str | None, uris: list[str]) -> list[str]:
        """The s3:// URIs among `uris` with nothing at or under them. Only s3:// is probed: the
        operator cannot see the pods' file systems, and hf:// is resolved by the pods."""
        store = self.store(endpoint)

        def exists(uri: str) -> bool:
            return store.exists(uri) or (not uri.endswith("/") and store.exists(uri + "/"))

        todo = [u for u in dict.fromkeys(uris) if u not in self._seen_inputs and u.startswith("s3://")]
        found = await asyncio.gather(*(asyncio.to_thread(exists, u) for u in todo))
        self._seen_inputs.update(u for u, ok in zip(todo, found) if ok)
        return [u for u, ok in zip(todo, found) if not ok]
