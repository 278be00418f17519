"""pytest fixtures and run builders shared by the operator tests (import them by name).

    from kube.fixtures import NS, cluster, kubelet_factory, operator_factory, tiny_run  # noqa: F401
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from .cluster import Cluster
from .harness import RUNS, OperatorProcess
from .kubelet import REPO_ROOT, Kubelet

NS = "demo"
TINY = Path(REPO_ROOT) / "examples" / "tiny" / "run-training.yaml"


def example_run(path: Path, name: str, *, storage: dict) -> dict:
    """An example AlignmentRun file as an object: relative file:// URIs made absolute (the
    kubelet's processes do not run from the repository root), metadata and `storage` replaced."""

    def absolute(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, str) and value.startswith("file://./"):
            return f"file://{REPO_ROOT}/{value[len('file://./'):]}"
        return value

    run = absolute(yaml.safe_load(path.read_text()))
    run["metadata"] = {"name": name, "namespace": NS}
    run["spec"]["storage"] = dict(storage)
    return run


def tiny_run(name: str = "tiny", *, storage: dict, **spec_changes: Any) -> dict:
    """examples/tiny/run-training.yaml via `example_run`, top-level spec fields overridden by
    `spec_changes`."""
    run = example_run(TINY, name, storage=storage)
    run["spec"].update(copy.deepcopy(spec_changes))
    return run


@pytest.fixture
def cluster():
    from xwin_operator.api.crd import crd

    with Cluster(namespaces=(NS,), crds=(crd(),)) as c:
        yield c


@pytest.fixture
def kubelet_factory(cluster, tmp_path):
    made: list[Kubelet] = []

    def make(**kwargs: Any) -> Kubelet:
        k = Kubelet(cluster, work=tmp_path / "node", namespace=NS, **kwargs).start()
        made.append(k)
        return k
    yield make
    for k in made:
        k.stop()


@pytest.fixture
def operator_factory(cluster, tmp_path):
    made: list[OperatorProcess] = []

    def make(**kwargs: Any) -> OperatorProcess:
        op = OperatorProcess(cluster, tmp_path / "operator", namespace=NS, **kwargs).start()
        made.append(op)
        return op
    yield make
    for op in made:
        op.stop()


def create_run(cluster: Cluster, run: dict) -> dict:
    return cluster.create(RUNS, run)
