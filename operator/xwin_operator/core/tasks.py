"""Spec → one StageTask per stage: where each stage reads and writes, with settings resolved.

The same tasks feed the local executor (`xwin run`) and the operator's child manifests, so a
stage computes the same thing wherever it runs. Pure.
"""

from __future__ import annotations

from typing import Any

from xwin_jobs.pipeline import JUDGE_STAGES, SAMPLING_STAGES, TRAINING_STAGES
from xwin_jobs.task import StageTask

from ..api.spec import (AlignmentRun, AlignmentRunSpec, resolved_resources, resolved_sampling,
                        resolved_serving, resolved_training)


def run_root(spec: AlignmentRunSpec, namespace: str, name: str, store: str | None = None) -> str:
    """`<storage.uri>/<namespace>/<name>/` (or under `store` when `xwin run --store` overrides it)."""
    base = (store or spec.storage.uri).rstrip("/")
    return f"{base}/{namespace}/{name}/"


def stage_uri(root: str, stage: str) -> str:
    return f"{root.rstrip('/')}/{stage}/"


def _is_stage_key(spec: AlignmentRunSpec, ref: str) -> bool:
    return ref in spec.stages.present()


def _stage_output(spec: AlignmentRunSpec, root: str, ref: str, folder: str) -> tuple[str, str | None]:
    """(URI, stage folder whose marker must exist or None): `folder` of a stage of the run
    (its `from:` URI when reused), or `ref` itself when it is a URI."""
    if _is_stage_key(spec, ref):
        st = getattr(spec.stages, ref)
        if st.reused:
            return st.from_, None
        return stage_uri(root, ref) + folder, stage_uri(root, ref)
    return ref, None


def model_input(spec: AlignmentRunSpec, root: str, ref: str) -> tuple[str, str | None]:
    """(model URI, stage folder whose marker must exist or None) for a model reference."""
    if ref == "base":
        return spec.baseModel, None
    return _stage_output(spec, root, ref, "model/")


def data_input(spec: AlignmentRunSpec, root: str, ref: str) -> tuple[str, str | None]:
    """(data URI, stage folder whose marker must exist or None) for a data reference."""
    return _stage_output(spec, root, ref, "data/")


def stage_task(run: AlignmentRun, stage: str, store: str | None = None) -> StageTask:
    """The task of one (non-reused) stage of a run."""
    spec, meta = run.spec, run.metadata
    root = run_root(spec, meta.namespace, meta.name, store)
    st = getattr(spec.stages, stage)
    if st is None:
        raise KeyError(f"spec.stages.{stage}: not in this run")
    inputs: dict[str, str] = {}
    markers: list[str] = []

    def add(name: str, resolved: tuple[str, str | None]) -> None:
        uri, marker = resolved
        inputs[name] = uri
        if marker and marker not in markers:
            markers.append(marker)

    params: dict[str, Any] = {}
    if stage in TRAINING_STAGES:
        params["training"] = resolved_training(spec, st)
        params["resources"] = resolved_resources(spec, st.resources)
    if stage in SAMPLING_STAGES:
        params["sampling"] = resolved_sampling(spec, st)
        params["serving"] = resolved_serving(spec, st)

    if stage == "sft":
        add("model", (spec.baseModel, None))
        add("data", (st.data, None))
    elif stage == "pairs":
        add("policy", model_input(spec, root, st.policy))
        add("prompts", (st.prompts, None))
        params.update(candidatesPerPrompt=st.candidatesPerPrompt, disagreement=st.disagreement)
    elif stage == "rewardModel":
        add("model", model_input(spec, root, st.init))
        add("pairs", data_input(spec, root, st.pairs))
        params["heldOutFraction"] = st.heldOutFraction
    elif stage == "bestOfN":
        add("policy", model_input(spec, root, st.policy))
        add("rewardModel", model_input(spec, root, st.rewardModel))
        add("prompts", (st.prompts, None))
        params["n"] = st.n
        params["scoringResources"] = resolved_resources(spec, st.scoringResources)
    elif stage == "rejectionSampling":
        add("model", model_input(spec, root, st.init))
        add("scored", data_input(spec, root, st.scored))
        params["topK"] = st.topK
    elif stage == "dpo":
        add("model", model_input(spec, root, st.init))
        source = "scored" if st.pairsFrom == "bestOfN" else "pairs"
        add(source, data_input(spec, root, st.pairsFrom))
        params.update(beta=st.beta, chosen=st.chosen, rejected=st.rejected,
                      minMargin=st.minMargin, pairsFrom=st.pairsFrom)
        if st.rejectedFloor is not None:   # absent when unset: unchanged digests for old specs
            params["rejectedFloor"] = st.rejectedFloor
        if st.rpoAlpha:   # absent when 0 (plain DPO): unchanged digests for old specs
            params["rpoAlpha"] = st.rpoAlpha
    elif stage == "evaluate":
        for i, m in enumerate(st.models):
            add(f"model:{m}", model_input(spec, root, m))
        if st.alpacaEval:
            add("alpacaPrompts", (st.alpacaEval.prompts, None))
            if st.alpacaEval.reference in st.models:   # a model's own answers are the reference
                params["referenceModel"] = st.alpacaEval.reference
            else:
                add("alpacaReference", (st.alpacaEval.reference, None))
        if st.mtBench:
            add("mtBenchQuestions", (st.mtBench.questions, None))
        params["models"] = list(st.models)
        if st.passGrade is not None:
            params["passGrade"] = st.passGrade
        # the paper's table also shows the reward model's and best-of-N's figures: read from
        # those stages' markers when the report is written (not inputs: evaluate does not wait)
        params["recipeStages"] = {k: stage_uri(root, k) for k in ("rewardModel", "bestOfN")
                                  if getattr(spec.stages, k) is not None and not getattr(spec.stages, k).reused}
    if stage in JUDGE_STAGES and spec.judge is not None:
        # Only the Secret's *name* travels; the key itself reaches the pod through env.
        params["judge"] = spec.judge.model_dump(exclude={"apiKeySecret"}, exclude_none=True)

    return StageTask(stage=stage, output=stage_uri(root, stage), inputs=inputs, markers=markers,
                     params=params, chat_template=spec.chatTemplate,
                     run={"namespace": meta.namespace, "name": meta.name})
