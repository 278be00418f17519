"""The AlignmentRun CustomResourceDefinition, generated from the pydantic model in spec.py.

pydantic's JSON Schema is close to what Kubernetes wants, but a CRD needs a *structural*
OpenAPI v3 schema: no $ref, no anyOf for optional fields, boolean exclusiveMinimum, no
`additionalProperties: false` beside `properties`, `x-kubernetes-preserve-unknown-fields` for
free-form maps. `structural()` does that translation; `cel_rules()` turns the cross-field rule
tables of rules.py into `x-kubernetes-validations`.

Pure: pydantic and the standard library.
"""

from __future__ import annotations

import copy
from typing import Any

from .rules import JUDGE_STAGES, stage_rules
from .spec import API_GROUP, API_VERSION, KIND, PLURAL, STAGE_ORDER, AlignmentRunSpec, EvaluateStage, Stages
from .status_model import AlignmentRunStatus

_DROP = {"title", "discriminator"}


def _is_uri_cel(expr: str) -> str:
    return f"({expr}.contains('://') || {expr}.startsWith('/'))"


def _ref_ok_cel(expr: str, allowed: tuple[str, ...]) -> str:
    terms = [_is_uri_cel(expr)]
    for a in allowed:
        terms.append(f"{expr} == 'base'" if a == "base" else f"({expr} == '{a}' && has(self.stages.{a}))")
    return " || ".join(terms)


def cel_rules() -> list[dict[str, str]]:
    """The cross-field rules of rules.cross_field_errors, as CEL on `spec`."""
    tables = stage_rules(Stages)
    rules: list[dict[str, str]] = [{
        "rule": "has(self.stages) && (" + " || ".join(f"has(self.stages.{k})" for k in STAGE_ORDER) + ")",
        "message": "at least one stage is required", "fieldPath": ".stages",
    }]

    def active(stage: str) -> str:
        return f"!has(self.stages.{stage}) || has(self.stages.{stage}.from)"

    for stage, fld in tables.required:
        rules.append({"rule": f"{active(stage)} || has(self.stages.{stage}.{fld})",
                      "message": f"required unless {stage}.from is given",
                      "fieldPath": f".stages.{stage}.{fld}"})
    for stage, fld, allowed in tables.references:
        e = f"self.stages.{stage}.{fld}"
        rules.append({"rule": f"{active(stage)} || !has({e}) || {_ref_ok_cel(e, allowed)}",
                      "message": f"must name a stage present in the run ({' | '.join(allowed)}) or be a URI",
                      "fieldPath": f".stages.{stage}.{fld}"})
    for stage, fld, allowed in tables.list_references:
        e = f"self.stages.{stage}.{fld}"
        rules.append({"rule": f"{active(stage)} || !has({e}) || {e}.all(m, {_ref_ok_cel('m', allowed)})",
                      "message": f"each must name a stage present in the run ({' | '.join(allowed)}) or be a URI",
                      "fieldPath": f".stages.{stage}.{fld}"})
    for stage in JUDGE_STAGES:
        rules.append({"rule": f"{active(stage)} || has(self.judge)",
                      "message": f"judge is required when the {stage} stage runs", "fieldPath": ".judge"})
    rules.append({"rule": f"{active('evaluate')} || has(self.stages.evaluate.alpacaEval) || has(self.stages.evaluate.mtBench)",
                  "message": "give alpacaEval, mtBench or both", "fieldPath": ".stages.evaluate"})
    ref, models = "self.stages.evaluate.alpacaEval.reference", "self.stages.evaluate.models"
    default_models = "[" + ", ".join(f"'{m}'" for m in EvaluateStage.model_fields["models"].default_factory()) + "]"
    rules.append({"rule": f"{active('evaluate')} || !has(self.stages.evaluate.alpacaEval) || "
                          f"{_is_uri_cel(ref)} || {ref} in (has({models}) ? {models} : {default_models})",
                  "message": "must be one of evaluate.models or a URI of reference outputs",
                  "fieldPath": ".stages.evaluate.alpacaEval.reference"})
    return rules


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic JSON Schema -> Kubernetes structural schema (refs inlined)."""
    defs = schema.get("$defs", {})

    def conv(node: dict[str, Any]) -> dict[str, Any]:
        node = copy.deepcopy(node)
        if "$ref" in node:
            target = conv(defs[node.pop("$ref").split("/")[-1]])
            target.update({k: v for k, v in node.items() if k in ("description", "default")})
            node = target
        if "anyOf" in node:  # Optional[X] -> X (absent means unset)
            variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
            if len(variants) != 1:
                raise ValueError(f"cannot express union {variants} in a structural schema")
            inner = conv(variants[0])
            inner.update({k: v for k, v in node.items() if k in ("description",)})
            if node.get("default") is not None:
                inner["default"] = node["default"]
            node = inner
        for k in _DROP:
            node.pop(k, None)
        if node.get("default", 0) is None:
            node.pop("default")
        if "const" in node:
            node["enum"] = [node.pop("const")]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
                node[plain] = node[bound]
                node[bound] = True
        if "properties" in node:
            node["type"] = "object"
            node.pop("additionalProperties", None)
            node["properties"] = {k: conv(v) for k, v in node["properties"].items()}
        elif node.get("type") == "object":
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                node["additionalProperties"] = conv(extra)
            else:  # dict[str, Any]
                node.pop("additionalProperties", None)
                node["x-kubernetes-preserve-unknown-fields"] = True
        if node.get("type") == "array" and "items" in node:
            node["items"] = conv(node["items"])
        if "default" in node and isinstance(node["default"], (dict, list)) and not node["default"]:
            node.pop("default")
        return node

    return conv({k: v for k, v in schema.items() if k != "$defs"})


def openapi_schema() -> dict[str, Any]:
    spec = structural(AlignmentRunSpec.model_json_schema(by_alias=True, mode="validation"))
    spec["x-kubernetes-validations"] = cel_rules()
    status = structural(AlignmentRunStatus.model_json_schema(by_alias=True, mode="serialization"))
    status.pop("required", None)
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition manifest."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(),
                      "listKind": f"{KIND}List", "shortNames": ["ar"], "categories": ["xwin"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
                    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
                    {"name": "Cost", "type": "string", "jsonPath": ".status.cost.summary"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML that YAML 1.1 readers (kubectl and Helm: sigs.k8s.io/yaml) read back
    unchanged: they take a bare y/n for a boolean, so the `n` property is written quoted."""
    import re

    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
    header = "# Generated by `xwin crd` from operator/xwin_operator/api/spec.py. Do not edit.\n"
    return header + yaml.dump(crd(), Dumper=Dumper, sort_keys=False, width=100)
