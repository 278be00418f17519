"""The AlignmentRun resource as one pydantic v2 model: the single source of the API.

The CRD (`xwin crd`) is generated from these classes, `xwin validate` checks files with them,
and the planner reads the resolved values. Field names are the camelCase of the Kubernetes
API; every field has a description that lands in the CRD (and `kubectl explain`).

Inheritance of defaults: a stage's `training`, `resources`, `sampling` and `serving` leave
unset fields as None; `spec.defaults` fills them, then the built-in defaults below. The API
server must not fill them (that would hide `spec.defaults`), so the CRD carries no `default`
for those nested fields. `resolved_*` helpers do the merge.

A stage's model carries its reference rules as class variables (`_Stage`); the limits of the
numbers its task's params carry are its job's (xwin_jobs.pipeline: `param_field`). The run-level
blocks (storage, judge, images, scheduling, retries) and the bounds are in settings.py.

Pure: pydantic, and the training defaults of xwin_jobs.training.config (standard library only).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from xwin_jobs.pipeline import SAMPLING_STAGES, STAGE_ORDER, TRAINING_STAGES, param_field
from xwin_jobs.training.config import TRAINING_BOUNDS as _BOUNDS
from xwin_jobs.training.config import (SCHEDULERS, TRAINING_DEFAULTS, TrainingConfigError,
                                       check_training_settings)

from .rules import cross_field_errors
from .settings import (MODELS_MAX, NAME_MAX, QUANTITY_MAX, URI_MAX, Images, Judge, Retries, Scheduling, Storage,
                       _Model, _QUANTITY_PATTERN, _URI_PATTERN)
from .status_model import AlignmentRunStatus, Condition, Phase, StageStatus  # noqa: F401 (the API's names)

API_GROUP = "xwin.ai"
API_VERSION = "v1alpha1"
KIND = "AlignmentRun"
PLURAL = "alignmentruns"


# --- building blocks --------------------------------------------------------------------


# The ranges are xwin_jobs.training.config's TRAINING_BOUNDS, which the trainer checks too.
class Training(_Model):
    """Optimisation settings of a training stage. Unset fields inherit from spec.defaults.training."""

    epochs: Optional[int] = Field(None, **_BOUNDS["epochs"], description="Passes over the stage's data.")
    learningRate: Optional[float] = Field(None, **_BOUNDS["learningRate"], description="Peak AdamW learning rate.")
    globalBatchSize: Optional[int] = Field(None, **_BOUNDS["globalBatchSize"], description="Sequences per optimizer step, across all GPUs (reached by gradient accumulation).")
    microBatchSize: Optional[int] = Field(None, **_BOUNDS["microBatchSize"], description="Sequences per forward pass on one device. Unset: derived as DeepSpeed does, the largest micro-batch up to 4 that makes globalBatchSize = micro-batch x ranks x accumulation steps exact on the stage's ranks (the stage log and metrics.json say which); set, it must make that product exact under ZeRO.")
    microBatchTokens: Optional[int] = Field(None, **_BOUNDS["microBatchTokens"], description="Token budget of one forward pass on one device (positions fed, padding included): each optimizer step's examples are grouped by length into micro-batches under this budget. Unset: microBatchSize x sequences per example (2 for pairs) x maxLength, the most a padded micro-batch could feed. Set, it must hold the longest example (a pair counts twice its longer side). 0 = micro-batches of microBatchSize examples.")
    packing: Optional[bool] = Field(None, description="Pack several sequences into one row without padding, each with its own position ids (attention never crosses sequences), where the model's attention supports it; otherwise micro-batches are padded to their longest sequence.")
    maxLength: Optional[int] = Field(None, **_BOUNDS["maxLength"], description="Tokens per sequence; longer ones are truncated.")
    zeroStage: Optional[int] = Field(None, **_BOUNDS["zeroStage"], description="0 = plain data parallel (DDP: every GPU holds the whole model and optimizer state); 1, 2, 3 = DeepSpeed ZeRO of that stage (optimizer state; + gradients; + parameters partitioned over the GPUs). ZeRO needs globalBatchSize = micro-batch x GPUs x accumulation steps exactly.")
    offloadOptimizer: Optional[bool] = Field(None, description="ZeRO-Offload: keep the optimizer state (16 bytes per parameter, split over the GPUs) in host memory and update it on the CPU. Needs zeroStage 1-3.")
    gradientCheckpointing: Optional[bool] = Field(None, description="Recompute activations in the backward pass to save memory.")
    seed: Optional[int] = Field(None, **_BOUNDS["seed"], description="Seed for data order and initialisation of new heads.")
    checkpointEvery: Optional[int] = Field(None, **_BOUNDS["checkpointEvery"], description="Upload a resumable checkpoint every N optimizer steps (0 = only on SIGTERM, e.g. preemption).")
    warmupRatio: Optional[float] = Field(None, **_BOUNDS["warmupRatio"], description="Fraction of steps spent warming the learning rate up.")
    weightDecay: Optional[float] = Field(None, **_BOUNDS["weightDecay"], description="AdamW weight decay.")
    lrScheduler: Optional[Literal[SCHEDULERS]] = Field(None, description="Learning-rate schedule after warm-up.")
    maxSteps: Optional[int] = Field(None, **_BOUNDS["maxSteps"], description="Stop after this many optimizer steps (0 = no limit).")
    maxGradNorm: Optional[float] = Field(None, **_BOUNDS["maxGradNorm"], description="Clip the global gradient norm to this (0 = no clipping).")
    keepCheckpoints: Optional[int] = Field(None, **_BOUNDS["keepCheckpoints"], description="Checkpoints (checkpoints/step-N/) kept once the stage succeeds, newest first; a restarted stage resumes from the newest complete one.")
    collectiveTimeoutMinutes: Optional[float] = Field(None, **_BOUNDS["collectiveTimeoutMinutes"], description="How long a rank waits in a collective (NCCL/gloo, torch.distributed and DeepSpeed's process group) before it fails, so a dead or hung rank stops the job instead of holding every GPU (default 30). The final model upload is outside every collective.")
    compile: Optional[bool] = Field(None, description="Run the model's forward through torch.compile (dynamic shapes; not under zeroStage 3). Default off: on CPU it made no step faster. Where torch.compile is unavailable or fails, the stage trains eager and logs one line.")


class Resources(_Model):
    """Compute for one stage. Unset fields inherit from spec.defaults.resources."""

    nodes: Optional[int] = Field(None, ge=1, le=1024, description="Pods of a training job (one Master plus nodes-1 Workers).")
    gpusPerNode: Optional[int] = Field(None, ge=0, le=16, description="nvidia.com/gpu requested by each pod.")
    cpu: Optional[str] = Field(None, max_length=QUANTITY_MAX, description="CPU request of each pod, Kubernetes quantity (e.g. '16').")
    memory: Optional[str] = Field(None, max_length=QUANTITY_MAX, description="Memory request of each pod, Kubernetes quantity (e.g. '200Gi').")
    scratch: Optional[str] = Field(None, max_length=QUANTITY_MAX, pattern=_QUANTITY_PATTERN, description="Size of each pod's scratch volume (/scratch: the node's one copy of the stage's model, checkpoint staging, the saved model), Kubernetes quantity: an ephemeral-storage request and the emptyDir's sizeLimit, or with scratchStorageClass a generic ephemeral volume of that size. A 7B stage on 16 GPUs needs about 120Gi, a 70B stage on 64 GPUs about 600Gi (README, 'Scratch space').")
    scratchStorageClass: Optional[str] = Field(None, min_length=1, max_length=NAME_MAX, description="Make the scratch volume a generic ephemeral volume (a PersistentVolumeClaim living with the pod) of this StorageClass and `scratch` size, for nodes whose own disk is too small.")


RESOURCES_DEFAULTS = dict(nodes=1, gpusPerNode=8, cpu=None, memory=None)


class Sampling(_Model):
    """Decoding settings for the sampler. Unset fields inherit from spec.defaults.sampling."""

    temperature: Optional[float] = Field(None, ge=0, le=5, description="Softmax temperature (0 = greedy).")
    topP: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    maxTokens: Optional[int] = Field(None, ge=1, le=1048576, description="Tokens generated per response at most.")
    seed: Optional[int] = Field(None, ge=0, description="Sampling seed (per prompt it is combined with the prompt id).")


SAMPLING_DEFAULTS = dict(temperature=1.0, topP=1.0, maxTokens=2048, seed=0)


class Serving(_Model):
    """The vLLM server that the sampler talks to. Unset fields inherit from spec.defaults.serving."""

    replicas: Optional[int] = Field(None, ge=1, le=256, description="vLLM server pods.")
    gpusPerReplica: Optional[int] = Field(None, ge=0, le=16, description="nvidia.com/gpu per vLLM pod: tensorParallel x pipelineParallel (the default; any other value but 0, a CPU server, is refused).")
    tensorParallel: Optional[int] = Field(None, ge=1, le=16, description="vLLM --tensor-parallel-size: GPUs each layer is split over.")
    pipelineParallel: Optional[int] = Field(None, ge=1, le=16, description="vLLM --pipeline-parallel-size: consecutive groups of layers on this many groups of GPUs (default 1).")
    maxModelLen: Optional[int] = Field(None, ge=16, description="vLLM --max-model-len (default: the model's).")
    scratch: Optional[str] = Field(None, max_length=QUANTITY_MAX, pattern=_QUANTITY_PATTERN, description="Size of each server pod's scratch volume, where the model is copied before vLLM starts (Kubernetes quantity: an ephemeral-storage request and the emptyDir's sizeLimit); a 70B model in bf16 needs about 150Gi.")
    gpuMemoryUtilization: Optional[float] = Field(None, gt=0, le=1, description="vLLM --gpu-memory-utilization: the share of each GPU's memory vLLM may take for weights and KV cache (default: vLLM's, 0.9).")
    concurrency: Optional[int] = Field(None, ge=1, le=4096, description="Requests the sampler keeps in flight per replica.")


# gpusPerReplica: None here = tensorParallel x pipelineParallel (resolved_serving). The newer
# fields (pipelineParallel, gpuMemoryUtilization) are absent when unset, as before they existed.
SERVING_DEFAULTS = dict(replicas=1, gpusPerReplica=None, tensorParallel=1, maxModelLen=None, concurrency=64)


class Defaults(_Model):
    """Settings merged under every stage's own."""

    training: Training = Field(default_factory=Training)
    resources: Resources = Field(default_factory=Resources)
    sampling: Sampling = Field(default_factory=Sampling)
    serving: Serving = Field(default_factory=Serving)


