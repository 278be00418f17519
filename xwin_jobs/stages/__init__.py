"""Stage jobs: the registry and the shell every stage runs in.

`run_stage(task, store)` does what all stages share:

1. `require_marker` on every stage folder in `task.markers` (an unfinished input is an
   error before anything is read) and collect their digests;
2. `task.digest(upstream)`; when the output already holds a marker with that digest, log
   "already done" and return it without touching anything;
3. otherwise delete a stale marker first, run the stage in a scratch folder (the stage
   clears its own leftovers: `ctx.clear`), write `metrics.json`, and `_SUCCESS.json` LAST.

A failure leaves no marker, and nothing outside `task.output` is ever written.

The training stages (`DATA_PARALLEL`) may run under torchrun (data parallel, see
xwin_jobs.training.engine): every rank runs the stage, rank 0 decides "already done" and
broadcasts it, only rank 0 writes the stage's files to the store (clears, model/, metrics.json,
the marker; in a checkpoint each rank uploads its own shards and rank 0 the checkpoint's marker). Once the stage function returns on every rank they all leave the process group
(no collective is left), the other ranks exit, and rank 0 uploads the model (`ctx.publish`)
and writes the marker outside any collective's timeout (`training.collectiveTimeoutMinutes`).
Their settings are checked before anything is written; they resume from their checkpoints
(xwin_jobs.training.checkpoints), which are pruned to `keepCheckpoints` once the marker is
written. Other stages handle torchrun ranks themselves (bestOfN's score step).

A stage is a function `run(ctx: StageContext) -> StageResult` in the module its entry of
xwin_jobs.pipeline.JOBS names (listing stages imports nothing heavy). The numbers of its task's
params are checked against that entry's limits before the stage or step runs (`check_params`).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..cost import requested_gpus, stage_cost, step_costs
from ..pipeline import JOBS, TRAINING_STAGES, job
from ..store import MARKER, Store, as_folder, join_uri, read_marker, write_marker
from ..task import StageTask, upstream_digests  # noqa: F401  (re-exported for the stages)

log = logging.getLogger("xwin_jobs.stage")

# "stage" -> "module:function(ctx) -> StageResult", and for the steps of stages that run as
# several processes, each given the stage's own task, "<stage>-<step>" ->
# "module:function(task, store) -> dict"; both from the one table, xwin_jobs.pipeline.JOBS.
# Only a stage's last step writes its marker. The operator's short job names (`sample`,
# `score`) resolve through `step_for`.
STAGES: dict[str, str] = {j.key: j.entry for j in JOBS}
STEPS: dict[str, str] = {f"{j.key}-{step}": j.step_entry(step) for j in JOBS for step in j.steps}

# Stages run data parallel when launched by torchrun (WORLD_SIZE > 1).
DATA_PARALLEL = frozenset(TRAINING_STAGES)


class StageError(Exception):
    """An expected failure (bad parameter, nothing to train on, ...); the message says
    what and where, and the CLI prints it without a traceback."""


@dataclass
class StageResult:
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage function gets: the task, the store, a scratch folder, and for a
    data-parallel stage the torchrun ranks (`xwin_jobs.training.engine.Distributed`; None:
    a single process)."""

    task: StageTask
    store: Store
    workdir: Path
    dist: Any = None
    digest: str = ""  # the task's input digest (checkpoints are resumed only for the same)
    # (local folder, URI) uploaded by rank 0 once the process group is closed (`publish`)
    uploads: list = field(default_factory=list)
    config: Any = None  # a training stage's checked settings (`training()`)

    @property
    def is_main(self) -> bool:
        """Whether this process writes to the store (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    def output(self, *parts: str) -> str:
        return join_uri(as_folder(self.task.output), *parts)

    def input(self, name: str) -> str:
        uri = self.task.inputs.get(name)
        if not uri:
            have = ", ".join(sorted(self.task.inputs)) or "none"
            raise StageError(f"stage {self.task.stage}: task.inputs.{name} is required (inputs given: {have})")
        return uri

    def param(self, name: str, default: Any = None) -> Any:
        value = self.task.params.get(name)
        return default if value is None else value

    def clear(self, *parts: str) -> None:
        """Delete leftovers of an earlier attempt under the output folder (stages that can
        resume, like samplers, keep theirs). Rank 0's job under torchrun."""
        if not self.is_main:
            return
        for part in parts:
            self.store.delete_prefix(self.output(part))

    def publish(self, local: Path | None, uri: str) -> None:
        """Upload the folder `local` to `uri` once the stage function has returned and every
        rank has left the process group, so no rank waits in a collective (and its timeout,
        `training.collectiveTimeoutMinutes`) while rank 0 uploads a 140 GB model. None (the
        other ranks) uploads nothing."""
        if local is not None and self.is_main:
            self.uploads.append((Path(local), uri))

    def progress(self, unit: str, total: int, step: str | None = None):
        """The live progress record of this step (xwin_jobs.progress), written by rank 0 (or
        the only process); None on the other ranks. `step` defaults to XWIN_STEP, which the
        planners set (a stage run by hand: the stage key)."""
        from ..progress import ProgressWriter, step_name

        if not self.is_main:
            return None
        step = step or step_name(self.task.stage)
        return ProgressWriter(self.store, self.task.output, self.task.stage, step, unit, total,
                              gpus=requested_gpus(self.task.params, "training")[1],
                              warn=log.warning)

    def training(self):
        """The stage's `training` settings (training.config.TrainingConfig) with the
        micro-batch for its ranks: those `_check_training` parsed and checked before the
        stage started, parsed once per stage."""
        if self.config is None:
            self.config = _check_training(self.task, self.dist, self.store)
        return self.config


