"""`xwin run`'s serve and sample steps: a real vLLM server, and the sampler's environment.

    serve step (the Deployment the planner creates) -> start_server: the task input the step
        names (downloaded to a scratch folder when remote, `resolve_model_source`) served by
        `xwin_jobs.vllm_server.LocalVllmServer` with the same `vllm_server_args` as the
        operator's Deployment; Running once `/health` answers
    sample step (the Job)  -> python -m xwin_jobs <stage>-sample with `job_env_for`: the
        server's URL (OPENAI_BASE_URL, XWIN_SERVED_MODEL, XWIN_MODEL_INPUT, XWIN_STEP) and
        no OPENAI_API_KEY
    the planner deletes the Deployment once its sampler is done -> the server is stopped

The vLLM interpreter is `XWIN_VLLM_PYTHON`, else `.venv-vllm/bin/python` (`make vllm`); a
server that does not come up within `XWIN_VLLM_STARTUP_TIMEOUT` seconds (default 600) fails
the serve step with the last lines of its log, `<log dir>/<child name>.log`. When the samples
the server would serve are already complete (a re-run after a later step failed) no server is
started: the sample step finds its output complete and exits at once.

Only judge steps (`Step.needs_judge`) get the caller's OPENAI_API_KEY, as only their pods get
`judge.apiKeySecret` on a cluster.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from xwin_jobs.store import Store
from xwin_jobs.task import StageTask

from ..core.steps import Step, step_env
from .server_pool import ServerPool, server_key


def sampler_env(env: dict[str, str], server_url: str, served_model: str,
                model_input: str) -> dict[str, str]:
    """The environment of a sampling step: the server's URL, and no judge key."""
    out = {k: v for k, v in env.items() if k != "OPENAI_API_KEY"}
    out.update(OPENAI_BASE_URL=server_url, XWIN_SERVER_URL=server_url,
               XWIN_SERVED_MODEL=served_model, XWIN_MODEL_INPUT=model_input)
    return out


def job_env_for(step: Step, env: dict[str, str], server_url: str | None) -> dict[str, str]:
    """The environment of a step's process: the caller's (the judge key for judge steps only),
    the step's (`steps.step_env`), and for a sample step its server's URL."""
    from xwin_jobs.vllm_server import SERVED_MODEL_NAME

    if step.served_by and server_url:
        base = sampler_env(env, server_url, SERVED_MODEL_NAME, step.model_input or "")
    else:
        base = {k: v for k, v in env.items() if step.needs_judge or k != "OPENAI_API_KEY"}
    return {**base, **step_env(step, server_url, SERVED_MODEL_NAME)}


def samples_done(task: StageTask, model_input: str, store: Store) -> bool:
    """Whether the sample step for `task.inputs[model_input]` has nothing left to sample (the
    stage job's own `samples_done`)."""
    from xwin_jobs.stages import samples_done as job_samples_done

    return job_samples_done(task, store, model_input)


def start_server(child: Any, ctx: Any, pool: ServerPool | None = None) -> str | None:
    """Bring up the vLLM server of a serve-step child (`children.LocalChild`): sets
    `child.handle`, `child.scratch`, `child.url`, `child.server_key`; returns the URL, or None
    when the samples it would serve are complete. A server for the same model and settings
    parked in `pool` by an earlier stage is adopted instead of started. Raises
    VllmServerError (with the server log's last lines)."""
    from xwin_jobs.modeling import resolve_model_source
    from xwin_jobs.vllm_server import LocalVllmServer, vllm_python

    task: StageTask = child.task
    store = Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL"))
    if samples_done(task, child.step.model_input, store):
        return None
    uri = task.inputs[child.step.model_input]
    child.server_key = server_key(uri, task.params.get("serving"))
    parked = pool.take(child.server_key) if pool is not None else None
    if parked is not None:
        child.handle, child.scratch = parked.server, parked.scratch
        if child.stopped:  # deleted meanwhile: give it back unless _stop already did
            if child.handle is not None:
                pool.park(child.server_key, parked)
                child.handle = child.scratch = None
            return None
        ctx.on_line(child.stage, f"reusing the vLLM server for {uri} (log: {parked.server.log_path})")
        child.url = parked.server.base_url
        return child.url
    python = vllm_python(ctx.env)
    child.scratch = tempfile.TemporaryDirectory(prefix="xwin-model-")
    model_dir = resolve_model_source(store, uri, Path(child.scratch.name))
    server = LocalVllmServer(python, model_dir, task.params.get("serving"),
                             ctx.log_dir / f"{child.name}.log", env=ctx.env, device="cpu",
                             startup_timeout_s=float(ctx.env.get("XWIN_VLLM_STARTUP_TIMEOUT") or 600))
    child.handle = server  # from here on, deleting the child stops the server
    if child.stopped:      # deleted while the model was fetched
        return None
    ctx.on_line(child.stage, f"starting vLLM for {uri}")
    server.start()
    if child.stopped:      # deleted while it started
        server.stop()
        return None
    try:
        server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    child.url = server.base_url
    return child.url