# --- stages -----------------------------------------------------------------------------

_FROM = Field(None, alias="from", max_length=URI_MAX, pattern=_URI_PATTERN,
              description="Reuse an artifact made elsewhere instead of running the stage: a model folder for model stages, a JSON Lines file or folder of shards for data stages.")
_POLICY_DESC = "The model that samples: a stage key (sft, rejectionSampling, dpo), 'base', or a model URI."
# the models a sampling stage may name besides a URI: the policy stages and 'base' (spec.baseModel)
POLICY_KEYS = ("sft", "rejectionSampling", "dpo", "base")


class _Stage(_Model):
    """A stage's settings. Its rules between fields are class variables (api/rules.py checks
    them, api/crd.py makes them CEL rules; a reused stage skips them): `references`, each field
    naming another stage, with the stage keys it may name besides a URI (a list field: each
    item); `required`, the fields required unless the stage is reused (`from:`)."""

    references: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    required: ClassVar[tuple[str, ...]] = ()

    from_: Optional[str] = _FROM

    @property
    def reused(self) -> bool:
        return self.from_ is not None


class _TrainingStage(_Stage):
    training: Training = Field(default_factory=Training, description="Optimisation settings; unset fields inherit spec.defaults.training.")
    resources: Resources = Field(default_factory=Resources, description="Compute; unset fields inherit spec.defaults.resources.")


