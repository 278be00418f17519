"""Rules between fields of an AlignmentRun: what each stage may read (the stage keys a
reference may name besides a URI), what it requires, which stages need the judge.

Each stage's own rules are class variables of its spec model (`references`, `required`:
api/spec.py); `stage_rules` gathers them into tables, in pipeline order. `cross_field_errors`
checks them (the spec model's validator) and crd.py turns the same tables into CEL
`x-kubernetes-validations`, so `xwin validate` and the API server agree. Pure.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple, get_origin

from xwin_jobs.pipeline import JUDGE_STAGES  # noqa: F401  (re-exported for crd.py)

URI_PREFIXES = ("s3://", "file://", "hf://", "/")


def is_uri(value: str) -> bool:
    return value.startswith(URI_PREFIXES)


def _stage_ref_ok(ref: str, present: list[str], allowed: tuple[str, ...]) -> bool:
    return is_uri(ref) or ref == "base" and "base" in allowed or (ref in allowed and ref in present)


class StageRules(NamedTuple):
    """The stages' rules as tables; a reused stage (`from:`) skips its rules."""

    references: tuple[tuple[str, str, tuple[str, ...]], ...]       # (stage, field, keys it may name)
    list_references: tuple[tuple[str, str, tuple[str, ...]], ...]  # the same, for each item of a list
    required: tuple[tuple[str, str], ...]                          # (stage, field): unless reused


@cache
def stage_rules(stages: type) -> StageRules:
    """The rules of the stage models that are the fields of `stages` (api/spec.py: Stages), in
    its field order: pipeline order, then each model's own order."""
    refs, lists, required = [], [], []
    for key, info in stages.model_fields.items():
        model = next(a for a in info.annotation.__args__ if a is not type(None))  # Optional[Model]
        for fld, allowed in model.references.items():
            is_list = get_origin(model.model_fields[fld].annotation) is list
            (lists if is_list else refs).append((key, fld, tuple(allowed)))
        required += [(key, fld) for fld in model.required]
    return StageRules(tuple(refs), tuple(lists), tuple(required))


def cross_field_errors(spec: Any) -> list[tuple[str, str]]:
    """Rules between fields of an AlignmentRunSpec, as (field path, message); each is also a
    CEL rule in the CRD. spec.py's validator calls it with the model (not imported here: the two
    modules do not import each other)."""
    s, present, errs = spec.stages, spec.stages.present(), []
    rules = stage_rules(type(s))
    if not present:
        errs.append(("spec.stages", "at least one stage is required"))

    def bad_ref(path: str, value: str, allowed: tuple[str, ...]) -> None:
        if not _stage_ref_ok(value, present, allowed):
            errs.append((path, f"'{value}' must name a stage present in the run "
                               f"({' | '.join(allowed)}) or be a URI"))

    for key, fld in rules.required:
        st = getattr(s, key)
        if st and not st.reused and not getattr(st, fld):
            errs.append((f"spec.stages.{key}.{fld}", f"required unless {key}.from is given"))
    for key, fld, allowed in rules.references:
        st = getattr(s, key)
        if st and not st.reused:
            bad_ref(f"spec.stages.{key}.{fld}", getattr(st, fld), allowed)
    for key, fld, allowed in rules.list_references:
        st = getattr(s, key)
        if st and not st.reused:
            for i, v in enumerate(getattr(st, fld)):
                bad_ref(f"spec.stages.{key}.{fld}[{i}]", v, allowed)
    for key in JUDGE_STAGES:
        st = getattr(s, key)
        if st and not st.reused and spec.judge is None:
            errs.append(("spec.judge", f"required when the {key} stage runs"))
    if s.evaluate and not s.evaluate.reused and not (s.evaluate.alpacaEval or s.evaluate.mtBench):
        errs.append(("spec.stages.evaluate", "give alpacaEval, mtBench or both"))
    if s.evaluate and not s.evaluate.reused and s.evaluate.alpacaEval:
        ref = s.evaluate.alpacaEval.reference
        if not is_uri(ref) and ref not in s.evaluate.models:
            errs.append(("spec.stages.evaluate.alpacaEval.reference",
                         f"'{ref}' must be one of evaluate.models ({', '.join(s.evaluate.models)}) "
                         "or a URI of reference outputs"))
    return errs
