"""What the real kubectl needs of the test API server beyond KMock's storage, as pure functions
of the served resources and the CustomResourceDefinitions (apiserver.FakeApiServer serves them):

* `/version` of a current server, and discovery (`/api/v1`, `/apis/<group>/<version>`
  APIResourceLists) where subresources (`alignmentruns/status`) carry no short names or
  categories: else `kubectl get ar` warns that `ar` is ambiguous;
* OpenAPI v3 built from the CRDs (`/openapi/v3` and one document per group-version): each
  kind's schema with its `x-kubernetes-group-version-kind`, so `kubectl explain
  alignmentrun.spec` works, and the create/patch operations declaring `fieldValidation`, so
  `kubectl apply` lets the server validate (it sends `fieldValidation=Strict`);
* server-side Tables (`kubectl get`): Name plus the CRD's `additionalPrinterColumns` (JSONPath
  `.a.b` or `.a[-1:].b`), `date` columns as ages, as the apiextensions server renders them;
* schema validation of a custom resource being created or updated: the CRD's
  openAPIV3Schema (types, enums, ranges, patterns) and its CEL `x-kubernetes-validations`
  rules; a failure is the 422 Invalid Status a real server answers, with each field path in
  `details.causes`; an unknown field under `fieldValidation=Strict` is 400 BadRequest;
(`fieldSelector`s, what `kubectl describe` lists an object's Events with: selectors.py.)
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import json
import re
from typing import Any

K8S_VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.0", "gitCommit": "xwin-test",
               "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
               "compiler": "gc", "platform": "linux/amd64"}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
LIST_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"


_GROUP_VERSION_PATH = re.compile(r"^/api/v1$|^/apis/([^/]+)/([^/]+)$")
_NOT_FOUND = (404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"})


def serve_document(path: str, crds: dict[str, dict], resources: Any) -> tuple[int, dict] | None:
    """(status, body) of `/version`, `/openapi/v3[/apis/<gv>]` or a group-version's discovery
    (`resources`: kmock resource -> ResourceInfo); None for any other path."""
    if path == "/version":
        return 200, K8S_VERSION
    if path == "/openapi/v3":
        return 200, openapi_index(list(crds.values()))
    if path.startswith("/openapi/v3/apis/"):
        gv = path[len("/openapi/v3/apis/"):]
        found = [c for k, c in crds.items() if k.rsplit("/", 1)[0] == gv]
        return (200, openapi_document(found)) if found else _NOT_FOUND
    match = _GROUP_VERSION_PATH.match(path)
    if match:
        gv = "v1" if path == "/api/v1" else f"{match.group(1)}/{match.group(2)}"
        listed = [(r.plural, info) for r, info in resources.items()
                  if (f"{r.group}/{r.version}" if r.group else r.version) == gv]
        return (200, resource_list(gv, listed)) if listed else _NOT_FOUND
    return None


# --- discovery ---------------------------------------------------------------------------------


def resource_list(group_version: str, resources: list[tuple[str, Any]]) -> dict:
    """APIResourceList of one group-version from (plural, kmock.ResourceInfo) pairs."""
    out = []
    for plural, info in resources:
        out.append({"name": plural, "singularName": info.singular or info.kind.lower(), "namespaced": info.namespaced,
                    "kind": info.kind, "verbs": sorted(info.verbs or ()),
                    **({"shortNames": sorted(info.shortnames)} if info.shortnames else {}),
                    **({"categories": sorted(info.categories)} if info.categories else {})})
        for sub in sorted(info.subresources or ()):
            out.append({"name": f"{plural}/{sub}", "singularName": "", "namespaced": info.namespaced,
                        "kind": "Scale" if sub == "scale" else info.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": out}


# --- OpenAPI v3 --------------------------------------------------------------------------------


def _served(crd: dict) -> dict:
    return next(v for v in crd["spec"]["versions"] if v.get("served", True))


def _gv(crd: dict) -> str:
    return f"{crd['spec']['group']}/{_served(crd)['name']}"


def schema_name(crd: dict, suffix: str = "") -> str:
    """`ai.xwin.v1alpha1.AlignmentRun`: the group reversed, as Kubernetes names CRD schemas."""
    group = ".".join(reversed(crd["spec"]["group"].split(".")))
    return f"{group}.{_served(crd)['name']}.{crd['spec']['names']['kind']}{suffix}"


def openapi_index(crds: list[dict]) -> dict:
    paths = {}
    for gv in sorted({_gv(c) for c in crds}):
        doc = openapi_document([c for c in crds if _gv(c) == gv])
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16].upper()
        paths[f"apis/{gv}"] = {"serverRelativeURL": f"/openapi/v3/apis/{gv}?hash={digest}"}
    return {"paths": paths}


def openapi_document(crds: list[dict]) -> dict:
    """The OpenAPI v3 document of one group-version's CRDs."""
    schemas: dict[str, Any] = {
        OBJECT_META: {"type": "object", "description": "Standard object's metadata.", "properties": {
            k: {"type": "string"} for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp",
                                            "generateName", "deletionTimestamp")} | {
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            "generation": {"type": "integer", "format": "int64"},
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "ownerReferences": {"type": "array", "items": {"type": "object",
                                                           "x-kubernetes-preserve-unknown-fields": True}}}},
        LIST_META: {"type": "object", "properties": {"resourceVersion": {"type": "string"},
                                                     "continue": {"type": "string"}}},
    }
    paths: dict[str, Any] = {}
    for crd in crds:
        version, names, group = _served(crd), crd["spec"]["names"], crd["spec"]["group"]
        gvk = [{"group": group, "version": version["name"], "kind": names["kind"]}]
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        schema.setdefault("properties", {})["metadata"] = {"$ref": f"#/components/schemas/{OBJECT_META}"}
        schema["x-kubernetes-group-version-kind"] = gvk
        schemas[schema_name(crd)] = schema
        schemas[schema_name(crd, "List")] = {
            "type": "object", "required": ["items"], "x-kubernetes-group-version-kind": [
                {**gvk[0], "kind": names.get("listKind", names["kind"] + "List")}],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "metadata": {"$ref": f"#/components/schemas/{LIST_META}"},
                           "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{schema_name(crd)}"}}}}
        ref = {"$ref": f"#/components/schemas/{schema_name(crd)}"}
        params = [{"name": n, "in": "query", "schema": {"type": "string"}}
                  for n in ("dryRun", "fieldManager", "fieldValidation")]
        body = {"content": {"application/json": {"schema": ref}}}
        op = {"parameters": params, "x-kubernetes-group-version-kind": gvk[0],
              "responses": {"200": {"content": {"application/json": {"schema": ref}}}}}
        scope = "/namespaces/{namespace}" if crd["spec"].get("scope", "Namespaced") == "Namespaced" else ""
        base = f"/apis/{group}/{version['name']}{scope}/{names['plural']}"
        paths[base] = {"post": {**op, "x-kubernetes-action": "post", "requestBody": body}}
        paths[base + "/{name}"] = {"get": {**op, "x-kubernetes-action": "get"},
                                   "put": {**op, "x-kubernetes-action": "put", "requestBody": body},
                                   "patch": {**op, "x-kubernetes-action": "patch", "requestBody": {"content": {
                                       t: {"schema": {"type": "object"}} for t in (
                                           "application/merge-patch+json", "application/json-patch+json",
                                           "application/apply-patch+yaml")}}}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": K8S_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": schemas}}


