"""`xwin run`: the local executor. Runs a run's stages on this machine, one after another.

Each stage is the same `python -m xwin_jobs <stage> --task ...` a pod runs, started as a
subprocess with its output teed to a log file. The stage graph decides what is ready; a stage
whose `_SUCCESS.json` matches its inputs is skipped, so re-running after a crash continues
from the first unfinished stage. Nothing here knows how a stage works inside.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from xwin_jobs.task import StageTask, completed_marker

from .graph import ready, stages_of
from .spec import AlignmentRun
from .tasks import run_root, stage_task


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


@dataclass
class StageResult:
    stage: str
    outcome: str  # ran | skipped (already done) | reused (from:) | failed
    seconds: float = 0.0
    artifact: str = ""
    metrics: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class LocalContext:
    """What a stage runner needs from the executor."""

    python: str
    env: dict[str, str]
    log_dir: Path
    on_line: Callable[[str, str], None] = lambda stage, line: None


def job_env(run: AlignmentRun, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: the caller's, plus the run's S3 endpoint."""
    env = dict(os.environ if base is None else base)
    if run.spec.storage.endpoint and not env.get("AWS_ENDPOINT_URL"):
        env["AWS_ENDPOINT_URL"] = run.spec.storage.endpoint
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_job(task: StageTask, ctx: LocalContext, step: str | None = None) -> None:
    """Run `python -m xwin_jobs <step or stage> --task FILE`, teeing output to the stage log."""
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    name = step or task.stage
    task_file = ctx.log_dir / f"{name}.task.json"
    task_file.write_text(task.to_json())
    log_path = ctx.log_dir / f"{name}.log"
    tail: deque[str] = deque(maxlen=20)
    cmd = [ctx.python, "-m", "xwin_jobs", name, "--task", str(task_file)]
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=ctx.env, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            line = line.rstrip()
            if line:
                tail.append(line)
                ctx.on_line(task.stage, line)
        code = proc.wait()
    if code != 0:
        last = tail[-1] if tail else "(no output)"
        raise StageFailed(task.stage, f"{name} exited with code {code}: {last} (log: {log_path})")


# Stages whose local execution is more than one job (a server, a sampler, a scorer) register
# their own runner here; everything else is one `python -m xwin_jobs <stage>` process.
StageRunner = Callable[[StageTask, LocalContext], None]
STAGE_RUNNERS: dict[str, StageRunner] = {}


def run_stage(task: StageTask, ctx: LocalContext) -> None:
    """A registered runner, else the steps of `steps.py` (the table the operator walks): one
    `python -m xwin_jobs <stage>` for a one-step stage, `local_steps.run_steps` otherwise."""
    runner = STAGE_RUNNERS.get(task.stage)
    if runner is None:
        from .steps import task_steps

        if len(task_steps(task)) == 1:
            runner = run_job
        else:
            from .local_steps import run_steps as runner
    runner(task, ctx)


def execute(run: AlignmentRun, *, store_uri: str | None, ctx: LocalContext, store,
            on_stage: Callable[[StageResult | str], None] = lambda r: None) -> list[StageResult]:
    """Run every stage of `run` in graph order. Raises StageFailed at the first failure
    (results so far are attached as `.results`)."""
    spec = run.spec
    results: list[StageResult] = []
    succeeded: set[str] = set()
    for stage in stages_of(spec):
        st = getattr(spec.stages, stage)
        if st.reused:
            results.append(StageResult(stage, "reused", artifact=st.from_))
            on_stage(results[-1])
            succeeded.add(stage)
    while True:
        todo = ready(spec, succeeded)
        if not todo:
            break
        stage = todo[0]
        task = stage_task(run, stage, store_uri)
        started = time.monotonic()
        try:
            marker = completed_marker(task, store)
            if marker is not None:
                results.append(StageResult(stage, "skipped", artifact=task.output,
                                           metrics=marker.get("metrics", {}), message="already done"))
            else:
                on_stage(stage)
                run_stage(task, ctx)
                marker = completed_marker(task, store)
                if marker is None:
                    raise StageFailed(stage, f"finished without writing {task.output}_SUCCESS.json")
                results.append(StageResult(stage, "ran", time.monotonic() - started, task.output,
                                           marker.get("metrics", {})))
        except StageFailed as e:
            results.append(StageResult(stage, "failed", time.monotonic() - started, message=str(e)))
            on_stage(results[-1])
            e.results = results  # type: ignore[attr-defined]
            raise
        except Exception as e:  # store errors, missing inputs: name the stage
            failure = StageFailed(stage, f"{type(e).__name__}: {e}")
            results.append(StageResult(stage, "failed", time.monotonic() - started, message=str(failure)))
            on_stage(results[-1])
            failure.results = results  # type: ignore[attr-defined]
            raise failure from None
        on_stage(results[-1])
        succeeded.add(stage)
    return results


def default_log_dir(run: AlignmentRun) -> Path:
    return Path("xwin-logs") / run.metadata.namespace / run.metadata.name


def describe_root(run: AlignmentRun, store_uri: str | None) -> str:
    return run_root(run.spec, run.metadata.namespace, run.metadata.name, store_uri)


def python_for_jobs() -> str:
    return os.environ.get("XWIN_PYTHON", sys.executable)


# Multi-process stage runners register themselves in STAGE_RUNNERS on import.
from . import local_sampling  # noqa: E402,F401  (bestOfN: vLLM server, sampler, scorer)
from . import local_judge  # noqa: E402,F401  (pairs, evaluate: vLLM servers, samplers, judge)