class _SamplingStage(_Stage):
    sampling: Sampling = Field(default_factory=Sampling, description="Decoding settings; unset fields inherit spec.defaults.sampling.")
    serving: Serving = Field(default_factory=Serving, description="vLLM server; unset fields inherit spec.defaults.serving.")


class SFTStage(_TrainingStage):
    """Xwin-LM-SFT: finetune the base model on conversations (loss on assistant turns only)."""

    required = ("data",)

    data: Optional[str] = Field(None, max_length=URI_MAX, pattern=_URI_PATTERN, description="Conversation records (JSON Lines file or folder of shards).")


class PairsStage(_SamplingStage):
    """Xwin-Pair: the policy samples candidates per prompt and the judge compares them in both orders."""

    references = {"policy": POLICY_KEYS}
    required = ("prompts",)

    prompts: Optional[str] = Field(None, max_length=URI_MAX, pattern=_URI_PATTERN, description="Prompt records.")
    policy: str = Field("sft", max_length=URI_MAX, description=_POLICY_DESC)
    candidatesPerPrompt: int = Field(**param_field("pairs", "candidatesPerPrompt"), description="Candidates sampled per prompt; every pair of them is judged.")
    disagreement: Literal["tie", "drop"] = Field("drop", description="What a comparison whose two orders disagree becomes.")