def load_stage(name: str) -> Callable[[StageContext], StageResult]:
    try:
        target = STAGES[name]
    except KeyError:
        raise StageError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}") from None
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def step_for(job: str, stage: str) -> str | None:
    """The registered step a job name means for a task of `stage` (`bestOfN-sample`, or the
    short `sample`), or None when it is not a step of that stage."""
    for name in (job, f"{stage}-{job}"):
        if name in STEPS and name.startswith(f"{stage}-"):
            return name
    return None


def param(task: StageTask, name: str) -> Any:
    """A number of `task.params`, or its default when absent: the limits of its stage's entry
    in xwin_jobs.pipeline (the spec model's too) are the one check; StageError names the field."""
    declared = job(task.stage).params[name]
    value = task.params.get(name)
    if value is None:
        return declared.default
    problem = declared.problem(value)
    if problem:
        raise StageError(f"params.{name}: {problem}")
    return value


def check_params(task: StageTask) -> None:
    """`param` for every number the task's stage declares: a bad one is refused before the
    stage or step reads anything."""
    for name in job(task.stage).params:
        param(task, name)


def samples_done(task: StageTask, store: Store, model_input: str) -> bool:
    """Whether a sampling stage's samples from the task input `model_input` are complete (its
    module's `samples_done`), so the server a serve step would start is not needed."""
    module = importlib.import_module(job(task.stage).module_name)
    check = getattr(module, "samples_done", None)
    return bool(check and check(task, store, model_input))


def run_step(name: str, task: StageTask, store: Store) -> dict[str, Any]:
    check_params(task)
    module, _, func = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), func)(task, store)


def run_stage(task: StageTask, store: Store, workdir: str | Path | None = None) -> dict[str, Any]:
    """Run (or skip) one stage; returns its marker. See the module docstring."""
    stage_fn = load_stage(task.stage)
    check_params(task)
    dist = None
    if task.stage in DATA_PARALLEL and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from ..training.config import collective_timeout
        from ..training.engine import Distributed

        dist = Distributed.from_env(timeout=collective_timeout(task.params.get("training")))
    return _run_stage(stage_fn, task, store, workdir, dist)


