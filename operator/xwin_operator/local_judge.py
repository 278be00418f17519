"""`xwin run` for the judged stages: pairs and evaluate.

    pairs:    start vLLM for the policy -> python -m xwin_jobs pairs-sample -> stop vLLM
              -> python -m xwin_jobs pairs-judge (writes data/, metrics.json, _SUCCESS.json)
    evaluate: for each model: start vLLM -> evaluate-sample (XWIN_MODEL_INPUT=model:<name>)
              -> stop vLLM; then evaluate-judge (report, plots, _SUCCESS.json)

The servers come from xwin_jobs.vllm_server (the same arguments as the operator's
Deployments; `XWIN_VLLM_PYTHON`, `XWIN_VLLM_STARTUP_TIMEOUT` as for bestOfN). A sampling
process gets the server's URL and never the judge's key: OPENAI_API_KEY is removed from its
environment. The judging process gets the caller's environment (OPENAI_API_KEY, and
OPENAI_BASE_URL unless judge.baseURL is set). Steps whose output is already complete are not
run again, and no server is started for them.

Importing this module registers the runners in `local.STAGE_RUNNERS`.
"""

from __future__ import annotations

from xwin_jobs.store import Store
from xwin_jobs.task import StageTask

from .local import STAGE_RUNNERS, LocalContext, run_job
from .local_sampling import run_served_step


def _store(ctx: LocalContext) -> Store:
    return Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL"))


def run_pairs(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.stages import upstream_digests
    from xwin_jobs.stages.pairs import CANDIDATES, candidates_digest
    from xwin_jobs.stages.sampling_common import folder_complete
    from xwin_jobs.store import as_folder, join_uri

    store = _store(ctx)
    folder = join_uri(as_folder(task.output), CANDIDATES)
    if not folder_complete(store, folder, candidates_digest(task, upstream_digests(store, task))):
        run_served_step(task, ctx, store, "policy", "pairs-sample")
    run_job(task, ctx, step="pairs-judge")


def run_evaluate(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.stages.evaluate import answers_complete, model_names, model_slug

    store = _store(ctx)
    for i, name in enumerate(model_names(task)):
        if not answers_complete(task, store, name):
            run_served_step(task, ctx, store, f"model:{name}", "evaluate-sample",
                            log_name=f"{task.stage}-{model_slug(name, i)}")
    run_job(task, ctx, step="evaluate-judge")


STAGE_RUNNERS["pairs"] = run_pairs
STAGE_RUNNERS["evaluate"] = run_evaluate
