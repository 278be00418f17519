"""The `training` block of a stage task, as a typed, validated value.

The planner always passes it fully resolved (camelCase keys as in the AlignmentRun spec).
`TRAINING_DEFAULTS` is the one set of defaults: the spec (operator/xwin_operator/api/spec.py)
resolves unset fields with it and hand-written tasks get the same values here.
`TRAINING_BOUNDS` is the one table of ranges: the spec declares its fields with it (the CRD's
minimum/maximum come from there) and `TrainingConfig` checks the same bounds. Pure.

Batch geometry is DeepSpeed's: globalBatchSize = micro-batch x ranks x accumulation steps.
`microBatchSize` has no resolved default: when a stage leaves it unset, `derive_geometry`
picks the largest micro-batch up to `DEFAULT_MICRO_BATCH_SIZE` that makes that product exact
for the ranks the stage runs on (so `globalBatchSize: 8` runs on 1 rank as 4 x 1 x 2 and on
8 GPUs as 1 x 8 x 1); only an explicit microBatchSize that conflicts is refused.
"""

from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Any

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant")

# spec key -> attribute
_KEYS = {
    "epochs": "epochs",
    "learningRate": "learning_rate",
    "globalBatchSize": "global_batch_size",
    "microBatchSize": "micro_batch_size",
    "microBatchTokens": "micro_batch_tokens",
    "packing": "packing",
    "maxLength": "max_length",
    "zeroStage": "zero_stage",
    "gradientCheckpointing": "gradient_checkpointing",
    "seed": "seed",
    "checkpointEvery": "checkpoint_every",
    "warmupRatio": "warmup_ratio",
    "weightDecay": "weight_decay",
    "lrScheduler": "lr_scheduler",
    "maxSteps": "max_steps",
    "maxGradNorm": "max_grad_norm",
    "offloadOptimizer": "offload_optimizer",
    "keepCheckpoints": "keep_checkpoints",
    "collectiveTimeoutMinutes": "collective_timeout_minutes",
    "compile": "compile",
}

# spec key -> default: the built-in value of every training setting, for the spec and here.
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 1, "learningRate": 2.0e-5, "globalBatchSize": 128,
    "maxLength": 4096, "zeroStage": 3, "gradientCheckpointing": True, "seed": 42,
    "checkpointEvery": 500, "warmupRatio": 0.03, "weightDecay": 0.0, "lrScheduler": "cosine",
    "maxSteps": 0, "maxGradNorm": 1.0, "offloadOptimizer": False, "keepCheckpoints": 1,
}
# spec key -> bounds, as pydantic's Field takes them (ge, gt, le, lt): the one table of ranges,
# for the spec's fields and `TrainingConfig._validate`. maxLength >= 16: a shorter window
# holds no chat turn (the vicuna system prompt alone is longer), so every example would be
# skipped. warmupRatio < 1: the warm-up must leave steps for lrScheduler's decay.
TRAINING_BOUNDS: dict[str, dict[str, float]] = {
    "epochs": {"ge": 1, "le": 1000}, "learningRate": {"gt": 0, "le": 1},
    "globalBatchSize": {"ge": 1}, "microBatchSize": {"ge": 1}, "microBatchTokens": {"ge": 0},
    "maxLength": {"ge": 16, "le": 1048576}, "zeroStage": {"ge": 0, "le": 3}, "seed": {"ge": 0},
    "checkpointEvery": {"ge": 0}, "warmupRatio": {"ge": 0, "lt": 1},
    "weightDecay": {"ge": 0, "le": 1}, "maxSteps": {"ge": 0}, "maxGradNorm": {"ge": 0},
    "keepCheckpoints": {"ge": 0, "le": 1000}, "collectiveTimeoutMinutes": {"gt": 0, "le": 1440},
}
_BOUND_CHECKS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
                 "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def bound_error(key: str, value: Any) -> str | None:
    """The first bound of TRAINING_BOUNDS[key] that `value` breaks, as "must be >= 1"
    (pydantic's wording); None when it keeps them all."""
    for name, limit in TRAINING_BOUNDS.get(key, {}).items():
        sign, holds = _BOUND_CHECKS[name]
        if not holds(value, limit):
            return f"must be {sign} {limit}"
    return None


# How long a rank waits in a collective before failing (`collectiveTimeoutMinutes`); not in
# TRAINING_DEFAULTS, so resolved tasks (and their digests) are unchanged when it is not set.
DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = 30.0
# The largest micro-batch a stage gets when it does not set microBatchSize (the micro-batch
# actually used is derived from globalBatchSize and the ranks: `derive_geometry`).
DEFAULT_MICRO_BATCH_SIZE = 4


