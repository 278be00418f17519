"""`xwin run` for bestOfN: a real vLLM server for the policy, the sampler, then the scorer.

    start vLLM (its own virtual environment, a free loopback port, wait on /health)
    -> python -m xwin_jobs bestOfN-sample   (OPENAI_BASE_URL / XWIN_SERVED_MODEL point at it)
    -> stop vLLM (always: also on failure or Ctrl-C)
    -> python -m xwin_jobs bestOfN-score    (writes data/, metrics.json, _SUCCESS.json last)

The server's arguments come from `xwin_jobs.vllm_server.vllm_server_args`, the function the
operator's Deployment builder uses too. The vLLM interpreter is `XWIN_VLLM_PYTHON`, else
`.venv-vllm/bin/python` (`make vllm`). The server log is `<log dir>/bestOfN.vllm.log`; a
server that does not come up within `XWIN_VLLM_STARTUP_TIMEOUT` seconds (default 600) fails
the stage with the last lines of that log. When the samples are already complete (a re-run
after the scorer failed) no server is started.

`run_served_step` is the one way a local runner starts a server and runs a sampler against
it; the pairs and evaluate runners (local_judge) and the step-table runner (local_steps) use
it too. Importing this module registers the bestOfN runner in `local.STAGE_RUNNERS`.
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


def run_served_step(task: StageTask, ctx: LocalContext, store: Store, model_input: str,
                    step: str, log_name: str | None = None,
                    step_env: Callable[[str], dict[str, str]] | None = None) -> None:
    """Start a vLLM server for `task.inputs[model_input]` (downloaded to a scratch folder
    when remote; log `<log dir>/<log_name or stage>.vllm.log`), run `python -m xwin_jobs
    <step>` against it, and stop the server (always: also on failure or Ctrl-C).

    The step's environment is `step_env(server URL)`, by default `sampler_env`: the caller's
    environment with the server's URL and served name, and without OPENAI_API_KEY."""
    from xwin_jobs.modeling import resolve_model_source
    from xwin_jobs.vllm_server import (SERVED_MODEL_NAME, LocalVllmServer, VllmServerError,
                                       vllm_python)

    try:
        python = vllm_python(ctx.env)
    except VllmServerError as e:
        raise StageFailed(task.stage, str(e)) from None
    if step_env is None:
        def step_env(url: str) -> dict[str, str]:
            return sampler_env(ctx.env, url, SERVED_MODEL_NAME, model_input)
    uri = task.inputs[model_input]
    timeout = float(ctx.env.get("XWIN_VLLM_STARTUP_TIMEOUT") or 600)
    with tempfile.TemporaryDirectory(prefix="xwin-model-") as scratch:
        model_dir = resolve_model_source(store, uri, Path(scratch))
        server = LocalVllmServer(python, model_dir, task.params.get("serving"),
                                 ctx.log_dir / f"{log_name or task.stage}.vllm.log",
                                 env=ctx.env, device="cpu", startup_timeout_s=timeout)
        ctx.on_line(task.stage, f"starting vLLM for {uri}")
        try:
            with server:
                run_job(task, LocalContext(ctx.python, step_env(server.base_url), ctx.log_dir,
                                           ctx.on_line), step=step)
        except VllmServerError as e:
            raise StageFailed(task.stage, str(e)) from None


def _samples_done(task: StageTask, store: Store) -> bool:
    from xwin_jobs.stages import upstream_digests
    from xwin_jobs.stages.best_of_n import samples_complete

    return samples_complete(store, task, upstream_digests(store, task))


def run_best_of_n(task: StageTask, ctx: LocalContext) -> None:
    store = Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL"))
    if not _samples_done(task, store):
        run_served_step(task, ctx, store, "policy", f"{task.stage}-sample")
    run_job(task, ctx, step=f"{task.stage}-score")


STAGE_RUNNERS["bestOfN"] = run_best_of_n
