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

import tempfile
from pathlib import Path
from typing import Callable

from xwin_jobs.store import Store
from xwin_jobs.task import StageTask

from .local import STAGE_RUNNERS, LocalContext, StageFailed, run_job


def sampler_env(env: dict[str, str], server_url: str, served_model: str,
                model_input: str) -> dict[str, str]:
    """The environment of a sampling step: the server's URL, and no judge key."""
    out = {k: v for k, v in env.items() if k != "OPENAI_API_KEY"}
    out.update(OPENAI_BASE_URL=server_url, XWIN_SERVER_URL=server_url,
               XWIN_SERVED_MODEL=served_model, XWIN_MODEL_INPUT=model_input)
    return out


def _with_server(task: StageTask, ctx: LocalContext, store: Store, model_uri: str,
                 log_name: str, body: Callable[[dict[str, str]], None], model_input: str) -> None:
    from xwin_jobs.modeling import resolve_model_source
    from xwin_jobs.vllm_server import (SERVED_MODEL_NAME, LocalVllmServer, VllmServerError,
                                       vllm_python)

    try:
        python = vllm_python(ctx.env)
    except VllmServerError as e:
        raise StageFailed(task.stage, str(e)) from None
    timeout = float(ctx.env.get("XWIN_VLLM_STARTUP_TIMEOUT") or 600)
    with tempfile.TemporaryDirectory(prefix="xwin-model-") as scratch:
        model_dir = resolve_model_source(store, model_uri, Path(scratch))
        server = LocalVllmServer(python, model_dir, task.params.get("serving"),
                                 ctx.log_dir / f"{log_name}.vllm.log", env=ctx.env,
                                 device="cpu", startup_timeout_s=timeout)
        ctx.on_line(task.stage, f"starting vLLM for {model_uri}")
        try:
            with server:
                body(sampler_env(ctx.env, server.base_url, SERVED_MODEL_NAME, model_input))
        except VllmServerError as e:
            raise StageFailed(task.stage, str(e)) from None


def _store(ctx: LocalContext) -> Store:
    return Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL"))


def run_pairs(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.stages import upstream_digests
    from xwin_jobs.stages.pairs import CANDIDATES, candidates_digest, folder_complete
    from xwin_jobs.store import as_folder, join_uri

    store = _store(ctx)
    folder = join_uri(as_folder(task.output), CANDIDATES)
    if not folder_complete(store, folder, candidates_digest(task, upstream_digests(store, task))):
        _with_server(task, ctx, store, task.inputs["policy"], task.stage,
                     lambda env: run_job(task, LocalContext(ctx.python, env, ctx.log_dir, ctx.on_line),
                                         step="pairs-sample"), "policy")
    run_job(task, ctx, step="pairs-judge")


def run_evaluate(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.stages.evaluate import answers_complete, model_names, model_slug

    store = _store(ctx)
    for i, name in enumerate(model_names(task)):
        if answers_complete(task, store, name):
            continue
        _with_server(task, ctx, store, task.inputs[f"model:{name}"],
                     f"{task.stage}-{model_slug(name, i)}",
                     lambda env: run_job(task, LocalContext(ctx.python, env, ctx.log_dir, ctx.on_line),
                                         step="evaluate-sample"), f"model:{name}")
    run_job(task, ctx, step="evaluate-judge")


STAGE_RUNNERS["pairs"] = run_pairs
STAGE_RUNNERS["evaluate"] = run_evaluate
