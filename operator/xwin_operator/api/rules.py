"""Rules between fields of an AlignmentRun, as data: what each stage may read (the stage keys
a reference may name besides a URI), what it requires, which stages need the judge.
`cross_field_errors` checks them (the spec model's validator) and crd.py turns the same tables into
CEL `x-kubernetes-validations`, so `xwin validate` and the API server agree. Pure.
"""

from __future__ import annotations

from typing import Any

from xwin_jobs.pipeline import JUDGE_STAGES  # noqa: F401  (re-exported for crd.py)

URI_PREFIXES = ("s3://", "file://", "hf://", "/")
EVAL_MODEL_KEYS = ("sft", "rejectionSampling", "dpo", "base")


def is_uri(value: str) -> bool:
    return value.startswith(URI_PREFIXES)


def _stage_ref_ok(ref: str, present: list[str], allowed: tuple[str, ...]) -> bool:
    return is_uri(ref) or ref == "base" and "base" in allowed or (ref in allowed and ref in present)


# Cross-field rules as data: `cross_field_errors` checks them here and crd.py turns the same
# tables into CEL `x-kubernetes-validations`, so `xwin validate` and the API server agree.
# (stage, field, stage keys it may name besides a URI); a reused stage (`from:`) skips its rules.
REFERENCE_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pairs", "policy", ("sft", "rejectionSampling", "dpo", "base")),
    ("rewardModel", "init", ("sft", "base")),
    ("rewardModel", "pairs", ("pairs",)),
    ("bestOfN", "policy", ("sft", "rejectionSampling", "dpo", "base")),
    ("bestOfN", "rewardModel", ("rewardModel",)),
    ("rejectionSampling", "init", ("sft", "base")),
    ("rejectionSampling", "scored", ("bestOfN",)),
    ("dpo", "init", ("sft", "rejectionSampling", "base")),
    ("dpo", "pairsFrom", ("bestOfN", "pairs")),
)
LIST_REFERENCE_RULES = (("evaluate", "models", EVAL_MODEL_KEYS),)
# (stage, field): required unless the stage is reused with `from:`.
REQUIRED_UNLESS_REUSED = (("sft", "data"), ("pairs", "prompts"), ("bestOfN", "prompts"))


def cross_field_errors(spec: Any) -> list[tuple[str, str]]:
    """Rules between fields of an AlignmentRunSpec, as (field path, message); each is also a
    CEL rule in the CRD. spec.py's validator calls it with the model (not imported here: the two
    modules do not import each other)."""
    s, present, errs = spec.stages, spec.stages.present(), []
    if not present:
        errs.append(("spec.stages", "at least one stage is required"))

    def bad_ref(path: str, value: str, allowed: tuple[str, ...]) -> None:
        if not _stage_ref_ok(value, present, allowed):
            errs.append((path, f"'{value}' must name a stage present in the run "
                               f"({' | '.join(allowed)}) or be a URI"))

    for key, fld in REQUIRED_UNLESS_REUSED:
        st = getattr(s, key)
        if st and not st.reused and not getattr(st, fld):
            errs.append((f"spec.stages.{key}.{fld}", f"required unless {key}.from is given"))
    for key, fld, allowed in REFERENCE_RULES:
        st = getattr(s, key)
        if st and not st.reused:
            bad_ref(f"spec.stages.{key}.{fld}", getattr(st, fld), allowed)
    for key, fld, allowed in LIST_REFERENCE_RULES:
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
