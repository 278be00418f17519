"""Spec → one StageTask per stage: where each stage reads and writes, with settings resolved.

The settings a stage's kind shares (xwin_jobs.pipeline: `training` and `resources` for a
training stage, `sampling` and `serving` for a sampling stage, `judge` for a judge stage) are
added here; its own inputs and params by its descriptor (core/descriptors.py). The same tasks
feed the local executor (`xwin run`) and the operator's child manifests, so a stage computes
the same thing wherever it runs. Pure.
"""

from __future__ import annotations

from xwin_jobs.task import StageTask

from ..api.spec import AlignmentRun, resolved_resources, resolved_sampling, resolved_serving, resolved_training
from .descriptors import descriptor
from .inputs import TaskParts, run_root, stage_uri


def stage_task(run: AlignmentRun, stage: str, store: str | None = None) -> StageTask:
    """The task of one (non-reused) stage of a run."""
    spec, meta = run.spec, run.metadata
    st = getattr(spec.stages, stage)
    if st is None:
        raise KeyError(f"spec.stages.{stage}: not in this run")
    d = descriptor(stage)
    parts = TaskParts(spec, run_root(spec, meta.namespace, meta.name, store))
    if d.job.training:
        parts.params["training"] = resolved_training(spec, st)
        parts.params["resources"] = resolved_resources(spec, st.resources)
    if d.job.sampling:
        parts.params["sampling"] = resolved_sampling(spec, st)
        parts.params["serving"] = resolved_serving(spec, st)
    parts.params.update((name, getattr(st, name)) for name in d.params)
    d.task(parts, st)
    if d.job.judge and spec.judge is not None:
        # Only the Secret's *name* travels; the key itself reaches the pod through env.
        parts.params["judge"] = spec.judge.model_dump(exclude={"apiKeySecret"}, exclude_none=True)
    return StageTask(stage=stage, output=stage_uri(parts.root, stage), inputs=parts.inputs,
                     markers=parts.markers, params=parts.params, chat_template=spec.chatTemplate,
                     run={"namespace": meta.namespace, "name": meta.name})