class RewardModelStage(_TrainingStage):
    """Xwin-RM: a Bradley-Terry reward model trained on preference pairs."""

    references = {"init": ("sft", "base"), "pairs": ("pairs",)}

    init: str = Field("sft", max_length=URI_MAX, description="Initial weights: a stage key (sft), 'base', or a model URI.")
    pairs: str = Field("pairs", max_length=URI_MAX, description="Preference pairs: the 'pairs' stage or a data URI.")
    heldOutFraction: float = Field(**param_field("rewardModel", "heldOutFraction"), description="Pairs held out to report pair accuracy.")


class BestOfNStage(_SamplingStage):
    """Xwin-Set: the policy samples n responses per prompt; the reward model scores each."""

    references = {"policy": POLICY_KEYS, "rewardModel": ("rewardModel",)}
    required = ("prompts",)

    prompts: Optional[str] = Field(None, max_length=URI_MAX, pattern=_URI_PATTERN, description="Prompt records.")
    policy: str = Field("sft", max_length=URI_MAX, description=_POLICY_DESC)
    rewardModel: str = Field("rewardModel", max_length=URI_MAX, description="The scorer: the 'rewardModel' stage or a model URI.")
    n: int = Field(**param_field("bestOfN", "n"), description="Responses sampled per prompt.")
    scoringResources: Resources = Field(default_factory=Resources, description="Compute of the scoring job.")


class RejectionSamplingStage(_TrainingStage):
    """Xwin-LM-RS: finetune on the top-k scored responses of every prompt."""

    references = {"init": ("sft", "base"), "scored": ("bestOfN",)}

    init: str = Field("sft", max_length=URI_MAX, description="Initial weights: a stage key (sft), 'base', or a model URI.")
    scored: str = Field("bestOfN", max_length=URI_MAX, description="The scored set: the 'bestOfN' stage or a data URI.")
    topK: int = Field(**param_field("rejectionSampling", "topK"), description="Responses kept per prompt.")


class DPOStage(_TrainingStage):
    """Xwin-LM-DPO: direct preference optimisation on pairs built from the scored set (or on judged pairs)."""

    references = {"init": ("sft", "rejectionSampling", "base"), "pairsFrom": ("bestOfN", "pairs")}

    init: str = Field("rejectionSampling", max_length=URI_MAX, description="Initial weights and reference model: a stage key, 'base', or a model URI.")
    beta: float = Field(**param_field("dpo", "beta"), description="DPO temperature: strength of the KL constraint to the reference.")
    chosen: str = Field("best", max_length=32, pattern=r"^(best|rank:[1-9][0-9]*)$", description="best | rank:N (1 = best).")
    rejected: str = Field("worst", max_length=32, pattern=r"^(worst|random|rank:[1-9][0-9]*)$", description="worst | rank:N (counted from the best) | random (seeded).")
    rejectedFloor: Optional[float] = Field(None, ge=0, lt=1, description="A quantile q in [0, 1): the rejected answer is picked (by `rejected`) only among responses scoring at or above the q-quantile of all scores in the scored set, so it is the lowest-ranked plausible answer rather than a degenerate one (a refusal, an empty or cut-off answer) that rejection sampling already taught the policy to avoid: DPO learns from near misses, best vs a lower-ranked response as Xwin-LM-DPO pairs them. Prompts with nothing at or above the floor below their chosen answer get no pair. Unset: every response may be rejected.")
    minMargin: float = Field(0.0, ge=0, description="Drop pairs whose reward gap is smaller than this.")
    rpoAlpha: float = Field(**param_field("dpo", "rpoAlpha"), description="RPO (Pang et al. 2024; TRL's rpo_alpha): adds rpoAlpha times the chosen answer's negative log-likelihood per token (its mean over the answer's tokens, then over pairs) to the DPO loss, so the policy keeps (raises) the chosen answers' probability instead of only widening the gap to the rejected ones, which can lower both. 0: plain DPO.")
    pairsFrom: str = Field("bestOfN", max_length=URI_MAX, description="bestOfN (Xwin-LM-DPO) | pairs (plain DPO on judged pairs) | a pairs data URI.")


