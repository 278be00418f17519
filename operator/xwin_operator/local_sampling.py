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

Importing this module registers the runner in `local.STAGE_RUNNERS`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xwin_jobs.store import Store
from xwin_jobs.task import StageTask

from .local import STAGE_RUNNERS, LocalContext, StageFailed, run_job


def _policy_dir(store: Store, uri: str, scratch: Path) -> str:
    """What vLLM's --model gets: a local folder (downloaded when the policy is remote) or an
    hf:// model name."""
    from xwin_jobs.modeling import resolve_model_source

    return resolve_model_source(store, uri, scratch)


def _samples_done(task: StageTask, store: Store) -> bool:
    from xwin_jobs.stages import upstream_digests
    from xwin_jobs.stages.best_of_n import samples_complete

    return samples_complete(store, task, upstream_digests(store, task))


def run_best_of_n(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.vllm_server import (SERVED_MODEL_NAME, LocalVllmServer, VllmServerError,
                                       vllm_python)

    store = Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL"))
    if not _samples_done(task, store):
        try:
            python = vllm_python(ctx.env)
        except VllmServerError as e:
            raise StageFailed(task.stage, str(e)) from None
        timeout = float(ctx.env.get("XWIN_VLLM_STARTUP_TIMEOUT") or 600)
        with tempfile.TemporaryDirectory(prefix="xwin-policy-") as scratch:
            model_dir = _policy_dir(store, task.inputs["policy"], Path(scratch))
            server = LocalVllmServer(python, model_dir, task.params.get("serving"),
                                     ctx.log_dir / f"{task.stage}.vllm.log", env=ctx.env,
                                     device="cpu", startup_timeout_s=timeout)
            ctx.on_line(task.stage, f"starting vLLM for {task.inputs['policy']}")
            try:
                with server:
                    env = {**ctx.env, "OPENAI_BASE_URL": server.base_url,
                           "XWIN_SERVED_MODEL": SERVED_MODEL_NAME, "XWIN_MODEL_INPUT": "policy"}
                    run_job(task, LocalContext(ctx.python, env, ctx.log_dir, ctx.on_line),
                            step=f"{task.stage}-sample")
            except VllmServerError as e:
                raise StageFailed(task.stage, str(e)) from None
    run_job(task, ctx, step=f"{task.stage}-score")


STAGE_RUNNERS["bestOfN"] = run_best_of_n
