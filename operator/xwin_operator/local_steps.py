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

from xwin_jobs.task import StageTask

from .local import LocalContext, run_job
from .steps import step_env, task_steps


def run_steps(task: StageTask, ctx: LocalContext) -> None:
    from xwin_jobs.store import Store
    from xwin_jobs.vllm_server import SERVED_MODEL_NAME

    from .local_sampling import run_served_step

    steps = task_steps(task)
    by_name = {s.name: s for s in steps}
    for step in steps:
        if step.kind == "serve":
            continue  # started together with the sample step it serves, below
        if step.served_by:
            serve = by_name[step.served_by]
            run_served_step(task, ctx, Store(endpoint_url=ctx.env.get("AWS_ENDPOINT_URL")),
                            serve.model_input, step.job, log_name=f"{task.stage}.{serve.name}",
                            step_env=lambda url, step=step: {
                                **ctx.env, **step_env(step, url, SERVED_MODEL_NAME)})
        else:
            env = {**ctx.env, **step_env(step)}
            run_job(task, LocalContext(ctx.python, env, ctx.log_dir, ctx.on_line), step=step.job)
