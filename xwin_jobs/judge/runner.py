"""Judging a list of requests for a stage: cache, budget, online or batch, progress file.

    run = judge_all(requests, settings, store, "<stage>/judge/")

reads the judgment cache under `<folder>/cache/`, counts what earlier attempts spent against
the budget, and what the run's other judge stages spent (their caches, `<run>/<stage>/judge/
cache/`: `budgetUSD` caps the run as a whole, across stages, attempts and retries), asks the judge for what is missing (`settings.mode`: online or batch, the batch
state in `<folder>/batch.json`), folds the cache's single judgments into a shard, writes
`<folder>/progress.json` (counts, spend; never a secret), and raises `check_complete`'s
errors when something is missing: a budget stop says how far it got.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..pipeline import JUDGE_STAGES
from ..progress import ProgressWriter, step_name
from ..store import Store, as_folder, join_uri
from .batch import BatchJudge
from .cache import JudgmentCache
from .client import OnlineJudge
from .core import JudgeError, JudgeRequest, JudgeRun, JudgeSettings, is_final, redact
from .cost import Budget, BudgetExceeded

log = logging.getLogger("xwin_jobs.judge")
JUDGE_FOLDER = "judge/"  # a judge stage's judging folder (pairs.JUDGE, evaluate.JUDGE)


def judge_all(requests: list[JudgeRequest], settings: JudgeSettings, store: Store, folder: str,
              client: Any = None) -> tuple[JudgeRun, Budget]:
    """Judge every request (deduplicated by key); see the module docstring."""
    unique = list({r.key: r for r in requests}.values())
    folder = as_folder(folder)
    cache = JudgmentCache(store, join_uri(folder, "cache/")).load()
    cache.compact()
    budget = Budget(settings.budget_usd, spent_usd=cache.spent_usd(),
                    others_usd=sum(other_stages_spend(store, folder).values()),
                    stage_limit_usd=settings.stage_budget_usd)
    price = settings.price
    if not price.known:
        log.warning("judge model %r is not in the price table: costs are estimated at the "
                    "most expensive listed price", settings.model)
    log.info("judge: %d request(s), %d stored judgment(s) in %s, %s, mode %s",
             len(unique), len(cache), join_uri(folder, "cache/"), budget.describe(), settings.mode)
    if settings.mode == "batch":
        judge: Any = BatchJudge(settings, cache, budget, store, join_uri(folder, "batch.json"),
                                client=client)
    else:
        judge = OnlineJudge(settings, cache, budget, client=client)
    judge.progress = progress_writer(store, folder, len(unique))
    judge.progress.update(sum(1 for r in unique if is_final(cache.get(r.key), settings.max_reasks)),
                          usd=budget.spent_usd)
    try:
        run = asyncio.run(judge.run(unique))
    finally:
        cache.compact()
    judge.progress.update(len(run.judgments), usd=budget.spent_usd)
    run.stats["requests_total"] = len(unique)
    store.write_json(join_uri(folder, "progress.json"), progress_record(run, budget, settings))
    return run, budget


def progress_writer(store: Store, folder: str, total: int) -> ProgressWriter:
    """The judge step's live record, under the stage folder that holds `folder` (its
    `judge/`): comparisons done of `total`, USD spent (xwin_jobs.progress)."""
    stage_uri = folder[: -len(JUDGE_FOLDER)] if folder.endswith(JUDGE_FOLDER) else folder
    stage = stage_uri.rstrip("/").rpartition("/")[2]
    return ProgressWriter(store, stage_uri, stage, step_name("judge"),
                          "comparisons", total, warn=log.warning)


def other_stages_spend(store: Store, folder: str) -> dict[str, float]:
    """USD spent by the run's other judge stages, by stage, when `folder` is a judge stage's
    `<run>/<stage>/judge/` (their stored judgments' estimated costs); {} for other folders."""
    stage_dir = as_folder(folder).rstrip("/").rsplit("/", 1)[0]
    root, _, stage = stage_dir.rpartition("/")
    if not as_folder(folder).endswith(f"/{stage}/{JUDGE_FOLDER}") or stage not in JUDGE_STAGES:
        return {}
    out = {}
    for other in JUDGE_STAGES:
        cache_uri = join_uri(as_folder(root), other, JUDGE_FOLDER, "cache/")
        if other != stage and store.list_files(cache_uri):
            out[other] = JudgmentCache(store, cache_uri).load().spent_usd()
    if out:
        log.info("judge: the run's other judge stages spent %s (budgetUSD is run-wide)",
                 ", ".join(f"{k} ${v:.4f}" for k, v in out.items()))
    return out


def progress_record(run: JudgeRun, budget: Budget, settings: JudgeSettings) -> dict[str, Any]:
    return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "judged": len(run.judgments), "total": run.stats.get("requests_total", 0),
            "failed": len(run.failed), "budgetStopped": run.budget_stopped,
            "estimatedSpendUSD": round(budget.spent_usd, 6), "budgetUSD": settings.budget_usd,
            "stats": dict(run.stats), "settings": settings.describe()}


def check_complete(run: JudgeRun, budget: Budget) -> None:
    """Raise when judgments are missing: BudgetExceeded (how far it got) or JudgeError
    (requests that failed after every retry; a re-run asks only those)."""
    total = run.stats.get("requests_total", len(run.judgments))
    done = len(run.judgments)
    if run.budget_stopped:
        raise BudgetExceeded(
            f"judge budget reached: {budget.describe()}; {done} of {total} judgments done "
            f"({run.stats.get('cached', 0)} stored by earlier attempts); stopped before the next "
            "request would pass budgetUSD. Raise judge.budgetUSD and re-run: stored judgments "
            "are not asked again.")
    if run.failed:
        first = redact(next(iter(run.failed.values())))
        raise JudgeError(f"{len(run.failed)} of {total} judge requests failed after every retry "
                         f"(last error: {first}); {done} judgments are stored: re-run to ask "
                         "only the missing ones")