def _check_training(task: StageTask, dist: Any, store: Store):
    """The training settings of a training stage, refused (StageError naming the field) when
    the engine cannot run them on this many ranks, or when ZeRO-Offload's optimizer state
    would not fit this node's available memory (counted from the model's config.json on the
    meta device); None for other stages. Reads only: nothing in the store is touched."""
    if task.stage not in DATA_PARALLEL:
        return None
    from ..training.config import TrainingConfigError, check_training_settings, derive_geometry

    world = dist.world_size if dist is not None else 1
    try:
        config = check_training_settings(task.params.get("training") or {}, world)
        if dist is None or dist.is_main:
            log.info("stage %s: %s", task.stage,
                     derive_geometry(config, world).describe(config.global_batch_size))
        if config.offload_optimizer:
            _check_offload(task, store, config, dist)
    except TrainingConfigError as e:
        raise StageError(str(e)) from None
    return config


def _check_offload(task: StageTask, store: Store, config: Any, dist: Any) -> None:
    from ..training.build import model_parameters
    from ..training.distributed import available_host_bytes
    from ..training.zero_config import check_offload_memory

    uri = task.inputs.get("model")
    if not uri or "://" in uri and not uri.startswith(("file://", "s3://")):
        return  # hf:// ids: the engine checks once the model is loaded
    try:
        config_json = store.read_json(join_uri(as_folder(uri), "config.json"))
        params = model_parameters(config_json)
    except Exception as e:  # noqa: BLE001 - the engine checks again once the model is loaded
        log.info("offloadOptimizer: host memory not checked before loading (%s)", e)
        return
    check_offload_memory(params, dist.world_size if dist is not None else 1,
                         dist.local_world_size if dist is not None else 1, available_host_bytes())


def _run_stage(stage_fn, task: StageTask, store: Store, workdir: str | Path | None,
               dist: Any) -> dict[str, Any]:
    main = dist is None or dist.is_main
    upstream = upstream_digests(store, task)
    digest = task.digest(upstream)
    existing = read_marker(store, task.output) if main else None
    if dist is not None:  # the same decision on every rank
        existing = dist.broadcast_object(existing)
    if existing is not None and existing.get("digest") == digest:
        log.info("stage %s: already done (%s has a marker for the same inputs)", task.stage,
                 as_folder(task.output))
        if dist is not None:
            dist.close()
        return {**existing, "skipped": True}
    config = _check_training(task, dist, store)  # a refused setting leaves the store untouched
    if main:
        if existing is not None:
            log.info("stage %s: inputs changed since the last run; replacing %s", task.stage,
                     as_folder(task.output))
        store.delete_prefix(join_uri(as_folder(task.output), MARKER))

    scratch_root = workdir or os.environ.get("XWIN_WORKDIR") or None
    if scratch_root:
        Path(scratch_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"xwin-{task.stage}-", dir=scratch_root) as tmp:
        ctx = StageContext(task=task, store=store, workdir=Path(tmp), dist=dist, digest=digest,
                           config=config)
        result = stage_fn(ctx)
        # Only on success (a failed rank must not wait in a barrier the others never reach; it
        # exits and torchrun stops the rest of the group): every rank leaves the process group
        # here, so nothing below runs inside a collective's timeout; the other ranks exit.
        if dist is not None:
            dist.close()
        for local, uri in ctx.uploads:
            store.upload_dir(local, uri)
            log.info("%s -> %s", local.name, uri)
    if not main:
        return {"stage": task.stage, "digest": digest, "rank": dist.rank, "metrics": result.metrics}
    store.write_json(join_uri(as_folder(task.output), "metrics.json"), result.metrics)
    marker = {"stage": task.stage, "digest": digest, "inputs": task.inputs,
              "inputDigests": upstream, "counts": result.counts, "metrics": result.metrics,
              "outputs": result.outputs, "run": task.run,
              "cost": stage_cost(step_costs(store, task.output), result.metrics)}
    marker = write_marker(store, task.output, marker)
    if config is not None:
        from ..training.checkpoints import prune

        pruned = prune(store, join_uri(as_folder(task.output), "checkpoints/"),
                       config.keep_checkpoints, digest)
        if pruned:
            log.info("stage %s: deleted checkpoint(s) of step %s (keepCheckpoints %d)",
                     task.stage, ", ".join(map(str, pruned)), config.keep_checkpoints)
    return marker
