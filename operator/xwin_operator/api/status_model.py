"""`.status` of an AlignmentRun as pydantic models: the CRD's status schema is generated from
them (api/crd.py). core/status.py computes the values; docs/design.md section 3.3 shows them.

Progress and cost are what users look at while a run lasts (`kubectl get ar`: PROGRESS, ETA,
COST): a running stage's `progress` comes from its pods' live record in the store
(xwin_jobs.progress), its `cost` from its children's lifetimes and GPUs and from its judge's
spend; the run's `progress` and `cost` sum them up. Pure: pydantic.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class StageProgress(_Model):
    step: str = Field(..., description="The step whose pods report it (train, sample, score, judge, sample-<model>).")
    unit: Literal["steps", "prompts", "comparisons"] = Field(..., description="What done and total count.")
    done: int = Field(..., ge=0)
    total: int = Field(..., ge=0)
    percent: float = Field(..., ge=0, le=100, description="done / total, in percent.")
    etaSeconds: Optional[int] = Field(None, ge=0, description="Seconds to go at the rate so far (absent until there is a rate).")
    rate: Optional[float] = Field(None, ge=0, description="Units per second since the step started.")
    updatedAt: str = Field(..., description="When the pods last wrote their record.")
    metrics: dict[str, float] = Field(default_factory=dict, description="loss, learningRate, tokensPerSecond (training); responsesPerSecond (sampling); usd, requestsPerSecond (judging).")
    stalled: Optional[bool] = Field(None, description="True when done has not moved for the operator's stallSeconds (15 minutes unless set; absent otherwise).")


class Cost(_Model):
    gpuHours: float = Field(0.0, ge=0, description="Sum over the children of their lifetime (creation to end) x the GPUs their pods ask for.")
    judgeUSD: float = Field(0.0, ge=0, description="What the judge steps spent, as estimated from the tokens the API reported.")
    summary: Optional[str] = Field(None, description="Run level: both, for `kubectl get` (\"$4.10, 12.3 GPU-h\").")
    children: dict[str, float] = Field(default_factory=dict, description="Stage level: GPU-hours by child (kept after the child is deleted).")


class RunProgress(_Model):
    percent: float = Field(..., ge=0, le=100, description="The stages' progress weighted by their estimated cost.")
    etaSeconds: Optional[int] = Field(None, ge=0)
    summary: str = Field(..., description="The stage in progress and its percent, for `kubectl get` (\"dpo 41%\").")
    eta: Optional[str] = Field(None, description="etaSeconds for `kubectl get` (\"2h13m\").")


class StageStatus(_Model):
    name: str
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Skipped"] = "Pending"
    attempts: int = 0
    startTime: Optional[str] = None
    completionTime: Optional[str] = None
    artifact: Optional[str] = None
    children: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    reason: Optional[str] = None   # a Failed stage: StageFailed, UnsupportedModel, InputNotFound, ...
    message: Optional[str] = None
    progress: Optional[StageProgress] = None
    cost: Optional[Cost] = None


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: Optional[str] = None
    message: Optional[str] = None
    lastTransitionTime: Optional[str] = None


class AlignmentRunStatus(_Model):
    phase: Phase = "Pending"
    stage: Optional[str] = None
    observedGeneration: Optional[int] = None
    message: Optional[str] = None
    progress: Optional[RunProgress] = None
    cost: Optional[Cost] = None
    stages: list[StageStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
