"""The fake Kubernetes API server: KMock's emulator plus what a real API server adds.

KMock (`kmock.KubernetesEmulator`) stores objects and serves list/watch/create/patch/delete over
HTTP, so kopf runs against it unchanged. It is a database over HTTP; a real API server also
stamps `uid`, `resourceVersion`, `creationTimestamp` and `generation`, honours `labelSelector`,
keeps `status` behind the status subresource (and the rest out of it), names `generateName`
objects, marks objects with finalizers for deletion instead of deleting them, answers a failed
JSON-patch `test` with 422, lists namespaces, and garbage-collects objects whose owner is gone.
`FakeApiServer` adds exactly those, and serves plain requests without KMock's reaction DSL
when a test defined no reaction of its own (most of KMock's time per request).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import time
import uuid
from typing import Any

import aiohttp.web
import attrs
import kmock

from . import kubectl_api
from .paths import NAMESPACES_PATH, RESOURCE_PATH, resource_key
from .selectors import _pointer, field_selector_matches, merge_patch, parse_selector, selector_matches  # noqa: F401

# resource -> (kind, namespaced, subresources): the built-in kinds the operator touches.
BUILTIN_RESOURCES: dict[str, tuple[str, bool, frozenset[str]]] = {
    "v1/namespaces": ("Namespace", False, frozenset({"status"})),
    "v1/events": ("Event", True, frozenset()),
    "v1/secrets": ("Secret", True, frozenset()),
    "v1/services": ("Service", True, frozenset({"status"})),
    "v1/pods": ("Pod", True, frozenset({"status"})),
    "apps/v1/deployments": ("Deployment", True, frozenset({"status", "scale"})),
    "batch/v1/jobs": ("Job", True, frozenset({"status"})),
    "kubeflow.org/v1/pytorchjobs": ("PyTorchJob", True, frozenset({"status"})),
    "trainer.kubeflow.org/v1alpha1/trainjobs": ("TrainJob", True, frozenset({"status"})),
    "kueue.x-k8s.io/v1beta1/workloads": ("Workload", True, frozenset({"status"})),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, frozenset({"status"})),
}
_FAST_ACTIONS = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE, kmock.action.FETCH,
                 kmock.action.LIST)


@attrs.define
class _WatchRequest:
    """What FakeApiServer._serve_watch reads of a request."""

    params: dict
    resource: Any
    namespace: str | None
    name: str | None


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class FakeApiServer(kmock.KubernetesEmulator):
    """KMock's emulator with the API-server behaviours listed in the module docstring.

    keep_history=False keeps only the latest version of each object and forgets served
    requests: for long benchmarks, where KMock's assertion history would grow without bound.
    """

    keep_history: bool = True
    on_write: Any = None  # on_write(request, time.monotonic()) after each create/patch/delete (benchmarks)
    # authenticate(Authorization header, verified client certificate or None) -> bool; None: no auth
    authenticate: Any = None
    crds: dict = attrs.field(factory=dict)  # "group/version/plural" -> CRD (validation, tables, OpenAPI)
    # mutating admission: hook("group/version/plural", body) may change a body being created
    # (a webhook's patch, e.g. Kueue suspending a job of a queue), as the API server applies them
    admission: list = attrs.field(factory=list)
    _owned: dict = attrs.field(factory=dict, init=False)  # owner uid -> {object keys}
    _gone: set = attrs.field(factory=set, init=False)     # uids of deleted objects
    _builtin_reactions: int | None = attrs.field(default=None, init=False)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _last_version: int = attrs.field(default=0, init=False)

    def _next_version(self) -> str:
        self._last_version = next(self._versions)
        return str(self._last_version)

    def _current(self, request: kmock.Request) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        if key in self._objects and not self._objects[key].deleted:
            return self._objects[key].raw
        return None

    def _has_status(self, resource: Any) -> bool:
        return resource in self._resources and "status" in self._resources[resource].subresources

    def _stamp(self, request: kmock.Request) -> None:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_version(),
                        creationTimestamp=now_iso(), generation=1)
            if self._has_status(request.resource):
                data.pop("status", None)
        elif request.action == kmock.action.UPDATE and request.name is not None:
            current = self._current(request) or {}
            if isinstance(data, list):  # JSON patch; a failed `test` is 422 as on a real server
                for op in data:
                    if isinstance(op, dict) and op.get("op") == "test" and \
                            _pointer(current, op.get("path", "")) != op.get("value"):
                        raise kmock.KubernetesError(status=422, reason="Invalid",
                                                    message=f"the test of {op.get('path')} failed")
                data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": self._next_version()})
                return
            if not isinstance(data, dict):
                return
            if self._has_status(request.resource):
                if request.subresource == "status":
                    for key in list(data):
                        if key not in ("status", "metadata"):
                            data.pop(key)
                    data["metadata"] = {}
                else:
                    data.pop("status", None)
            meta = data.setdefault("metadata", {}) or {}
            data["metadata"] = meta
            for key in ("uid", "creationTimestamp", "generation", "name", "namespace"):
                meta.pop(key, None)
            meta["resourceVersion"] = self._next_version()
            if request.subresource is None and "spec" in data:
                new_spec = merge_patch(current.get("spec"), data["spec"])
                if new_spec != current.get("spec"):
                    meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if self.authenticate is not None:
            transport = raw_request.transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            if not self.authenticate(raw_request.headers.get("Authorization"), peercert or None):
                return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                  "message": "Unauthorized", "reason": "Unauthorized",
                                                  "code": 401}, status=401)
        path = raw_request.path.rstrip("/") or "/"
        served = self._serve_for_kubectl(path)
        if served is not None:
            return served
        match = NAMESPACES_PATH.match(raw_request.path)
        if match:  # KMock's path parser takes `/api/v1/namespaces` for a namespace prefix
            response = await self._serve_namespaces(raw_request, match.group(1))
        elif raw_request.method == "GET" and raw_request.query.get("watch") in ("true", "1") \
                and RESOURCE_PATH.match(path) and self._only_builtin_reactions():
            response = await self._serve_json_watch(raw_request, path)
        else:
            response = await super().__call__(raw_request)
        if raw_request.method == "GET" and kubectl_api.wants_table(raw_request.headers.get("Accept")) \
                and raw_request.query.get("watch") != "true" and isinstance(response, aiohttp.web.Response) \
                and response.status == 200 and response.body:
            data = json.loads(response.body)
            items = data.get("items") if "items" in data else [data]
            crd = self.crds.get(resource_key(path))
            return aiohttp.web.json_response(kubectl_api.table(items, crd, str(self._last_version)))
        return response

    async def _serve_json_watch(self, raw_request: aiohttp.web.BaseRequest, path: str) -> aiohttp.web.StreamResponse:
        """A watch stream as a real server sends it: `Content-Type: application/json` (KMock's
        is octet-stream, which kubectl refuses), one event per line, each object a one-row
        Table when the client asks for Tables (`kubectl get -w`), closed after timeoutSeconds."""
        m = RESOURCE_PATH.match(path)
        assert m is not None
        key = resource_key(path)
        request = _WatchRequest(params=dict(raw_request.query), resource=kmock.resource(key),
                                namespace=m.group(4), name=None)
        if request.resource not in self._resources:
            return aiohttp.web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        as_table, crd = kubectl_api.wants_table(raw_request.headers.get("Accept")), self.crds.get(key)
        fields = raw_request.query.get("fieldSelector")
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)

        async def stream() -> None:
            async for event in self._serve_watch(request):
                if not event or not field_selector_matches(fields, event.get("object") or {}):
                    continue
                obj = kubectl_api.table([event["object"]], crd, str(self._last_version)) if as_table else event["object"]
                await response.write(json.dumps({"type": event["type"], "object": obj}).encode() + b"\n")
        try:
            await asyncio.wait_for(stream(), timeout=float(raw_request.query.get("timeoutSeconds") or 3600))
        except (asyncio.TimeoutError, ConnectionError):
            pass
        return response

    def _serve_for_kubectl(self, path: str) -> aiohttp.web.Response | None:
        """/version, discovery of one group-version, OpenAPI v3 (kubectl_api.py)."""
        served = kubectl_api.serve_document(path, self.crds, self._resources)
        return None if served is None else aiohttp.web.json_response(served[1], status=served[0])

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest, name: str | None):
        items = [obj.raw for (res, _ns, n), obj in self._objects.items()
                 if res == kmock.resource("v1/namespaces") and not obj.deleted and (name is None or n == name)]
        if name is not None:
            if not items:
                return aiohttp.web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            return aiohttp.web.json_response(items[0])
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response({"kind": "NamespaceList", "apiVersion": "v1", "items": items,
                                              "metadata": {"resourceVersion": str(self._last_version)}})
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        await asyncio.sleep(float(raw_request.query.get("timeoutSeconds", 3600)))
        return response

    async def _handle(self, request: kmock.Request):  # type: ignore[override]
        uid = None
        if request.resource is not None and request.resource.plural and request.resource not in self._resources:
            # a real API server serves only the kinds it knows (a CRD not installed: 404)
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message="the server could not find the requested resource")
        if request.action == kmock.action.DELETE and request.name is not None:
            obj = self._stored(request)
            meta = obj.raw.get("metadata", {}) if obj is not None and not obj.deleted else {}
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                # marked for deletion, as a new version (KMock keeps the old resourceVersion)
                async with self._lock:
                    obj.patch({"metadata": {"deletionTimestamp": now_iso(), "resourceVersion": self._next_version()}})
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
                return aiohttp.web.json_response(obj.raw)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict) and request.resource is not None:
            r = request.resource
            for hook in self.admission:
                hook(f"{r.group}/{r.version}/{r.plural}".lstrip("/"), request.data)
        invalid = self._validation_failure(request)
        if invalid is not None:
            return aiohttp.web.json_response(invalid[1], status=invalid[0])
        if request.resource is not None:
            self._stamp(request)
            if request.action in (kmock.action.DELETE, kmock.action.UPDATE) and request.name:
                uid = (self._current(request) or {}).get("metadata", {}).get("uid")
        try:
            if request.action in _FAST_ACTIONS and request.resource is not None and request.resource.plural \
                    and self._only_builtin_reactions():
                response = await self._fast_handle(request)
            else:
                response = await super()._handle(request)
        finally:
            if uid is not None and self._current(request) is None:
                await self._collect_garbage({uid})
            if not self.keep_history:
                self._forget(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict) and response.status < 300:
            meta = request.data.get("metadata") or {}
            owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
            for owner in owners:
                self._owned.setdefault(owner, set()).add((request.resource, meta.get("namespace"), meta.get("name")))
            if owners & self._gone:  # created after its owner went: the collector takes it too
                await self._collect_garbage(owners & self._gone)
        if self.on_write is not None and request.action in (
                kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE) and response.status < 300:
            self.on_write(request, time.monotonic())
        return response

    def _validation_failure(self, request: kmock.Request) -> tuple[int, dict] | None:
        """A custom resource created or updated (not its status) checked against its CRD."""
        if request.resource is None or request.subresource is not None or not isinstance(request.data, dict) \
                or request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
            return None
        r = request.resource
        crd = self.crds.get(f"{r.group}/{r.version}/{r.plural}")
        if crd is None:
            return None
        obj = request.data if request.action == kmock.action.CREATE else \
            merge_patch(self._current(request) or {}, request.data)
        return kubectl_api.validation_failure(crd, obj, strict=request.params.get("fieldValidation") == "Strict")

    def _only_builtin_reactions(self) -> bool:
        if self._builtin_reactions is None:
            self._builtin_reactions = len(self._payloads)
        return len(self._payloads) == self._builtin_reactions

    async def _fast_handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """KubernetesEmulator's behaviour for plain create/patch/delete/get/list requests, without
        matching the request against KMock's reaction DSL (most of its time per request) when no
        test-defined reaction exists. Same storage, same change bus, same responses."""
        action, key = request.action, (request.resource, request.namespace, request.name)
        if action == kmock.action.LIST:
            return aiohttp.web.json_response(await self._serve_list(request))
        async with self._lock:
            if action == kmock.action.CREATE:
                meta = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
                key = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
                if key not in self._objects:
                    self._objects[key] = request.data
                elif not self._objects[key].deleted:
                    raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                                message=f'{request.resource.plural} "{key[2]}" already exists')
                else:
                    self._objects[key].create(request.data)
                await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].last.raw})
                return aiohttp.web.json_response(self._objects[key].last.raw, status=201)
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self._objects[key]
            if action == kmock.action.FETCH:
                return aiohttp.web.json_response(obj.raw)
            if action == kmock.action.UPDATE:
                obj.patch(request.data)
                meta = obj.raw.get("metadata", {})
                if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                    last = obj.raw
                    obj.delete()
                    await self._buses[request.resource].put({"type": "DELETED", "object": last})
                    return aiohttp.web.json_response(last)
                await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
                return aiohttp.web.json_response(obj.raw)
            last = obj.raw  # DELETE (objects with finalizers were marked in _handle)
            obj.delete()
            await self._buses[request.resource].put({"type": "DELETED", "object": last})
            return aiohttp.web.json_response(last)

    async def _collect_garbage(self, gone: set[str]) -> None:
        """Delete (cascading) every object whose ownerReferences name a deleted uid."""
        while gone:
            self._gone |= gone
            found: set[str] = set()
            async with self._lock:
                keys = {k for uid in gone for k in self._owned.pop(uid, ())}
                for key in keys:
                    if key not in self._objects or self._objects[key].deleted:
                        continue
                    resource, obj = key[0], self._objects[key]
                    meta = obj.raw.get("metadata", {})
                    if any(ref.get("uid") in gone for ref in meta.get("ownerReferences") or []):
                        raw = obj.raw
                        obj.delete()
                        found.add(meta.get("uid"))
                        await self._buses[resource].put({"type": "DELETED", "object": raw})
            gone = found - {None}

    def _forget(self, request: kmock.Request) -> None:
        self._requests.clear()
        if request.resource is None:
            return
        name = request.name
        if name is None and isinstance(request.data, dict):
            name = request.data.get("metadata", {}).get("name")
        key = (request.resource, request.namespace, name)
        if key in self._objects:
            obj = self._objects[key]
            if obj.deleted:
                del self._objects[key]
            elif len(obj.history) > 1:
                obj.history = [obj.last.raw]

    # O(1) lookups by key (KMock scans every stored object for each of these).
    def _stored(self, request: kmock.Request, name: str | None = None) -> Any:
        if name is None and isinstance(request.data, dict):
            name = request.data.get("metadata", {}).get("name")
        namespace = request.namespace
        if namespace is None and isinstance(request.data, dict):
            namespace = request.data.get("metadata", {}).get("namespace")
        key = (request.resource, namespace, request.name or name)
        return self._objects[key] if key in self._objects else None

    async def _serve_create(self, request: kmock.Request):  # type: ignore[override]
        return self._stored(request).last.raw

    async def _serve_fetch(self, request: kmock.Request):  # type: ignore[override]
        obj = self._stored(request)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_update(self, request: kmock.Request):  # type: ignore[override]
        return self._stored(request).last.raw

    async def _serve_delete(self, request: kmock.Request):  # type: ignore[override]
        return self._stored(request).last.raw

    async def _serve_list(self, request: kmock.Request):  # type: ignore[override]
        result = await super()._serve_list(request)
        terms = parse_selector(request.params.get("labelSelector"))
        fields = request.params.get("fieldSelector")
        items = [i for i in result["items"] if selector_matches(terms, i.get("metadata", {}).get("labels"))
                 and field_selector_matches(fields, i)]
        r = request.resource
        info = self._resources[r] if r in self._resources else None
        return {"kind": f"{info.kind}List" if info is not None and info.kind else "List",  # e.g. EventList
                "apiVersion": f"{r.group}/{r.version}" if r.group else (r.version or "v1"),
                "metadata": {"resourceVersion": str(self._last_version)}, "items": items}

    async def _serve_watch(self, request: kmock.Request):  # type: ignore[override]
        # KMock's own watch snapshots the objects, then subscribes to the change bus: a change
        # in between is lost. Here the bus position is marked under the same lock as the snapshot.
        terms = parse_selector(request.params.get("labelSelector"))
        yield b""
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            initial = [{"type": "ADDED", "object": obj.raw}
                       for (res, ns, name), obj in self._objects.items()
                       if res == request.resource and not obj.deleted
                       and (request.namespace is None or ns == request.namespace)
                       and (request.name is None or name == request.name)]
        try:
            for event in initial:
                if selector_matches(terms, event["object"].get("metadata", {}).get("labels")):
                    yield event
            async for event in bus.stream(since=marker):
                meta = (event.get("object") or {}).get("metadata", {})
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if request.name is not None and meta.get("name") != request.name:
                    continue
                if selector_matches(terms, meta.get("labels")):
                    yield event
        finally:
            await bus.unmark(marker)
