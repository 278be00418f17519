"""`xwin run` for any stage of several steps, walking the same step table as the operator.

`run_steps(task, ctx)` runs `steps.task_steps(task)` in order, as the planner does on a
cluster, with processes instead of children:
  * a `serve` step starts a real vLLM server (`xwin_jobs.vllm_server.LocalVllmServer`, the
    same `vllm_server_args` as the Deployment) for the task input the step names, downloading
    a remote model to a scratch folder first;
  * the `sample` step it serves runs `python -m xwin_jobs <stage>-sample` with the server's
    URL in the environment (`steps.step_env`: OPENAI_BASE_URL, XWIN_SERVED_MODEL,
    XWIN_MODEL_INPUT, XWIN_STEP), then the server is stopped (always, on failure too);
  * `train` and `job` steps run `python -m xwin_jobs <job>` once.

A stage that needs more (e.g. skipping the server when its samples are complete) registers
its own runner in `local.STAGE_RUNNERS`, which wins over this one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xwin_jobs.task import StageTask

from .local import LocalContext, StageFailed, run_job
from .steps import Step, step_env, task_steps


def _serve(task: StageTask, step: Step, ctx: LocalContext, scratch: Path):
    from xwin_jobs.modeling import resolve_model_source
    from xwin_jobs.store import Store
    from xwin_jobs.vllm_server import LocalVllmServer, VllmServerError, vllm_python

    try:
        python = vllm_python(ctx.env)
    except VllmServerError as e:
        raise StageFailed(task.stage, str(e)) from None
    uri = task.inputs[step.model_input]
    store = Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL"))
    model = resolve_model_source(store, uri, scratch)
    timeout = float(ctx.env.get("XWIN_VLLM_STARTUP_TIMEOUT") or 600)
    ctx.on_line(task.stage, f"starting vLLM for {uri}")
    return LocalVllmServer(python, model, task.params.get("serving"),
                           ctx.log_dir / f"{task.stage}.{step.name}.vllm.log", env=ctx.env,
                           device="cpu", startup_timeout_s=timeout)


def run_steps(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.vllm_server import SERVED_MODEL_NAME, VllmServerError

    steps = task_steps(task)
    by_name = {s.name: s for s in steps}
    for step in steps:
        if step.kind == "serve" or step.served_by:
            if step.kind == "serve":
                continue  # started together with the sample step it serves, below
            serve = by_name[step.served_by]
            with tempfile.TemporaryDirectory(prefix="xwin-model-") as scratch:
                server = _serve(task, serve, ctx, Path(scratch))
                try:
                    with server:
                        env = {**ctx.env, **step_env(step, server.base_url, SERVED_MODEL_NAME)}
                        run_job(task, LocalContext(ctx.python, env, ctx.log_dir, ctx.on_line),
                                step=step.job)
                except VllmServerError as e:
                    raise StageFailed(task.stage, str(e)) from None
        else:
            env = {**ctx.env, **step_env(step)}
            run_job(task, LocalContext(ctx.python, env, ctx.log_dir, ctx.on_line), step=step.job)
