"""`pairs`: Xwin-Pair. The policy samples k candidates per prompt; the judge compares every
pair of them in both orders.

Task: inputs {policy: model URI, prompts: prompt records}; params {candidatesPerPrompt,
disagreement (tie | drop), sampling, serving, judge: {model, baseURL, mode, maxConcurrency,
requestsPerMinute, tokensPerMinute, budgetUSD}}. The judge's API key comes only from the
environment (OPENAI_API_KEY), its URL from judge.baseURL, else OPENAI_BASE_URL.

Two steps, each its own process, both given the stage's task (only the last writes the
marker), so each resumes on its own:

- `pairs-sample` (`sample_step`): a vLLM server serves the policy at XWIN_SERVER_URL (else
  OPENAI_BASE_URL; served name XWIN_SERVED_MODEL). k candidates per prompt, multi-turn
  prompts keeping their earlier turns, go to `<output>/candidates/` shards as they arrive:
  `{"id", "prompt", "responses": [{"content", "finish_reason"}]}`; a re-run skips the prompts
  written; `candidates/_PROGRESS.json` says which inputs they belong to and `complete: true`.
  The judge's key is never sent to the policy server.
- `pairs-judge` (`judge_step`, the same as the stage `pairs` once candidates are complete):
  every pair (i < j) of distinct candidates is asked in both orders (identical candidates are
  not compared, and counted); each judgment is stored under `<output>/judge/cache/` as it
  arrives, so a killed job re-asks nothing it received. Then, from the stored judgments:
  `data/` pair records (docs/design.md) for decisive comparisons, chosen = the winner, scores =
  the share of the two orders each side won; `ties/` the same records for ties (both orders
  tie, or orders disagreeing with `disagreement: tie`) with `judge.outcome`; they are kept
  apart so preference trainers never read a tie as a preference. `judge` of each record:
  model, template version, outcome, candidate indices, and both verdicts with their reasons.
  Comparisons with an unparseable verdict (after the re-asks) are counted, never guessed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..judge.aggregate import DISAGREEMENT_MODES, Outcome, combine, count_outcomes
from ..judge.cache import judgment_key
from ..judge.core import JudgeError, JudgeRequest, JudgeSettings, redact
from ..judge.cost import BudgetExceeded
from ..judge.templates import PAIRWISE, Template, pairwise_messages
from ..judge.verdict import verdict_from_dict
from ..records import ShardWriter, iter_records
from ..store import Store, as_folder, join_uri
from ..task import StageTask
from . import StageContext, StageError, StageResult, param, run_stage, upstream_digests
from .sampling_common import PROGRESS  # noqa: F401  (the candidates' progress file)
from .sampling_common import (done_marker, folder_complete, input_states, json_digest, load_prompts,
                              model_stage_digest, required_input, sample_into_folder, scratch_dir)

log = logging.getLogger("xwin_jobs.stage.pairs")

CANDIDATES, DATA, TIES, JUDGE = "candidates/", "data/", "ties/", "judge/"


# ----------------------------------------------------------------------------- sampling


def candidates_digest(task: StageTask, upstream: Mapping[str, str]) -> str:
    policy = task.inputs.get("policy", "")
    return json_digest({"policy": policy, "prompts": task.inputs.get("prompts"),
                        "k": task.params.get("candidatesPerPrompt"),
                        "sampling": task.params.get("sampling"),
                        "chat_template": task.chat_template,
                        "upstream": model_stage_digest(policy, upstream),
                        "contents": input_states(upstream, task.inputs.get("prompts"))})


def samples_done(task: StageTask, store: Store, model_input: str) -> bool:
    """Whether the candidates are all sampled (a serve step need not start a server)."""
    return folder_complete(store, join_uri(as_folder(task.output), CANDIDATES),
                           candidates_digest(task, upstream_digests(store, task)))


def sampling_server_url(env: Mapping[str, str], allow_openai_base_url: bool) -> str | None:
    """Where the policy is served: XWIN_SERVER_URL; in a sample-only process also
    OPENAI_BASE_URL (in a judging process that variable is the judge's)."""
    return env.get("XWIN_SERVER_URL") or (env.get("OPENAI_BASE_URL") if allow_openai_base_url else None)


def sample_from_server(task: StageTask, store: Store, folder: str, prompts: list[dict], n: int,
                       digest: str, model_input: str, workdir: Path, server_url: str | None,
                       env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`sample_into_folder` from the vLLM server at `server_url`, which never gets the
    judge's OpenAI key."""
    from ..sampler import ClientConfig

    def connect(env: dict[str, str]):
        if not server_url:
            raise StageError(f"{folder}: samples are incomplete and no sampling server is given "
                             "(set XWIN_SERVER_URL to the vLLM server of the model)")
        return ClientConfig.from_env(task.params.get("serving"), env, base_url=server_url,
                                     api_key="EMPTY")

    return sample_into_folder(task, store, folder, prompts, n, digest, model_input, workdir,
                              connect, env)


def sample_candidates(task: StageTask, store: Store, upstream: Mapping[str, str],
                      server_url: str | None, workdir: Path,
                      env: Mapping[str, str] | None = None) -> dict[str, Any]:
    prompts = load_prompts(store, required_input(task, "prompts"))
    folder = join_uri(as_folder(task.output), CANDIDATES)
    return sample_from_server(task, store, folder, prompts, param(task, "candidatesPerPrompt"),
                              candidates_digest(task, upstream), "policy", workdir, server_url, env)


def sample_step(task: StageTask, store: Store) -> dict[str, Any]:
    """`python -m xwin_jobs pairs-sample`: candidates only; writes no stage marker."""
    upstream = upstream_digests(store, task)
    marker = done_marker(store, task, upstream)
    if marker is not None:
        log.info("stage pairs already done; nothing to sample")
        return {**marker, "skipped": True}
    folder = join_uri(as_folder(task.output), CANDIDATES)
    if folder_complete(store, folder, candidates_digest(task, upstream)):
        log.info("candidates already complete in %s", folder)
        return {"metrics": {}, "skipped": True}
    with scratch_dir("xwin-pairs-sample-") as tmp:
        progress = sample_candidates(task, store, upstream,
                                     sampling_server_url(os.environ, True), Path(tmp))
    return {"metrics": progress.get("lastAttempt", {})}


def judge_step(task: StageTask, store: Store) -> dict[str, Any]:
    """`python -m xwin_jobs pairs-judge`: the stage itself (marker last)."""
    return run_stage(task, store)


# ----------------------------------------------------------------------------- comparisons (pure)


@dataclass(frozen=True)
class Comparison:
    prompt_id: str
    prompt: list[dict[str, Any]]
    first: int                 # candidate indices, first < second
    second: int
    first_text: str
    second_text: str
    forward: JudgeRequest      # first shown as A
    backward: JudgeRequest     # second shown as A


def judge_request(model: str, template: Template, messages: list[dict[str, str]]) -> JudgeRequest:
    return JudgeRequest(judgment_key(model, template.version, messages), template, messages)


def plan_comparisons(records: list[dict[str, Any]], model: str,
                     template: Template = PAIRWISE) -> tuple[list[Comparison], int]:
    """Every pair of distinct candidates of every prompt, in a fixed order; and how many
    pairs were skipped because the two candidates are the same text."""
    comparisons: list[Comparison] = []
    identical = 0
    for record in records:
        texts = [r["content"] for r in record["responses"]]
        firsts: dict[str, int] = {}
        for i, t in enumerate(texts):
            firsts.setdefault(t.strip(), i)
        unique = sorted(firsts.values())
        n, u = len(texts), len(unique)
        identical += n * (n - 1) // 2 - u * (u - 1) // 2
        for a in range(u):
            for b in range(a + 1, u):
                i, j = unique[a], unique[b]
                comparisons.append(Comparison(
                    record["id"], record["prompt"], i, j, texts[i], texts[j],
                    judge_request(model, template, pairwise_messages(record["prompt"], texts[i], texts[j], template)),
                    judge_request(model, template, pairwise_messages(record["prompt"], texts[j], texts[i], template))))
    return comparisons, identical


def _verdict_view(entry: dict[str, Any] | None, shown_a: int, shown_b: int) -> dict[str, Any]:
    view: dict[str, Any] = {"a": shown_a, "b": shown_b}
    if entry is None:
        return {**view, "status": "missing"}
    view["status"] = entry["status"]
    if entry.get("verdict"):
        view.update(winner=entry["verdict"]["winner"], reason=entry["verdict"].get("reason", ""))
    elif entry.get("problem"):
        view["problem"] = entry["problem"]
    return view


def pair_record(c: Comparison, outcome: Outcome, fwd: dict | None, bwd: dict | None,
                model: str, template: str) -> dict[str, Any]:
    """The docs/design.md pair record of one comparison (for a tie: first as `chosen`)."""
    first_wins = outcome.result != "second"
    win, lose = (c.first, c.second) if first_wins else (c.second, c.first)
    share = outcome.first_share if outcome.first_share is not None else 0.5
    scores = (share, 1.0 - share) if first_wins else (1.0 - share, share)
    return {"id": f"{c.prompt_id}:{win}>{lose}" if outcome.decisive else f"{c.prompt_id}:{c.first}={c.second}",
            "prompt": c.prompt,
            "chosen": [{"role": "assistant", "content": c.first_text if first_wins else c.second_text}],
            "rejected": [{"role": "assistant", "content": c.second_text if first_wins else c.first_text}],
            "chosen_score": scores[0], "rejected_score": scores[1],
            "judge": {"model": model, "template": template,
                      "outcome": outcome.result if outcome.agreement == "agree" else "disagree",
                      "candidates": [win, lose],
                      "verdicts": [_verdict_view(fwd, c.first, c.second),
                                   _verdict_view(bwd, c.second, c.first)]}}


def build_pairs(comparisons: list[Comparison], judgments: Mapping[str, dict[str, Any]],
                disagreement: str, model: str, template: str
                ) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(pair records, tie records, counts) from the stored judgments of both orders."""
    pairs, ties, outcomes = [], [], []
    refused = 0
    for c in comparisons:
        fwd, bwd = judgments.get(c.forward.key), judgments.get(c.backward.key)
        refused += sum(1 for e in (fwd, bwd) if e is not None and e["status"] == "refused")
        outcome = combine(verdict_from_dict("pairwise", fwd and fwd.get("verdict")),
                          verdict_from_dict("pairwise", bwd and bwd.get("verdict")), disagreement)
        outcomes.append(outcome)
        if outcome.decisive:
            pairs.append(pair_record(c, outcome, fwd, bwd, model, template))
        elif outcome.result == "tie":
            ties.append(pair_record(c, outcome, fwd, bwd, model, template))
    counts = count_outcomes(outcomes)
    counts["refusedVerdicts"] = refused
    return pairs, ties, counts


# ----------------------------------------------------------------------------- the stage


def judge_settings(task: StageTask) -> JudgeSettings:
    try:
        return JudgeSettings.from_params(task.params.get("judge"))
    except JudgeError as e:
        raise StageError(str(e)) from None


def run(ctx: StageContext) -> StageResult:
    from ..judge.runner import check_complete, judge_all

    task, store = ctx.task, ctx.store
    disagreement = str(task.params.get("disagreement", "drop"))
    if disagreement not in DISAGREEMENT_MODES:
        raise StageError(f"params.disagreement: must be tie or drop, got {disagreement!r}")
    k = param(task, "candidatesPerPrompt")
    settings = judge_settings(task)
    upstream = upstream_digests(store, task)
    folder = ctx.output(CANDIDATES)
    if not folder_complete(store, folder, candidates_digest(task, upstream)):
        url = sampling_server_url(os.environ, allow_openai_base_url=False)
        if not url:
            raise StageError(f"{folder}: candidates are incomplete; run the pairs-sample step "
                             "first, or set XWIN_SERVER_URL to a vLLM server of the policy")
        sample_candidates(task, store, upstream, url, ctx.workdir)

    records = list(iter_records(store, folder, "scored"))
    for r in records:
        if len(r["responses"]) != k:
            raise StageError(f"{folder}: prompt {r['id']!r} has {len(r['responses'])} candidates, "
                             f"expected candidatesPerPrompt={k}")
    comparisons, identical = plan_comparisons(records, settings.model)
    requests = [r for c in comparisons for r in (c.forward, c.backward)]
    log.info("pairs: %d prompt(s), %d comparison(s) in both orders = %d judge request(s); "
             "%d identical candidate pair(s) skipped", len(records), len(comparisons),
             len(requests), identical)
    try:
        judged, budget = judge_all(requests, settings, store, ctx.output(JUDGE))
        check_complete(judged, budget)
    except (JudgeError, BudgetExceeded) as e:
        raise StageError(redact(str(e))) from None

    pairs, ties, counts = build_pairs(comparisons, judged.judgments, disagreement,
                                      settings.model, PAIRWISE.version)
    ctx.clear(DATA, TIES)
    with ShardWriter(store, ctx.output(DATA), kind="pair", max_records=50_000) as writer:
        writer.write_all(pairs)
    if ties:
        with ShardWriter(store, ctx.output(TIES), kind="pair", max_records=50_000) as writer:
            writer.write_all(ties)
    if not pairs:
        raise StageError(f"no preference pairs: {counts['comparisons']} comparison(s) gave "
                         f"{counts['tie']} tie(s), {counts['dropped']} disagreement(s) dropped and "
                         f"{counts['unparseable']} unparseable")
    usage = _usage(judged.judgments.values())
    stats = judged.stats
    metrics = {
        "prompts": len(records), "candidatesPerPrompt": k,
        "comparisons": counts["comparisons"], "identicalCandidatePairs": identical,
        "pairs": len(pairs), "ties": counts["tie"], "disagreements": counts["disagree"],
        "disagreement": disagreement, "dropped": counts["dropped"],
        "unparseable": counts["unparseable"], "refusedVerdicts": counts["refusedVerdicts"],
        "agreementRate": counts["agree"] / max(1, counts["agree"] + counts["disagree"]),
        "judgeRequests": len(requests), "judgeCached": stats.get("cached", 0),
        "judgeAsks": stats.get("asks", 0), "judgeRetries": stats.get("retries", 0),
        "judgeReasks": stats.get("reasks", 0),
        "judgePromptTokens": usage[0], "judgeCompletionTokens": usage[1],
        "estimatedCostUSD": round(budget.spent_usd, 6),
        "judgeModel": settings.model, "judgeMode": settings.mode, "template": PAIRWISE.version,
    }
    return StageResult(counts={"prompts": len(records), "pairs": len(pairs), "ties": len(ties)},
                       metrics=metrics,
                       outputs={"data": ctx.output(DATA), "ties": ctx.output(TIES),
                                "judgments": ctx.output(JUDGE, "cache/")})


def _usage(entries) -> tuple[int, int]:
    p = c = 0
    for e in entries:
        u = e.get("usage") or {}
        p += int(u.get("prompt_tokens", 0))
        c += int(u.get("completion_tokens", 0))
    return p, c