# --- tables ------------------------------------------------------------------------------------


def _json_path(obj: Any, path: str) -> Any:
    """The value at a printer column's simple JSONPath (`.a.b`, `.a[-1:].b`, `.a[0].b`)."""
    for part in re.findall(r"\.([^.\[]+)|\[(-?\d+):?\]", path):
        key, index = part
        if key:
            obj = obj.get(key) if isinstance(obj, dict) else None
        elif isinstance(obj, list) and obj:
            i = int(index)
            obj = obj[i] if -len(obj) <= i < len(obj) else None
        else:
            obj = None
        if obj is None:
            return None
    return obj


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.datetime.now(datetime.timezone.utc)) - then).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 3600 * 3:
        return f"{seconds // 60}m" + (f"{seconds % 60}s" if seconds < 600 and seconds % 60 else "")
    if seconds < 86400 * 2:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def table(items: list[dict], crd: dict | None, resource_version: str) -> dict:
    """A meta.k8s.io/v1 Table of `items` (kubectl get's default output)."""
    columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}]
    printer = (_served(crd).get("additionalPrinterColumns") if crd else None) or [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    columns += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                 "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in printer]
    rows = []
    for item in items:
        cells: list[Any] = [item.get("metadata", {}).get("name")]
        for c in printer:
            value = _json_path(item, c["jsonPath"])
            if c.get("type") == "date":
                value = human_age(value)
            elif isinstance(value, (dict, list)):
                value = json.dumps(value)
            cells.append(value)
        meta = item.get("metadata", {})
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                "metadata": meta}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}


def wants_table(accept: str | None) -> bool:
    return bool(accept) and "as=Table" in accept


