"""A stage is registered once on each side: its descriptor (xwin_operator/core/descriptors.py,
with its spec model in api/spec.py) and its job's entry (xwin_jobs/pipeline.py). These tests
check that the two sides agree, and list every place a stage's key is spelled, so that adding
a stage is seen to touch only the registration (docs/design.md, section 2.1)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from xwin_jobs.pipeline import JOBS, STAGE_ORDER, job
from xwin_jobs.stages import STAGES, STEPS, StageError, check_params, param
from xwin_jobs.stages.dpo import pairs_source
from xwin_jobs.task import StageTask
from xwin_operator.api.rules import stage_rules
from xwin_operator.api.spec import Stages
from xwin_operator.core.descriptors import DESCRIPTORS, stage_steps

ROOT = Path(__file__).resolve().parent.parent


def test_both_sides_list_the_same_stages_in_pipeline_order():
    assert tuple(d.key for d in DESCRIPTORS) == STAGE_ORDER == tuple(Stages.model_fields)
    for d in DESCRIPTORS:
        assert Stages.model_fields[d.key].annotation == d.spec | None, d.key


@pytest.mark.parametrize("d", DESCRIPTORS, ids=lambda d: d.key)
def test_a_descriptor_s_steps_are_its_job_s_kind_and_entry_points(d):
    steps, j = stage_steps(d.key), d.job
    assert j.training == ([s.name for s in steps] == ["train"] and steps[0].job == d.key)
    assert j.sampling == any(s.kind == "serve" for s in steps)
    assert j.judge == any(s.needs_judge for s in steps)
    # every process a step runs is a registered job, named as `python -m xwin_jobs` takes it
    jobs = [s.job for s in steps if s.kind != "serve"]
    assert all(name in STAGES or name in STEPS for name in jobs), jobs
    if not j.training:
        assert sorted({name.split("-", 1)[1] for name in jobs}) == sorted(j.steps)


@pytest.mark.parametrize("j", JOBS, ids=lambda j: j.key)
def test_every_entry_point_resolves(j):
    module = importlib.import_module(j.module_name)
    assert callable(module.run)
    for step in j.steps:
        assert callable(getattr(module, f"{step}_step")), (j.key, step)


@pytest.mark.parametrize("j", JOBS, ids=lambda j: j.key)
def test_the_spec_model_takes_the_job_s_param_limits(j):
    model = {d.key: d.spec for d in DESCRIPTORS}[j.key]
    for name, limits in j.params.items():
        info = model.model_fields[name]
        assert info.default == limits.default
        bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in info.metadata}
        assert bounds == {k: v for k, v in limits.field().items() if k != "default"}, (j.key, name)


def test_reference_rules_come_from_the_spec_models_in_pipeline_order():
    rules = stage_rules(Stages)
    assert [(s, f) for s, f, _ in rules.references] == [
        ("pairs", "policy"), ("rewardModel", "init"), ("rewardModel", "pairs"), ("bestOfN", "policy"),
        ("bestOfN", "rewardModel"), ("rejectionSampling", "init"), ("rejectionSampling", "scored"),
        ("dpo", "init"), ("dpo", "pairsFrom")]
    assert [(s, f) for s, f, _ in rules.list_references] == [("evaluate", "models")]
    assert rules.required == (("sft", "data"), ("pairs", "prompts"), ("bestOfN", "prompts"))


def _task(stage: str, **params) -> StageTask:
    return StageTask(stage=stage, output="/tmp/x/", params=params)


def test_the_job_checks_its_params_against_the_one_declaration():
    check_params(_task("dpo", beta=0.5, rpoAlpha=1))
    assert param(_task("dpo"), "beta") == job("dpo").params["beta"].default
    for stage, name, bad, message in [
            ("dpo", "beta", 0, "must be a number > 0 and <= 100, got 0"),
            ("dpo", "rpoAlpha", -1, "must be a number >= 0 and <= 100, got -1"),
            ("rewardModel", "heldOutFraction", 1.0, "must be a number >= 0 and < 1, got 1.0"),
            ("rejectionSampling", "topK", True, "must be an integer >= 1 and <= 1024, got True"),
            ("bestOfN", "n", 2.5, "must be an integer >= 1 and <= 1024, got 2.5"),
            ("pairs", "candidatesPerPrompt", 1, "must be an integer >= 2 and <= 64, got 1")]:
        with pytest.raises(StageError, match=f"^params.{name}: {message}$"):
            check_params(_task(stage, **{name: bad}))


def test_dpo_reads_judged_pairs_from_a_uri_pairs_from():
    """spec.stages.dpo.pairsFrom may be a URI of judged pairs (the task's `pairs` input)."""
    def ctx(**params):
        return SimpleNamespace(task=SimpleNamespace(inputs={"model": "/m", "pairs": "/p"}),
                               param=lambda name, default=None: params.get(name, default))
    assert pairs_source(ctx(pairsFrom="s3://bucket/pairs/")) == "pairs"
    assert pairs_source(ctx(pairsFrom="pairs")) == "pairs"
    assert pairs_source(ctx()) == "pairs"
    with pytest.raises(StageError, match="params.pairsFrom"):
        pairs_source(ctx(pairsFrom="judged"))


# ------------------------------------------------------------------ where a key is spelled

# A stage's key is spelled where it is registered: its job's entry, its spec model's field in
# `Stages`, its descriptor. A new stage that no other stage reads is spelled there and nowhere
# else (dpo and rejectionSampling are such stages today).
REGISTRATION = {"xwin_jobs/pipeline.py", "operator/xwin_operator/api/spec.py",
                "operator/xwin_operator/core/descriptors.py"}
# Everywhere else, and why: another stage reads the stage (a default or a rule of its spec
# model is in spec.py already), the same word names something else, or a rule is the stage's own.
ELSEWHERE = {
    "sft": {
        "xwin_jobs/stages/sft.py": "the 'sft' token layout (one sequence per example)",
        "xwin_jobs/tokenized.py": "the 'sft' token layout",
        "xwin_jobs/training/data.py": "the 'sft' token layout",
    },
    "pairs": {
        "xwin_jobs/stages/pairs.py": "its counts: 'pairs'",
        "xwin_jobs/stages/dpo.py": "dpo's input and params.pairsFrom: 'pairs'",
        "xwin_jobs/stages/reward_model.py": "rewardModel's input 'pairs', the 'pairs' token layout",
        "xwin_jobs/tokenized.py": "the 'pairs' token layout (chosen + rejected)",
        "xwin_jobs/training/data.py": "the 'pairs' token layout",
        "operator/xwin_operator/status_view.py": "the metric 'pairs'",
        "operator/xwin_operator/core/judge_estimate.py": "what the pairs stage costs in judge calls",
    },
    "rewardModel": {
        "xwin_jobs/stages/best_of_n.py": "bestOfN's input 'rewardModel'",
        "xwin_jobs/judge/report.py": "evaluate's report shows the reward model's accuracy",
        "xwin_jobs/judge/table.py": "evaluate's table shows the reward model's accuracy",
    },
    "bestOfN": {
        "xwin_jobs/stages/dpo.py": "dpo's params.pairsFrom: 'bestOfN'",
        "xwin_jobs/judge/report.py": "evaluate's report shows best-of-N's scores",
        "xwin_jobs/judge/table.py": "evaluate's table shows best-of-N's scores",
    },
    "rejectionSampling": {},
    "dpo": {},
    "evaluate": {
        "operator/xwin_operator/api/rules.py": "evaluate's own rules: alpacaEval or mtBench, the reference",
        "operator/xwin_operator/api/crd.py": "the same rules as CEL",
        "operator/xwin_operator/core/planner.py": "alpacaEval's and mtBench's URIs as external inputs",
        "operator/xwin_operator/core/judge_estimate.py": "what the evaluate stage costs in judge calls",
    },
}


def _spelled(keys: tuple[str, ...]) -> dict[str, set[str]]:
    """key -> the source files of both packages holding it as a string, an attribute name or
    a declared field's name."""
    out: dict[str, set[str]] = {k: set() for k in keys}
    for folder in ("operator/xwin_operator", "xwin_jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                word = (node.value if isinstance(node, ast.Constant) else
                        node.attr if isinstance(node, ast.Attribute) else
                        node.target.id if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        else None)
                if word in out:
                    out[word].add(str(path.relative_to(ROOT)))
    return out


def test_where_each_stage_key_is_spelled():
    spelled = _spelled(STAGE_ORDER)
    assert set(ELSEWHERE) == set(STAGE_ORDER)
    for key in STAGE_ORDER:
        assert spelled[key] - REGISTRATION == set(ELSEWHERE[key]), key
        assert REGISTRATION <= spelled[key], key
