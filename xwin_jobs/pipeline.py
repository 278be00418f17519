"""The recipe's stages as the jobs see them: one `StageJob` per stage, in pipeline order.

An entry holds what the jobs and the operator both need without importing each other: the
stage's key, the module of its job (`xwin_jobs/stages/<module>.py`: `run(ctx)`, plus one
`<step>_step(task, store)` per step run as a process of its own), what kind of stage it is,
and the limits of the numbers its task's params carry (the spec model's fields are declared
with the same limits; the job shell checks them before the stage runs).

The operator's side of a stage (spec model, steps, task) is its descriptor in
`xwin_operator/core/descriptors.py`; tests/test_descriptors.py checks that the two lists agree.
Standard library only: the operator imports this module.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

_COMPARE = {">=": operator.ge, ">": operator.gt, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Param:
    """A number of a stage's task params: its default and its limits, named as pydantic's
    `Field` names them (an int default makes it an integer)."""

    default: int | float
    ge: float | None = None
    gt: float | None = None
    lt: float | None = None
    le: float | None = None

    def field(self) -> dict[str, Any]:
        """Keyword arguments of the spec model's `Field`: the default and the limits."""
        limits = {k: getattr(self, k) for k in ("ge", "gt", "lt", "le") if getattr(self, k) is not None}
        return {"default": self.default, **limits}

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this param, or None."""
        integer = isinstance(self.default, int)
        limits = [(op, bound) for op, bound in ((">=", self.ge), (">", self.gt), ("<", self.lt),
                                                ("<=", self.le)) if bound is not None]
        if (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
                and all(_COMPARE[op](value, bound) for op, bound in limits)):
            return None
        within = " and ".join(f"{op} {bound:g}" for op, bound in limits)
        return f"must be {'an integer' if integer else 'a number'} {within}, got {value!r}"


@dataclass(frozen=True)
class StageJob:
    """One stage as the jobs see it (module docstring)."""

    key: str                       # the stage key: spec.stages.<key>, the store folder, task.stage
    module: str                    # xwin_jobs.stages.<module>
    training: bool = False         # trains a model: one `train` step, data parallel under torchrun
    sampling: bool = False         # a served model samples: `sampling` and `serving` settings
    judge: bool = False            # asks the LLM judge: needs spec.judge, gets its API key
    steps: tuple[str, ...] = ()    # steps run as processes of their own (`<stage>-<step>`)
    params: Mapping[str, Param] = field(default_factory=dict)

    @property
    def module_name(self) -> str:
        return f"xwin_jobs.stages.{self.module}"

    @property
    def entry(self) -> str:
        """The stage's function, "module:function" (imported only when it runs)."""
        return f"{self.module_name}:run"

    def step_entry(self, step: str) -> str:
        return f"{self.module_name}:{step}_step"


JOBS: tuple[StageJob, ...] = (
    StageJob("sft", "sft", training=True),
    StageJob("pairs", "pairs", sampling=True, judge=True, steps=("sample", "judge"),
             params={"candidatesPerPrompt": Param(4, ge=2, le=64)}),
    StageJob("rewardModel", "reward_model", training=True,
             params={"heldOutFraction": Param(0.1, ge=0, lt=1)}),
    StageJob("bestOfN", "best_of_n", sampling=True, steps=("sample", "score"),
             params={"n": Param(64, ge=1, le=1024)}),
    StageJob("rejectionSampling", "rejection_sampling", training=True,
             params={"topK": Param(1, ge=1, le=1024)}),
    StageJob("dpo", "dpo", training=True,
             params={"beta": Param(0.1, gt=0, le=100), "rpoAlpha": Param(0.0, ge=0, le=100)}),
    StageJob("evaluate", "evaluate", sampling=True, judge=True, steps=("sample", "judge")),
)

_BY_KEY = {j.key: j for j in JOBS}

STAGE_ORDER = tuple(j.key for j in JOBS)
TRAINING_STAGES = tuple(j.key for j in JOBS if j.training)
SAMPLING_STAGES = tuple(j.key for j in JOBS if j.sampling)
JUDGE_STAGES = tuple(j.key for j in JOBS if j.judge)


def job(stage: str) -> StageJob:
    """The entry of a stage key; KeyError names the known ones."""
    try:
        return _BY_KEY[stage]
    except KeyError:
        raise KeyError(f"unknown stage {stage!r}; known stages: {', '.join(STAGE_ORDER)}") from None


def param_field(stage: str, name: str) -> dict[str, Any]:
    """`Field` keyword arguments (default and limits) of a number of a stage's params."""
    return job(stage).params[name].field()
