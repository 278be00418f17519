"""`bestOfN`: Xwin-Set. The policy answers every prompt n times; the reward model scores each.

Task: inputs {policy: model URI, rewardModel: model URI, prompts: prompt records};
params {n, sampling, serving, scoringResources}.

Two steps, each its own process, both given the stage's task (only the last writes the marker):

- `bestOfN-sample` (`sample_step`): a vLLM server already serves the policy at
  `OPENAI_BASE_URL` (served name `XWIN_SERVED_MODEL`, else the server's only model). Prompts
  are rendered with the run's chat template and the policy's own tokenizer, and the n
  responses of each are written to `<output>/samples/` shards as they arrive: records
  `{"id", "prompt", "responses": [{"content", "finish_reason"}]}`. Shards are closed every
  few seconds, so a killed sampler loses at most the last few seconds; re-run, it skips the
  prompt ids already written. `samples/_PROGRESS.json` records which inputs the samples
  belong to (policy, prompts, n, sampling, template, the policy stage's digest): samples made
  for other inputs are deleted first, and `complete: true` is set once every prompt is there.
- `bestOfN-score` (`score_step`, the same as the single-process stage `bestOfN`): reads the
  samples, scores every response with the reward model in length-grouped batches
  (xwin_jobs.scoring), writes the scored set `{"id", "prompt", "responses": [{"content",
  "score", "finish_reason"}]}` to `<output>/data/` chunk by chunk (resumable the same way,
  `data/_PROGRESS.json`), then `metrics.json` and `_SUCCESS.json` (last, by run_stage).
  Under torchrun (the operator's scoring PyTorchJob) the ranks split the records; rank 0
  alone writes the marker, after every rank has written its shards.
  Run as the stage `bestOfN` with OPENAI_BASE_URL set and samples incomplete, it samples first.

Errors and counted skips: see xwin_jobs.sampler (server down, fewer than n responses, ...)
and xwin_jobs.scoring (empty responses and NaN scores get score null and are counted in
metrics: emptyResponses, nanScores; selection later skips them).

Tunables for operators (environment): XWIN_SAMPLER_FLUSH_SECONDS (default 5),
XWIN_SCORING_TOKEN_BUDGET (tokens per scoring batch, default 16384).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..cost import requested_gpus
from ..progress import ProgressWriter, step_name
from ..records import ShardWriter, existing_ids, iter_records
from ..store import Store, as_folder, join_uri
from ..task import StageTask
from ..scoring import RankGroup, scored_set_summary, torchrun_rank
from . import StageContext, StageError, StageResult, param, run_stage, upstream_digests
from .sampling_common import (PROGRESS, done_marker, folder_complete, input_states, json_digest,
                              load_prompts, model_stage_digest, prepare_folder, read_progress,
                              required_input, sample_into_folder, scratch_dir)

log = logging.getLogger("xwin_jobs.stage.bestOfN")

SAMPLES, DATA = "samples/", "data/"
SCORE_CHUNK_RESPONSES = 8192


# ----------------------------------------------------------------------------- sampling


def sampling_digest(task: StageTask, upstream: dict[str, str]) -> str:
    """What the samples depend on (not the reward model: a new RM reuses the samples)."""
    policy = task.inputs.get("policy", "")
    return json_digest({"policy": policy, "prompts": task.inputs.get("prompts"),
                        "n": task.params.get("n"), "sampling": task.params.get("sampling"),
                        "chat_template": task.chat_template,
                        "upstream": model_stage_digest(policy, upstream),
                        "contents": input_states(upstream, task.inputs.get("prompts"))})


def samples_complete(store: Store, task: StageTask, upstream: dict[str, str]) -> bool:
    samples = join_uri(as_folder(task.output), SAMPLES)
    return folder_complete(store, samples, sampling_digest(task, upstream))


def samples_done(task: StageTask, store: Store, model_input: str) -> bool:
    """Whether the samples are all in (a serve step need not start a server)."""
    return samples_complete(store, task, upstream_digests(store, task))


def sample_into_store(task: StageTask, store: Store, upstream: dict[str, str], workdir: Path,
                      env: dict[str, str] | None = None) -> dict[str, Any]:
    """Sample every prompt not yet in `<output>/samples/` from the server at OPENAI_BASE_URL
    (the model input named by XWIN_MODEL_INPUT, default policy); mark the samples complete."""
    from ..sampler import ClientConfig

    n = param(task, "n")
    samples = join_uri(as_folder(task.output), SAMPLES)
    digest = sampling_digest(task, upstream)
    prompts = load_prompts(store, required_input(task, "prompts"))
    env = dict(os.environ if env is None else env)
    progress = sample_into_folder(
        task, store, samples, prompts, n, digest, env.get("XWIN_MODEL_INPUT") or "policy",
        workdir, lambda e: ClientConfig.from_env(task.params.get("serving"), e), env)
    log.info("samples complete: %d prompts x %d responses in %s", len(prompts), n, samples)
    return progress


def sample_step(task: StageTask, store: Store) -> dict[str, Any]:
    """`python -m xwin_jobs bestOfN-sample`: samples only; writes no marker."""
    upstream = upstream_digests(store, task)
    marker = done_marker(store, task, upstream)
    if marker is not None:
        log.info("stage bestOfN already done; nothing to sample")
        return {**marker, "skipped": True}
    if samples_complete(store, task, upstream):
        log.info("samples already complete in %s", join_uri(as_folder(task.output), SAMPLES))
        return {"metrics": {}, "skipped": True}
    with scratch_dir("xwin-bestOfN-sample-") as tmp:
        progress = sample_into_store(task, store, upstream, Path(tmp))
    return {"metrics": progress.get("lastAttempt", {})}


# ----------------------------------------------------------------------------- scoring


def score_step(task: StageTask, store: Store) -> dict[str, Any]:
    """`python -m xwin_jobs bestOfN-score` (or `torchrun ... score`): the stage itself.

    Under torchrun the ranks share the work: rank r scores every world-th sample record
    (counted from r) on its own device and writes `part-rNNN-*` shards; rank 0 prepares
    `data/` first, waits for every rank, then writes metrics.json and `_SUCCESS.json`."""
    rank, world = torchrun_rank()
    if world == 1 or rank == 0:
        return run_stage(task, store)
    upstream = upstream_digests(store, task)
    marker = done_marker(store, task, upstream)
    if marker is not None:
        return {**marker, "skipped": True}
    ranks = RankGroup(world)
    try:
        ranks.barrier()  # rank 0 has checked the samples and prepared data/
        stats, scored = _score_share(task, store, rank, world, task.digest(upstream))
        ranks.barrier()  # every rank's shards are written
    finally:
        ranks.close()
    return {"metrics": {"rank": rank, "scored": scored, **stats.as_counts()}}


def run(ctx: StageContext) -> StageResult:
    task, store = ctx.task, ctx.store
    rank, world = torchrun_rank()
    if rank != 0:
        raise StageError("under torchrun, run the bestOfN-score step (it splits the scoring "
                         "across ranks; only rank 0 may write the marker)")
    n = param(task, "n")
    upstream = upstream_digests(store, task)
    samples = ctx.output(SAMPLES)
    if not samples_complete(store, task, upstream):
        if not os.environ.get("OPENAI_BASE_URL"):
            progress = read_progress(store, samples)
            state = "incomplete" if progress else "missing"
            raise StageError(f"{samples}: samples are {state}; run the bestOfN-sample step "
                             "first, or set OPENAI_BASE_URL to a vLLM server of the policy")
        sample_into_store(task, store, upstream, ctx.workdir)

    data = ctx.output(DATA)
    prepare_folder(store, data, task.digest(upstream))
    ranks = RankGroup(world)
    try:
        ranks.barrier()
        stats, scored = _score_share(task, store, 0, world, task.digest(upstream))
        ranks.barrier()
    finally:
        ranks.close()
    store.write_json(join_uri(data, PROGRESS), {"digest": task.digest(upstream), "complete": True})
    metrics, counts = scored_set_summary(store, data, n)
    counts["scoringThisAttempt"] = stats.as_counts()
    return StageResult(counts=counts, metrics=metrics, outputs={"data": data})


def _score_share(task: StageTask, store: Store, rank: int, world: int, digest: str):
    """Score this rank's share of the sample records not yet in data/, chunk by chunk (each
    chunk sorted by length inside, written as one shard), with the node's one copy of the
    reward model (`digest`: the stage's input digest). Returns (stats, prompts scored)."""
    from ..scoring import DEFAULT_TOKEN_BUDGET, ScoringStats

    n = param(task, "n")
    samples = join_uri(as_folder(task.output), SAMPLES)
    data = join_uri(as_folder(task.output), DATA)
    done = existing_ids(store, data)
    budget = int(os.environ.get("XWIN_SCORING_TOKEN_BUDGET") or DEFAULT_TOKEN_BUDGET)
    stats = ScoringStats()
    chunk_prompts = max(1, SCORE_CHUNK_RESPONSES // n)
    scorer = None
    scored = 0
    prefix = "part" if world == 1 else f"part-r{rank:03d}"
    # rank 0's live record counts every rank's share as its own (they are the same size)
    total = int(read_progress(store, samples).get("prompts") or 0)
    progress = None
    if rank == 0 and total:
        progress = ProgressWriter(store, task.output, task.stage, step_name("score"),
                                  "prompts", total, warn=log.warning,
                                  gpus=requested_gpus(task.params, "scoring")[1])
        progress.update(len(done))
    with ShardWriter(store, data, prefix=prefix, max_records=10**9) as writer:
        chunk: list[dict] = []
        for record in _unscored(store, samples, done, n, rank, world):
            chunk.append(record)
            if len(chunk) < chunk_prompts:
                continue
            scorer = scorer or _scorer(task, store, digest, budget, len(done))
            scored += _score_chunk(scorer, chunk, writer, stats)
            chunk = []
            log.info("scored %d prompt(s) in this attempt", scored)
            if progress is not None:
                progress.update(len(done) + scored * world)
        if chunk:
            scorer = scorer or _scorer(task, store, digest, budget, len(done))
            scored += _score_chunk(scorer, chunk, writer, stats)
    if progress is not None:
        progress.update(len(done) + scored * world)
    log.info("scored %d prompt(s) in this attempt (%d before)", scored, len(done))
    return stats, scored


def _unscored(store: Store, samples: str, done: set[str], n: int, rank: int = 0,
              world: int = 1):
    for index, record in enumerate(iter_records(store, samples, "scored")):
        if index % world != rank or record["id"] in done:
            continue
        if len(record["responses"]) != n:
            raise StageError(f"{samples}: prompt {record['id']!r} has "
                             f"{len(record['responses'])} responses, expected n={n}")
        yield record


def _scorer(task: StageTask, store: Store, digest: str, budget: int, already: int):
    import torch

    from ..model_cache import node_model_copy
    from ..scoring import RewardScorer

    log.info("loading the reward model (%d prompt(s) already scored)", already)
    device = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
              else "cpu")
    # one download per node: the node's ranks share the copy in the scratch volume
    source = node_model_copy(store, required_input(task, "rewardModel"), digest)
    return RewardScorer(source, task.chat_template, token_budget=budget, device=device)


def _score_chunk(scorer, chunk: list[dict], writer: ShardWriter, stats) -> int:
    """Score one chunk of sample records (sorted by length inside) and write it as a shard."""
    items = [(r["prompt"], resp["content"]) for r in chunk for resp in r["responses"]]
    scores, chunk_stats = scorer.score(items)
    stats.add(chunk_stats)
    it = iter(scores)
    for r in chunk:
        writer.write({"id": r["id"], "prompt": r["prompt"],
                      "responses": [{"content": resp["content"], "score": next(it),
                                     "finish_reason": resp.get("finish_reason")}
                                    for resp in r["responses"]]})
    writer.flush()
    return len(chunk)
