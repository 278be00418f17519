"""One descriptor per stage: what the operator knows of it, registered once, in pipeline order.

A descriptor holds the stage's key; its spec model (api/spec.py: its class variables are the
stage's reference rules); `steps`, what it runs, as a function of its settings; `params`, the
fields of its settings its task carries as they are, and `task`, which adds its inputs and any
other params (core/tasks.py adds the settings its kind shares: `training` and `resources`,
`sampling` and `serving`, `judge`); and `weight`, its relative hours per GPU (the run's
percent, core/progress.py). What the jobs know of the stage (entry point, kind, the limits of
its params) is its entry in xwin_jobs.pipeline.JOBS, `descriptor.job`; tests/test_descriptors.py
checks that the two agree. Adding a stage: docs/design.md, section 2.1. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from xwin_jobs.pipeline import StageJob, job

from ..api.spec import (AlignmentRunSpec, BestOfNStage, DPOStage, EvaluateStage, PairsStage,
                        RejectionSamplingStage, RewardModelStage, SFTStage, resolved_resources)
from .inputs import TaskParts, stage_uri
from .steps import Step, judge, model_slug, score, served_sampling, train


@dataclass(frozen=True)
class StageDescriptor:
    key: str                                    # spec.stages.<key>; the jobs' entry has the same
    spec: type                                  # its spec model; `spec.references`, `spec.required`
    steps: Callable[[str, Any], list[Step]]     # (key, its settings) -> its steps, in order
    task: Callable[[TaskParts, Any], None]      # adds its own inputs and params to `parts`
    weight: float                               # relative hours per GPU at the recipe's sizes
    params: tuple[str, ...] = ()                # fields copied into the task's params as they are

    @property
    def job(self) -> StageJob:
        """The jobs' side of the stage: entry point, kind, param limits (xwin_jobs.pipeline)."""
        return job(self.key)


def _sft(t: TaskParts, st: SFTStage) -> None:
    t.uri("model", t.spec.baseModel)
    t.uri("data", st.data)


def _pairs(t: TaskParts, st: PairsStage) -> None:
    t.model("policy", st.policy)
    t.uri("prompts", st.prompts)


def _reward_model(t: TaskParts, st: RewardModelStage) -> None:
    t.model("model", st.init)
    t.data("pairs", st.pairs)


def _best_of_n(t: TaskParts, st: BestOfNStage) -> None:
    t.model("policy", st.policy)
    t.model("rewardModel", st.rewardModel)
    t.uri("prompts", st.prompts)
    t.params["scoringResources"] = resolved_resources(t.spec, st.scoringResources)


def _rejection_sampling(t: TaskParts, st: RejectionSamplingStage) -> None:
    t.model("model", st.init)
    t.data("scored", st.scored)


def _dpo(t: TaskParts, st: DPOStage) -> None:
    t.model("model", st.init)
    t.data("scored" if st.pairsFrom == "bestOfN" else "pairs", st.pairsFrom)
    if st.rejectedFloor is not None:   # absent when unset: unchanged digests for old specs
        t.params["rejectedFloor"] = st.rejectedFloor
    if st.rpoAlpha:   # absent when 0 (plain DPO): unchanged digests for old specs
        t.params["rpoAlpha"] = st.rpoAlpha


def _evaluate(t: TaskParts, st: EvaluateStage) -> None:
    for m in st.models:
        t.model(f"model:{m}", m)
    if st.alpacaEval:
        t.uri("alpacaPrompts", st.alpacaEval.prompts)
        if st.alpacaEval.reference in st.models:   # a model's own answers are the reference
            t.params["referenceModel"] = st.alpacaEval.reference
        else:
            t.uri("alpacaReference", st.alpacaEval.reference)
    if st.mtBench:
        t.uri("mtBenchQuestions", st.mtBench.questions)
    t.params["models"] = list(st.models)
    if st.passGrade is not None:
        t.params["passGrade"] = st.passGrade
    # the paper's table also shows the reward model's and best-of-N's figures: read from
    # those stages' markers when the report is written (not inputs: evaluate does not wait)
    stages = t.spec.stages
    t.params["recipeStages"] = {k: stage_uri(t.root, k) for k in ("rewardModel", "bestOfN")
                                if getattr(stages, k) is not None and not getattr(stages, k).reused}


def _evaluate_steps(key: str, st: EvaluateStage) -> list[Step]:
    steps: list[Step] = []
    for i, ref in enumerate(st.models):
        steps += served_sampling(key, f"model:{ref}", f"-{model_slug(ref, i)}")
    return steps + [judge(key)]


DESCRIPTORS: tuple[StageDescriptor, ...] = (
    StageDescriptor("sft", SFTStage, train, _sft, weight=4.0),
    StageDescriptor("pairs", PairsStage, lambda key, st: served_sampling(key, "policy") + [judge(key)],
                    _pairs, weight=2.0, params=("candidatesPerPrompt", "disagreement")),
    StageDescriptor("rewardModel", RewardModelStage, train, _reward_model, weight=1.0,
                    params=("heldOutFraction",)),
    StageDescriptor("bestOfN", BestOfNStage, lambda key, st: served_sampling(key, "policy") + [score(key)],
                    _best_of_n, weight=3.0, params=("n",)),
    StageDescriptor("rejectionSampling", RejectionSamplingStage, train, _rejection_sampling, weight=2.0,
                    params=("topK",)),
    StageDescriptor("dpo", DPOStage, train, _dpo, weight=2.0,
                    params=("beta", "chosen", "rejected", "minMargin", "pairsFrom")),
    StageDescriptor("evaluate", EvaluateStage, _evaluate_steps, _evaluate, weight=1.0),
)

_BY_KEY = {d.key: d for d in DESCRIPTORS}


def descriptor(stage: str) -> StageDescriptor:
    try:
        return _BY_KEY[stage]
    except KeyError:
        raise KeyError(f"unknown stage {stage!r}") from None


def stage_steps(stage: str, settings: Any = None) -> list[Step]:
    """The steps of a stage with these settings (its spec model's defaults when None), in order."""
    d = descriptor(stage)
    return d.steps(stage, d.spec() if settings is None else settings)


def steps_of(spec: AlignmentRunSpec, stage: str) -> list[Step]:
    """The steps of one (non-reused) stage of a run, in order."""
    return stage_steps(stage, getattr(spec.stages, stage))