class TrainingConfigError(ValueError):
    """A `training` field with a wrong type or value; the message names the field."""


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = TRAINING_DEFAULTS["epochs"]
    learning_rate: float = TRAINING_DEFAULTS["learningRate"]
    global_batch_size: int = TRAINING_DEFAULTS["globalBatchSize"]
    micro_batch_size: int = DEFAULT_MICRO_BATCH_SIZE
    # True when the task did not set microBatchSize: micro_batch_size is then only the cap of
    # the micro-batch `for_world` derives for the ranks (DeepSpeed's own rule).
    micro_batch_derived: bool = False
    # Not in TRAINING_DEFAULTS (left out of resolved tasks, so their digests stay as they were):
    # None (unset): the budget `token_budget` derives; 0: micro-batches of micro_batch_size examples
    micro_batch_tokens: int | None = None
    packing: bool = True  # padding-free packing where the attention kernel keeps sequences apart
    max_length: int = TRAINING_DEFAULTS["maxLength"]
    zero_stage: int = TRAINING_DEFAULTS["zeroStage"]
    gradient_checkpointing: bool = TRAINING_DEFAULTS["gradientCheckpointing"]
    seed: int = TRAINING_DEFAULTS["seed"]
    checkpoint_every: int = TRAINING_DEFAULTS["checkpointEvery"]
    warmup_ratio: float = TRAINING_DEFAULTS["warmupRatio"]
    weight_decay: float = TRAINING_DEFAULTS["weightDecay"]
    lr_scheduler: str = TRAINING_DEFAULTS["lrScheduler"]
    max_steps: int = TRAINING_DEFAULTS["maxSteps"]
    max_grad_norm: float = TRAINING_DEFAULTS["maxGradNorm"]
    offload_optimizer: bool = TRAINING_DEFAULTS["offloadOptimizer"]
    keep_checkpoints: int = TRAINING_DEFAULTS["keepCheckpoints"]
    collective_timeout_minutes: float = DEFAULT_COLLECTIVE_TIMEOUT_MINUTES
    # Not in TRAINING_DEFAULTS either: torch.compile of the model's forward (training.compiled),
    # off unless set: on CPU it made no step faster (docs/design.md section 8)
    compile: bool = False

    @property
    def collective_timeout(self) -> datetime.timedelta:
        """`collectiveTimeoutMinutes` as the process group's timeout."""
        return datetime.timedelta(minutes=self.collective_timeout_minutes)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (single process)."""
        return max(1, math.ceil(self.global_batch_size / self.micro_batch_size))

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, where: str = "params.training") -> "TrainingConfig":
        params = dict(params or {})
        unknown = sorted(set(params) - set(_KEYS))
        if unknown:
            log.warning("%s: ignoring unknown field(s) %s", where, ", ".join(unknown))
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, attr in _KEYS.items():
            if key not in params or params[key] is None:
                continue
            values[attr] = _coerce(params[key], types[attr], f"{where}.{key}")
        if "micro_batch_size" not in values:
            values["micro_batch_derived"] = True
        cfg = cls(**values)
        cfg._validate(where)
        return cfg

    def token_budget(self, sequences: int = 1) -> int:
        """Positions one forward pass may feed (0: no budget, micro-batches of micro_batch_size
        examples): microBatchTokens when set; unset, microBatchSize x `sequences` per example
        (2 for pairs) x maxLength, the most a padded micro-batch could feed, so short examples
        share a pass and peak memory stays what the padded worst case reaches."""
        if self.micro_batch_tokens is not None:
            return self.micro_batch_tokens
        return self.micro_batch_size * max(int(sequences), 1) * self.max_length

    def for_world(self, world_size: int, where: str = "params.training") -> "TrainingConfig":
        """This config with the micro-batch the run uses on `world_size` ranks (the derived
        one when microBatchSize was not set); raises TrainingConfigError where ZeRO cannot
        reach globalBatchSize exactly."""
        geometry = derive_geometry(self, world_size, where)
        return replace(self, micro_batch_size=geometry.micro)

    def _validate(self, where: str) -> None:
        for key, attr in _KEYS.items():
            msg = None if getattr(self, attr) is None else bound_error(key, getattr(self, attr))
            if msg:
                raise TrainingConfigError(f"{where}.{key}: {msg}")
        if self.lr_scheduler not in SCHEDULERS:
            raise TrainingConfigError(f"{where}.lrScheduler: must be one of {', '.join(SCHEDULERS)}")
        if self.offload_optimizer and not self.zero_stage:
            raise TrainingConfigError(f"{where}.offloadOptimizer: needs zeroStage 1, 2 or 3 "
                                      "(ZeRO-Offload is a DeepSpeed feature)")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    typ = (typ if isinstance(typ, str) else typ.__name__).removesuffix(" | None")
    if typ == "bool":
        if isinstance(value, bool):
            return value
    elif typ == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ == "str":
        if isinstance(value, str):
            return value
    raise TrainingConfigError(f"{where}: expected {typ}, got {value!r}")


@dataclass(frozen=True)
class Geometry:
    """How one optimizer step's globalBatchSize examples are cut: micro-batches of `micro`
    examples per rank, `accumulation` of them per rank and step; `derived`: microBatchSize
    was not set and `micro` was chosen for these ranks; `exact`: global = micro x ranks x
    accumulation (always under ZeRO; DDP accepts an uneven last share)."""

    micro: int
    accumulation: int
    ranks: int
    derived: bool
    exact: bool

    def describe(self, global_batch_size: int) -> str:
        how = ("derived (microBatchSize not set: the largest micro-batch up to "
               f"{DEFAULT_MICRO_BATCH_SIZE} that divides it)" if self.derived else "microBatchSize")
        sign = "=" if self.exact else "~"
        return (f"globalBatchSize {global_batch_size} {sign} micro-batch {self.micro} x "
                f"{self.ranks} rank(s) x {self.accumulation} accumulation step(s); micro-batch {how}")

    def metrics(self) -> dict[str, Any]:
        return {"microBatchSize": self.micro, "gradientAccumulationSteps": self.accumulation,
                "ranks": self.ranks, "microBatchSizeDerived": self.derived}


def derive_geometry(config: TrainingConfig, world_size: int,
                    where: str = "params.training") -> Geometry:
    """The batch geometry of `config` on `world_size` ranks, as DeepSpeed derives it.

    microBatchSize unset: the largest micro-batch m <= DEFAULT_MICRO_BATCH_SIZE (and <=
    globalBatchSize) with globalBatchSize a multiple of m x ranks. Under ZeRO (zeroStage 1-3)
    the product must be exact: an explicit microBatchSize that misses it, or a globalBatchSize
    that is not a multiple of the ranks, is refused naming the fields and the numbers. DDP and
    a single process accept an uneven split (the capped micro-batch is used)."""
    glob, zero = config.global_batch_size, bool(config.zero_stage)
    if not isinstance(world_size, int) or world_size < 1:
        raise TrainingConfigError(f"{where}: world size must be an int >= 1, got {world_size!r}")
    cap = min(config.micro_batch_size, glob)
    if config.micro_batch_derived:
        micro = next((m for m in range(cap, 0, -1) if glob % (m * world_size) == 0), None)
        if micro is None and zero:
            raise TrainingConfigError(
                f"{where}.globalBatchSize: {glob} cannot be split over {world_size} rank(s) "
                f"(nodes x gpusPerNode): DeepSpeed ZeRO (zeroStage {config.zero_stage}) needs "
                f"globalBatchSize = micro-batch x ranks x accumulation steps, so a multiple of "
                f"{world_size} (e.g. {-(-glob // world_size) * world_size})")
    else:
        micro = cap
        if zero and glob % (micro * world_size):
            per_pass = micro * world_size
            raise TrainingConfigError(
                f"{where}.globalBatchSize: {glob} is not a multiple of "
                f"microBatchSize {micro} x {world_size} rank(s) = {per_pass}; DeepSpeed ZeRO "
                f"(zeroStage {config.zero_stage}) needs globalBatchSize = microBatchSize x ranks x "
                f"accumulation steps (e.g. {max(per_pass, glob // per_pass * per_pass)}, or leave "
                f"microBatchSize unset to derive it)")
    exact = micro is not None and glob % (micro * world_size) == 0
    micro = micro or cap
    return Geometry(micro=micro, accumulation=max(1, -(-glob // (micro * world_size))),
                    ranks=world_size, derived=config.micro_batch_derived, exact=exact)


def batch_geometry(config: TrainingConfig, world_size: int,
                   where: str = "params.training") -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for DeepSpeed (`derive_geometry`)."""
    geometry = derive_geometry(config, world_size, where)
    return geometry.micro, geometry.accumulation


