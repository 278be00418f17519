"""Paths of the Kubernetes API as the fake API server (apiserver.py) and its clients in the
tests spell them: a resource key (`group/version/plural`, `v1/plural` for the core group) to
its URL path and back, and a CustomResourceDefinition to the resource KMock serves.
"""

from __future__ import annotations

import re

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces/?([^/]+)?/?$")
# a collection (what a watch is on): core or group-version, optional namespace, plural
RESOURCE_PATH = re.compile(r"^/(?:api/(v1)|apis/([^/]+)/([^/]+))(?:/namespaces/([^/]+))?/([^/]+)$")
# a collection or one object of it
OBJECT_PATH = re.compile(r"^/(?:api/(v1)|apis/([^/]+)/([^/]+))(?:/namespaces/([^/]+))?/([^/]+)(?:/[^/]+)?$")


def resource_key(path: str) -> str:
    """`group/version/plural` of a resource path (`v1/plural` for the core group)."""
    m = RESOURCE_PATH.match(path) or OBJECT_PATH.match(path)
    if not m:
        return ""
    return f"v1/{m.group(5)}" if m.group(1) else f"{m.group(2)}/{m.group(3)}/{m.group(5)}"


def resource_path(resource: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """`batch/v1/jobs` + ns + name -> `/apis/batch/v1/namespaces/ns/jobs/name`."""
    parts = resource.split("/")
    group_version, plural = "/".join(parts[:-1]), parts[-1]
    path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    if namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def crd_resource(crd: dict) -> tuple[str, dict]:
    """(kmock resource key, ResourceInfo kwargs) for a CustomResourceDefinition."""
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("served", True))
    names = spec["names"]
    return (f"{spec['group']}/{version['name']}/{names['plural']}", dict(
        kind=names["kind"], singular=names.get("singular"), shortnames=set(names.get("shortNames", [])),
        categories=set(names.get("categories", [])), namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        subresources=set(version.get("subresources", {})), verbs=VERBS))
