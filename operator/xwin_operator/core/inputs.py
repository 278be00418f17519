"""Where a stage reads and writes, and `TaskParts`: the task a descriptor fills in.

A stage's output is `<storage.uri>/<namespace>/<name>/<stage>/`. An input that names a stage
of the run is that stage's `model/` or `data/` (its `from:` URI when it is reused), and the
stage's folder is then a marker the task waits for; any other input is the URI itself. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api.spec import AlignmentRunSpec


def run_root(spec: AlignmentRunSpec, namespace: str, name: str, store: str | None = None) -> str:
    """`<storage.uri>/<namespace>/<name>/` (or under `store` when `xwin run --store` overrides it)."""
    base = (store or spec.storage.uri).rstrip("/")
    return f"{base}/{namespace}/{name}/"


def stage_uri(root: str, stage: str) -> str:
    return f"{root.rstrip('/')}/{stage}/"


def _stage_output(spec: AlignmentRunSpec, root: str, ref: str, folder: str) -> tuple[str, str | None]:
    """(URI, stage folder whose marker must exist or None): `folder` of a stage of the run
    (its `from:` URI when reused), or `ref` itself when it is a URI."""
    if ref in spec.stages.present():
        st = getattr(spec.stages, ref)
        if st.reused:
            return st.from_, None
        return stage_uri(root, ref) + folder, stage_uri(root, ref)
    return ref, None


def model_input(spec: AlignmentRunSpec, root: str, ref: str) -> tuple[str, str | None]:
    """(model URI, stage folder whose marker must exist or None) for a model reference."""
    if ref == "base":
        return spec.baseModel, None
    return _stage_output(spec, root, ref, "model/")


def data_input(spec: AlignmentRunSpec, root: str, ref: str) -> tuple[str, str | None]:
    """(data URI, stage folder whose marker must exist or None) for a data reference."""
    return _stage_output(spec, root, ref, "data/")


@dataclass
class TaskParts:
    """The inputs, markers and params of one stage's task while its descriptor adds its own
    (`StageDescriptor.task`); markers keep the order their inputs were added in."""

    spec: AlignmentRunSpec
    root: str
    inputs: dict[str, str] = field(default_factory=dict)
    markers: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, resolved: tuple[str, str | None]) -> None:
        uri, marker = resolved
        self.inputs[name] = uri
        if marker and marker not in self.markers:
            self.markers.append(marker)

    def model(self, name: str, ref: str) -> None:
        """Input `name`: the model a reference names (a stage key, 'base' or a URI)."""
        self.add(name, model_input(self.spec, self.root, ref))

    def data(self, name: str, ref: str) -> None:
        """Input `name`: the records a reference names (a stage key or a URI)."""
        self.add(name, data_input(self.spec, self.root, ref))

    def uri(self, name: str, uri: str) -> None:
        """Input `name`: a URI from outside the run."""
        self.add(name, (uri, None))