_REFERENCE_PATTERN = r"^(s3://[^/]+.*|file://.+|hf://.+|/.+|" + "|".join(POLICY_KEYS) + r")$"


class AlpacaEval(_Model):
    prompts: str = Field(..., max_length=URI_MAX, pattern=_URI_PATTERN, description="AlpacaEval instructions (prompt records).")
    reference: str = Field(..., max_length=URI_MAX, pattern=_REFERENCE_PATTERN, description="What every model is compared with: a file of reference outputs ({id, output} records, one for every prompt id), or one of evaluate.models (sft, rejectionSampling, dpo, base): that model's own answers, as AlpacaEval compares with a fixed reference model.")


class MTBench(_Model):
    questions: str = Field(..., max_length=URI_MAX, pattern=_URI_PATTERN, description="Two-turn MT-bench questions.")


class EvaluateStage(_SamplingStage):
    """AlpacaEval-style win rates and MT-bench-style grades for each listed model."""

    references = {"models": POLICY_KEYS}

    models: list[Annotated[str, StringConstraints(max_length=URI_MAX)]] = Field(default_factory=lambda: ["sft", "rejectionSampling", "dpo"], min_length=1, max_length=MODELS_MAX, description=f"Stage keys or model URIs (at most {MODELS_MAX}).")
    alpacaEval: Optional[AlpacaEval] = None
    mtBench: Optional[MTBench] = None
    passGrade: Optional[int] = Field(None, ge=1, le=10, description="Also report accuracy: the share of graded MT-bench answers the judge grades at least this (10 with an exact grader: exactly right).")


class Stages(_Model):
    sft: Optional[SFTStage] = None
    pairs: Optional[PairsStage] = None
    rewardModel: Optional[RewardModelStage] = None
    bestOfN: Optional[BestOfNStage] = None
    rejectionSampling: Optional[RejectionSamplingStage] = None
    dpo: Optional[DPOStage] = None
    evaluate: Optional[EvaluateStage] = None

    def present(self) -> list[str]:
        return [k for k in STAGE_ORDER if getattr(self, k) is not None]


