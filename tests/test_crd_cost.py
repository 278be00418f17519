"""The generated CRD is one a real API server accepts: every string, list and map of the spec is
bounded, each CEL rule's estimated worst-case cost (tests/cel_cost.py, Kubernetes' estimate) is
under the per-rule limit and all of them under the per-CRD limit; a value over a bound is
refused by `xwin validate` and by the CRD's schema alike, naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cel_cost import CRD_LIMIT, PER_RULE_LIMIT, UnsupportedCel, estimate, rule_costs, schema_nodes
from kube.kubectl_api import validation_failure
from xwin_operator.api import settings as S
from xwin_operator.api.crd import crd
from xwin_operator.api.spec_io import SpecError, parse_run

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- the estimator reproduces Kubernetes' own numbers -----------------------------------------

def _array(item: str, max_items: int | None = None) -> dict:
    return {"type": "array", "items": {"type": item}, **({"maxItems": max_items} if max_items is not None else {})}


def _string(max_length: int | None = None, **extra) -> dict:
    return {"type": "string", **({"maxLength": max_length} if max_length is not None else {}), **extra}


def _map(value: str, max_properties: int | None = None) -> dict:
    return {"type": "object", "additionalProperties": {"type": value},
            **({"maxProperties": max_properties} if max_properties is not None else {})}


# (schema of self, rule, cost): cases of TestCostEstimation in kubernetes'
# staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel/compilation_test.go
KUBERNETES_CASES = [
    (_array("number"), "self.all(x, true)", 4718591),
    (_array("number", 10), "self.all(x, true)", 32),
    (_array("string"), "self.all(x, true)", 3145727),
    (_array("string", 20), "self.all(x, true)", 62),
    (_array("boolean"), "self.all(x, true)", 1887437),
    (_map("number"), "self.all(x, true)", 1348169),
    (_map("string", 3), "self.all(x, true)", 11),
    (_string(), "self.contains('test')", 314574),
    (_string(10), "self.contains('test')", 5),
    (_string(), "self.startsWith('test')", 2),
    (_string(30), "self.endsWith('test')", 2),
    (_string(), 'self.matches("x")', 314574),
    (_string(50), 'self.matches("x")', 22),
    (_string(), 'self == "x"', 2),
    (_string(0), 'self == "x"', 1),
    (_array("number"), "self.all(x, x == 0.0)", 6291454),
    (_array("number", 10), "self.all(x, self.all(y, self.all(z, true)))", 3552),
    (_string(enum=["A", "B", "C", "LongValue"]), "self.contains('A')", 2),
    (_string(1000, enum=["A", "B", "C", "LongValue"]), "self.contains('A')", 401),
]


@pytest.mark.parametrize("schema,rule,cost", KUBERNETES_CASES, ids=[f"{c[1]}-{c[2]}" for c in KUBERNETES_CASES])
def test_the_estimator_matches_kubernetes(schema, rule, cost):
    assert estimate(rule, schema) == cost


@pytest.mark.parametrize("rule", ["self.x[0] == 'a'", "oldSelf.x == self.x", "self.x.lowerAscii() == 'a'",
                                  "self.y + 1 > 2", "self.x.exists_one(c, c == 'a')", "self.missing == 'a'"])
def test_an_operation_the_estimator_does_not_price_fails(rule):
    schema = {"type": "object", "properties": {"x": _string(), "y": {"type": "integer"}}}
    with pytest.raises(UnsupportedCel):
        estimate(rule, schema)


# --- the CRD ---------------------------------------------------------------------------------

def test_every_rule_is_under_the_per_rule_limit_and_all_under_the_crd_limit():
    costs = rule_costs(_schema())
    assert len(costs) == len(_schema()["properties"]["spec"]["x-kubernetes-validations"])
    for c in costs:
        assert c.total <= PER_RULE_LIMIT, (c.path, c.rule, c.total)
    assert sum(c.total for c in costs) <= CRD_LIMIT
    # a wide margin: no rule costs 1% of its limit (a bound may grow tenfold and still fit)
    assert max(c.total for c in costs) < PER_RULE_LIMIT / 100


def _unbounded(node):
    if isinstance(node, dict):
        return {k: _unbounded(v) for k, v in node.items() if k not in ("maxLength", "maxItems", "maxProperties")}
    return [_unbounded(v) for v in node] if isinstance(node, list) else node


def test_without_the_bounds_the_models_rule_would_be_refused():
    costs = {c.rule: c.total for c in rule_costs(_unbounded(_schema()))}
    models_rule = next(r for r in costs if "evaluate.models.all(" in r)
    assert costs[models_rule] > 1000 * PER_RULE_LIMIT   # about 3e11: what a real server refused
    assert sum(costs.values()) > CRD_LIMIT


def test_every_string_list_and_map_of_the_spec_is_bounded():
    for path, node in schema_nodes(_schema()["properties"]["spec"], "spec"):
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, path
        elif node.get("type") == "array":
            assert "maxItems" in node, path
        elif node.get("type") == "object" and "properties" not in node:
            assert "maxProperties" in node, path


def test_the_rules_compile_in_cel_python():
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    for c in rule_costs(_schema()):
        env.compile(c.rule)


# --- a value over a bound: refused by `xwin validate` and by the CRD, naming the field -------

RUN = {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r1", "namespace": "ns"},
       "spec": {"baseModel": "s3://models/base/", "storage": {"uri": "s3://artifacts/runs"}, "judge": {},
                "stages": {"sft": {"data": "s3://data/sft.jsonl"},
                           "evaluate": {"models": ["sft"], "mtBench": {"questions": "s3://q"}}}}}
LONG_URI = "s3://bucket/" + "a" * S.URI_MAX


def _with(path: str, value) -> dict:
    run = copy.deepcopy(RUN)
    *parents, last = path.split(".")[1:]
    node = run["spec"]
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return run


OVER_BOUNDS = [
    ("spec.stages.evaluate.models", ["sft"] + [f"s3://m/{i}/" for i in range(S.MODELS_MAX)],
     f"must have at most {S.MODELS_MAX} item(s)"),
    ("spec.baseModel", LONG_URI, f"must have at most {S.URI_MAX} character(s)"),
    ("spec.storage.secretRef", "s" * (S.NAME_MAX + 1), f"must have at most {S.NAME_MAX} character(s)"),
    ("spec.scheduling.nodeSelector", {f"k{i}": "v" for i in range(S.NODE_SELECTOR_MAX + 1)},
     f"must have at most {S.NODE_SELECTOR_MAX} item(s)"),
]


def test_the_run_within_bounds_is_accepted_by_both():
    assert parse_run(yaml.safe_dump(RUN))
    assert validation_failure(crd(), RUN, strict=True) is None


@pytest.mark.parametrize("path,value,message", OVER_BOUNDS, ids=[o[0] for o in OVER_BOUNDS])
def test_a_value_over_its_bound_is_refused_by_validate_and_the_crd(path, value, message, tmp_path):
    run = _with(path, value)
    with pytest.raises(SpecError) as e:
        parse_run(yaml.safe_dump(run))
    assert {p: m for _, p, m in e.value.errors}.get(path) == message, str(e.value)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(run))
    res = subprocess.run([sys.executable, "-m", "xwin_operator.cli", "validate", str(f)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and path in res.stderr and message in res.stderr
    status, body = validation_failure(crd(), run, strict=True)
    assert status == 422 and [c["field"] for c in body["details"]["causes"]] == [path], body