# --- validation --------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` where it lists properties (unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _path(error: Any) -> str:
    out = ""
    for p in error.absolute_path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@functools.lru_cache(maxsize=None)
def _cel_program(rule: str) -> Any:
    """A CEL rule compiled once (compiling is most of the cost of checking one)."""
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(schema: dict, value: Any, path: str) -> list[tuple[str, str]]:
    """(field path, message) of every CEL rule of `schema` (and its properties') that fails."""
    errors: list[tuple[str, str]] = []
    rules = schema.get("x-kubernetes-validations") or []
    if rules and value is not None:
        import celpy

        for rule in rules:
            try:
                ok = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            except Exception:  # noqa: BLE001 - a rule the evaluator cannot run is not enforced here
                continue
            if not ok:
                where = path + rule.get("fieldPath", "") if rule.get("fieldPath", "").startswith(".") else path
                errors.append((where.lstrip("."), rule.get("message") or f"failed rule: {rule['rule']}"))
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errors += _cel_errors(sub, value[key], f"{path}.{key}")
    return errors


_VALIDATORS: dict[tuple[int, bool], tuple[Any, dict, dict]] = {}


def _validator(crd: dict, strict: bool) -> tuple[Any, dict]:
    """(jsonschema validator, schema) of a CRD's body, built once per CRD object (the cache
    keeps the object, so its id is not reused while cached)."""
    import jsonschema

    key = (id(crd), strict)
    if key not in _VALIDATORS:
        schema = copy.deepcopy(_served(crd)["schema"]["openAPIV3Schema"])
        for field in ("apiVersion", "kind", "metadata"):
            schema.get("properties", {}).pop(field, None)
        _VALIDATORS[key] = (jsonschema.Draft4Validator(_strict(schema) if strict else schema), schema, crd)
    validator, schema, _ = _VALIDATORS[key]
    return validator, schema


_CEL_RESULTS: dict[tuple[int, str], list[tuple[str, str]]] = {}


def _cel_errors_of(schema: dict, body: dict) -> list[tuple[str, str]]:
    """`_cel_errors` remembered per schema and body (evaluating CEL in Python takes a good part
    of a second: a burst of identical runs, or a run patched outside its spec, is checked once)."""
    key = (id(schema), json.dumps(body, sort_keys=True))
    if key not in _CEL_RESULTS:
        if len(_CEL_RESULTS) > 1024:
            _CEL_RESULTS.clear()
        _CEL_RESULTS[key] = _cel_errors(schema, body, "")
    return _CEL_RESULTS[key]


def validation_failure(crd: dict, obj: dict, strict: bool) -> tuple[int, dict] | None:
    """(status, Status body) when `obj` does not validate against the CRD; None when it does."""
    validator, schema = _validator(crd, strict)
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    kind, name = crd["spec"]["names"]["kind"], obj.get("metadata", {}).get("name", "")
    qualified = f'{kind}.{crd["spec"]["group"]} "{name}"'
    unknown, causes = [], []
    for e in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
        path = _path(e)
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            unknown += [f"{path}.{x}" if path else x for x in extra]
            continue
        if e.validator == "enum":
            message = f"Unsupported value: {json.dumps(e.instance)}: supported values: " + \
                ", ".join(json.dumps(v) for v in e.validator_value)
        elif e.validator == "required":
            missing = str(e.message).split("'")[1] if "'" in str(e.message) else ""
            path, message = (f"{path}.{missing}" if path else missing), "Required value"
        else:
            why = {"minimum": f"should be greater than or equal to {e.validator_value}",
                   "maximum": f"should be less than or equal to {e.validator_value}",
                   "pattern": f"should match '{e.validator_value}'",
                   "type": f"must be of type {e.validator_value}"}.get(str(e.validator), e.message)
            message = f"Invalid value: {json.dumps(e.instance)}: {path} in body {why}"
        causes.append({"reason": "FieldValueInvalid", "message": message, "field": path})
    if unknown:
        text = "; ".join(f'unknown field "{u}"' for u in unknown)
        return 400, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest", "code": 400,
                     "message": f"strict decoding error: {text}"}
    if not causes:
        causes = [{"reason": "FieldValueInvalid", "message": f"Invalid value: \"object\": {m}", "field": p}
                  for p, m in _cel_errors_of(schema, body)]
    if not causes:
        return None
    text = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    message = f"{qualified} is invalid: " + (f"[{text}]" if len(causes) > 1 else text)
    return 422, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                 "message": message, "details": {"name": name, "group": crd["spec"]["group"],
                                                  "kind": kind, "causes": causes}}