class AlignmentRunSpec(_Model):
    baseModel: str = Field(..., max_length=URI_MAX, pattern=r"^(s3://[^/]+.*|file://.+|hf://.+|/.+)$", description="A Hugging Face model folder: s3://, file:// or hf://org/name.")
    chatTemplate: Literal["vicuna", "tokenizer"] = Field("vicuna", description="vicuna (Xwin-LM's prompt format) | tokenizer (the tokenizer's own chat template).")
    storage: Storage
    judge: Optional[Judge] = None
    stages: Stages = Field(default_factory=Stages)
    defaults: Defaults = Field(default_factory=Defaults)
    images: Images = Field(default_factory=Images)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    retries: Retries = Field(default_factory=Retries)
    suspend: bool = Field(False, description="Stop creating children and suspend running ones; false resumes.")

    @model_validator(mode="after")
    def _cross_field(self) -> "AlignmentRunSpec":
        errors = cross_field_errors(self) + training_errors(self) + serving_errors(self)
        if errors:  # ctx keeps each (path, message) so error reports can point at the field
            raise PydanticCustomError("cross_field", "{summary}", {
                "summary": "; ".join(f"{path}: {msg}" for path, msg in errors), "errors": errors})
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(..., min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = Field("default", min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class AlignmentRun(_Model):
    apiVersion: Literal["xwin.ai/v1alpha1"] = "xwin.ai/v1alpha1"
    kind: Literal["AlignmentRun"] = "AlignmentRun"
    metadata: ObjectMeta
    spec: AlignmentRunSpec
    status: Optional[AlignmentRunStatus] = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _meta(cls, v: Any) -> Any:
        return v if v is not None else {}


# --- resolution of inherited settings ---------------------------------------------------


def _merge(own: BaseModel, default: BaseModel, builtin: dict[str, Any]) -> dict[str, Any]:
    """builtin, then the set fields of `default`, then those of `own` (flat models of scalars:
    iterating gives what model_dump(exclude_none=True) would, several times faster)."""
    out = dict(builtin)
    for src in (default, own):
        out.update((k, v) for k, v in src if v is not None)
    return out


def resolved_training(spec: AlignmentRunSpec, stage: _TrainingStage) -> dict[str, Any]:
    return _merge(stage.training, spec.defaults.training, TRAINING_DEFAULTS)


def training_errors(spec: AlignmentRunSpec) -> list[tuple[str, str]]:
    """The trainer's own start-up check (xwin_jobs.training.config.check_training_settings) on
    each training stage's resolved settings, with the world size its pods will have (nodes x
    max(1, gpusPerNode)): a batch geometry DeepSpeed cannot produce is refused at validate time,
    as (field path, message), before any child exists."""
    errs = []
    for key in TRAINING_STAGES:
        stage = getattr(spec.stages, key)
        if stage is None or stage.reused:
            continue
        res = resolved_resources(spec, stage.resources)
        where = f"spec.stages.{key}.training"
        try:
            check_training_settings(resolved_training(spec, stage), res["nodes"] * max(1, res["gpusPerNode"]), where)
        except TrainingConfigError as e:
            path, _, msg = str(e).partition(": ")
            errs.append((path if path.startswith(where) else where, msg or str(e)))
    return errs


def resolved_resources(spec: AlignmentRunSpec, res: Resources) -> dict[str, Any]:
    return _merge(res, spec.defaults.resources, RESOURCES_DEFAULTS)


def resolved_sampling(spec: AlignmentRunSpec, stage: _SamplingStage) -> dict[str, Any]:
    return _merge(stage.sampling, spec.defaults.sampling, SAMPLING_DEFAULTS)


def resolved_serving(spec: AlignmentRunSpec, stage: _SamplingStage) -> dict[str, Any]:
    """The stage's serving settings; gpusPerReplica, when neither the stage nor spec.defaults
    sets it, is the GPUs the server's parallelism needs (tensorParallel x pipelineParallel)."""
    out = _merge(stage.serving, spec.defaults.serving, SERVING_DEFAULTS)
    if out.get("gpusPerReplica") is None:
        out["gpusPerReplica"] = server_gpus(out)
    return out


def server_gpus(serving: dict[str, Any]) -> int:
    """GPUs one vLLM server uses: tensorParallel x pipelineParallel."""
    return int(serving.get("tensorParallel") or 1) * int(serving.get("pipelineParallel") or 1)


def serving_errors(spec: AlignmentRunSpec) -> list[tuple[str, str]]:
    """A server whose parallelism does not match the GPUs it requests (vLLM would crash-loop
    waiting for GPUs it cannot see, or leave some idle), as (field path, message)."""
    errs = []
    for key in SAMPLING_STAGES:
        stage = getattr(spec.stages, key)
        if stage is None or stage.reused:
            continue
        serving = resolved_serving(spec, stage)
        gpus, need = serving["gpusPerReplica"], server_gpus(serving)
        if gpus and gpus != need:
            owner = "stages." + key if stage.serving.gpusPerReplica is not None else "defaults"
            errs.append((f"spec.{owner}.serving.gpusPerReplica",
                         f"{gpus} GPU(s) per server, but tensorParallel {serving.get('tensorParallel') or 1} x "
                         f"pipelineParallel {serving.get('pipelineParallel') or 1} = {need} GPU(s) per vLLM "
                         f"server (stage {key}); set gpusPerReplica: {need} or leave it unset (it "
                         f"defaults to that product)"))
    return errs