def check_training_settings(params: dict[str, Any] | None, world_size: int,
                            where: str = "params.training") -> TrainingConfig:
    """Every refusal a stage's `training` block can get before any process starts, as a pure
    function of the settings and the number of ranks (nodes x gpusPerNode): wrong types and
    ranges (`TrainingConfig.from_params`) and, under ZeRO (zeroStage 1-3), a DeepSpeed batch
    geometry the settings cannot produce (`derive_geometry`). Raises TrainingConfigError naming
    the field; returns the config with the micro-batch for these ranks (`for_world`).

    The trainer calls it at start, before the store is touched (xwin_jobs.stages); the operator
    can call it when it validates a spec, with the stage's world size, to report the same
    message as a Failed phase before any child is created. What needs the model or the node
    (ZeRO-Offload's host memory) is checked at the trainer's start (`check_offload_memory`)."""
    config = TrainingConfig.from_params(params, where)
    return config.for_world(world_size, where)


def collective_timeout(params: dict[str, Any] | None) -> datetime.timedelta:
    """The process group timeout of a stage whose `training` block is `params`, read before the
    group exists (so before the rest of the block is checked): its `collectiveTimeoutMinutes`
    when that is a positive number, else DEFAULT_COLLECTIVE_TIMEOUT_MINUTES."""
    value = (params or {}).get("collectiveTimeoutMinutes")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return datetime.timedelta(minutes=float(value) if ok else DEFAULT_COLLECTIVE_TIMEOUT_MINUTES)
