"""The stage graph of an AlignmentRun, as pure functions of the spec (a spec whose stages read
each other in a cycle is invalid: api/spec_io.py reports it with the file's line).

Order is docs/design.md's: sft → pairs → rewardModel → bestOfN → rejectionSampling → dpo → evaluate,
but what a stage waits for comes from the references in the spec (dpo.init, bestOfN.policy, ...):
a stage starts as soon as every stage it reads from has succeeded. A stage given with `from:`
runs nothing and counts as done from the start.
"""

from __future__ import annotations

from .rules import stage_rules
from .spec import STAGE_ORDER, AlignmentRunSpec


class GraphError(ValueError):
    """The stages reference each other in a cycle."""


def stages_of(spec: AlignmentRunSpec) -> list[str]:
    """The stages this run has, in pipeline order."""
    return spec.stages.present()


def stage_references(spec: AlignmentRunSpec, stage: str) -> dict[str, str]:
    """The fields of a stage that name another stage or a URI: {field: value}."""
    st = getattr(spec.stages, stage)
    if st is None or st.reused:
        return {}
    rules = stage_rules(type(spec.stages))
    refs = {fld: getattr(st, fld) for key, fld, _ in rules.references if key == stage}
    for key, fld, _ in rules.list_references:
        if key == stage:
            refs.update({f"{fld}[{i}]": v for i, v in enumerate(getattr(st, fld))})
    return refs


def dependencies(spec: AlignmentRunSpec) -> dict[str, list[str]]:
    """stage -> the stages of this run it reads from (in pipeline order)."""
    present = set(stages_of(spec))
    deps: dict[str, list[str]] = {}
    for stage in stages_of(spec):
        named = {v for v in stage_references(spec, stage).values() if v in present}
        deps[stage] = [k for k in STAGE_ORDER if k in named]
    _check_acyclic(deps)
    return deps


def _check_acyclic(deps: dict[str, list[str]]) -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = path[path.index(node):] + [node]
            raise GraphError("spec.stages: stages read from each other in a cycle: " + " → ".join(cycle))
        state[node] = 1
        for d in deps.get(node, []):
            visit(d, path + [node])
        state[node] = 2

    for n in deps:
        visit(n, [])
