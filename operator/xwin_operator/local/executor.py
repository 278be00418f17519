"""`xwin run`: the local executor. The operator's planner, with processes instead of children.

`execute` repeats the SAME pass the kopf handlers run (core.loop.reconcile_once_sync: observe ->
`planner.decide` -> act), so both walk one graph with one set of rules (readiness, steps,
retries with backoff, markers); this side supplies its parts:

    observe: LocalObserver: the children it started (children.LocalChildren, as ChildStates)
             and then each stage's `_SUCCESS.json`, read from the store as the operator reads it
    act:     LocalActions: CreateChild -> queue a local process for the planned child's step
             (a job, a vLLM server, nothing for a Service); DeleteChild -> stop it (a
             vLLM server a later stage serves again is kept idle instead: server_pool);
             SuspendChild -> n/a;
             PatchStatus -> keep the status, write `<log dir>/status.json` and hand it to
             `ctx.on_status` (xwin run's progress display); EmitEvent ->
             a progress line; RequeueAfter -> sleep that long, or until a child changes
    until the status phase is Succeeded or Failed.

At most one job process runs at a time (plus the vLLM server its sample step needs). A stage
whose marker matches its inputs is skipped, so re-running after a crash continues from the
first unfinished stage. A failed child is retried as the operator retries it, up to
`retries.maxAttempts`, after `config.backoff_seconds` (doubling; `XWIN_BACKOFF_SECONDS` or
`xwin run --backoff`). Nothing here knows how a stage works inside.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..api.spec import AlignmentRun
from ..core.config import OperatorConfig
from ..core.children import PlannedChild
from ..core.loop import reconcile_once_sync
from ..core.planner import stage_tasks
from ..core.inputs import run_root
from ..core.types import DONE, Phase
from .children import LocalChild, LocalChildren
from .server_pool import wanted_later

POLL_SECONDS = 5.0     # a safety net: children notify when they change


class RunError(RuntimeError):
    """The run stopped without succeeding; `.results` holds what happened so far."""

    results: list = []


class Interrupted(RunError):
    """Ctrl-C: the children were stopped."""


class StageFailed(RunError):
    def __init__(self, stage: str, message: str):
        for prefix in (f"stage {stage} failed ", f"stage {stage}: "):  # the planner's wording
            if message.startswith(prefix):
                message = message[len(prefix):]
        sep = " " if message.startswith("after ") else ": "
        super().__init__(f"stage '{stage}' failed{sep}{message}")
        self.stage = stage


@dataclass
class StageOutcome:
    stage: str
    outcome: str  # ran | skipped (already done) | reused (from:) | failed
    seconds: float = 0.0
    artifact: str = ""
    metrics: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class LocalContext:
    """What the local children need from the caller."""

    python: str
    env: dict[str, str]
    log_dir: Path
    on_line: Callable[[str, str], None] = lambda stage, line: None      # (stage, output line)
    on_event: Callable[[str, str, str], None] = lambda reason, message, type_: None
    on_status: Callable[[dict], None] = lambda status: None   # the status of every pass that changed it
    nproc_per_node: int = 1  # ranks of a training step (torchrun when > 1)


def job_env(run: AlignmentRun, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: the caller's, plus the run's S3 endpoint."""
    env = dict(os.environ if base is None else base)
    if run.spec.storage.endpoint and not env.get("AWS_ENDPOINT_URL"):
        env["AWS_ENDPOINT_URL"] = run.spec.storage.endpoint
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def local_config(store_uri: str | None, env: dict[str, str] | None = None,
                 backoff_seconds: float | None = None) -> OperatorConfig:
    """The planner's settings for `xwin run`: XWIN_* variables (XWIN_BACKOFF_SECONDS,
    XWIN_BACKOFF_MAX_SECONDS, ...), the store, and a backoff given on the command line."""
    from dataclasses import replace

    config = replace(OperatorConfig.from_env(env), store=store_uri or "")
    return config if backoff_seconds is None else replace(config, backoff_seconds=backoff_seconds)


def read_markers(outputs: dict[str, str], store) -> dict[str, dict | None]:
    """stage -> its `_SUCCESS.json` in its output folder `outputs[stage]` (None if absent), as
    the operator's handlers read them; a store error is a StageFailed naming the stage whose
    marker could not be read."""
    from xwin_jobs.store import read_marker

    markers: dict[str, dict | None] = {}
    for stage, output in outputs.items():
        try:
            markers[stage] = read_marker(store, output)
        except Exception as e:  # unreachable endpoint, unreadable marker
            raise StageFailed(stage, f"{type(e).__name__}: {e}") from None
    return markers


class LocalObserver:
    """What the loop observes here (core.loop.Observer): the children it started (queued ones
    whose turn came are started first), then the markers in the store and the fingerprints of
    the run's external inputs (a missing one is a missing input), the running steps' progress
    records. There are no Secrets."""

    def __init__(self, children: LocalChildren, store):
        from xwin_jobs.fingerprint import Fingerprints
        from xwin_jobs.progress import ProgressReader

        self._children, self.store = children, store
        self._prints = Fingerprints()   # a file's sha256 kept while its size and mtime stay
        self._progress = ProgressReader()  # the running steps' last good progress records

    def children(self) -> list:
        self._children.start_ready()
        return self._children.states()

    def markers(self, outputs: dict[str, str]) -> dict[str, dict | None]:
        return read_markers(outputs, self.store)

    def missing_inputs(self, uris: list[str]) -> list[str]:
        return []

    def missing_secrets(self, refs: dict[str, str]) -> list[str]:
        return []

    def progress(self, uris: dict[str, str]) -> dict:
        return self._progress.read(self.store, uris) if uris else {}

    def fingerprints(self, uris: list[str]) -> dict[str, str]:
        """Every external input as the jobs see it (this machine is theirs): a changed one
        reruns its stage, a missing one fails the stage that must read it (core.loop)."""
        try:
            return {uri: self._prints.of(self.store, uri) for uri in uris}
        except Exception as e:  # an unreachable endpoint: name it, as for the markers
            raise RunError(f"cannot read the run's inputs: {type(e).__name__}: {e}") from None


class _Progress:
    """Stage results from the status the planner writes (ran / skipped / reused / failed)."""

    def __init__(self, on_stage: Callable[[StageOutcome | str], None]):
        self.on_stage = on_stage
        self.results: list[StageOutcome] = []
        self.reported: set[str] = set()
        self.announced: dict[str, float] = {}    # stage -> monotonic time of its first process

    def started(self, child: LocalChild) -> None:
        if child.stage not in self.announced and child.stage not in self.reported:
            self.announced[child.stage] = child.started_at or time.monotonic()
            self.on_stage(child.stage)

    def update(self, status: dict) -> None:
        for s in status.get("stages", []):
            name, phase = s["name"], s["phase"]
            if name in self.reported or phase not in (*DONE, Phase.FAILED):
                continue
            ran = name in self.announced
            seconds = time.monotonic() - self.announced[name] if ran else 0.0
            if phase == Phase.SKIPPED:
                result = StageOutcome(name, "reused", artifact=s.get("artifact", ""))
            elif phase == Phase.SUCCEEDED:
                result = StageOutcome(name, "ran" if ran else "skipped", seconds,
                                     s.get("artifact", ""), dict(s.get("metrics") or {}),
                                     "" if ran else "already done")
            else:
                result = StageOutcome(name, "failed", seconds,
                                     message=str(StageFailed(name, s.get("message", ""))))
            self.reported.add(name)
            self.results.append(result)
            self.on_stage(result)

    def fail(self, error: RunError) -> RunError:
        stage = getattr(error, "stage", "")
        if stage and stage not in self.reported:
            self.reported.add(stage)
            self.results.append(StageOutcome(stage, "failed", message=str(error)))
            self.on_stage(self.results[-1])
        error.results = self.results
        return error


class LocalActions:
    """The planner's actions on this machine (core.executor.Executor): a child queued as a
    process, stopped, the status kept and written to `<log dir>/status.json`, an Event a
    progress line, a requeue a shorter wait. `xwin run` refuses a suspended run, so there is
    nothing to suspend."""

    def __init__(self, children: LocalChildren, ctx: LocalContext, progress: _Progress):
        self.children, self.ctx, self.progress = children, ctx, progress
        self.status: dict | None = None
        self.wait, self.acted = POLL_SECONDS, False

    def create(self, planned: PlannedChild) -> None:
        child = self.children.create(planned)
        if child is not None:
            self.acted = True
            self.ctx.on_event("ChildCreated", f"{child.kind}/{child.name}", "Normal")

    def delete(self, kind: str, name: str) -> None:
        self.acted |= self.children.delete(kind, name)

    def suspend(self, kind: str, name: str, suspend: bool) -> None:
        pass

    def fail(self, kind: str, name: str, reason: str, message: str) -> None:
        """Never asked here: a local child has no pods to wait for (no pending clock)."""
        raise RunError(f"cannot stop {kind}/{name} as {reason}: {message}")

    def patch_status(self, status: dict) -> None:
        self.status = status
        write_status(self.ctx.log_dir, status)
        self.progress.update(status)
        self.ctx.on_status(status)

    def event(self, reason: str, message: str, type_: str) -> None:
        self.ctx.on_event(reason, message, type_)

    def requeue(self, seconds: float, reason: str) -> None:
        self.wait = min(self.wait, max(seconds, 0.05))


def execute(run: AlignmentRun, *, store_uri: str | None, ctx: LocalContext, store,
            on_stage: Callable[[StageOutcome | str], None] = lambda r: None,
            config: OperatorConfig | None = None) -> list[StageOutcome]:
    """Drive `run` to Succeeded with `planner.decide` and local processes. Returns the stage
    results; raises StageFailed (results attached as `.results`) when the run fails."""
    config = config or local_config(store_uri, ctx.env)
    if run.spec.suspend:
        raise RunError("spec.suspend is true: nothing would run (set it to false)")
    tasks = stage_tasks(run, config)      # the same tasks the planner builds its children from
    progress = _Progress(on_stage)
    children = LocalChildren(ctx, on_start=progress.started)
    actions_here = LocalActions(children, ctx, progress)
    children.keep = lambda child: wanted_later(run.spec, tasks, actions_here.status, child.stage,
                                               child.step.model_input or "")
    observer = LocalObserver(children, store)
    previous_sigterm = _trap_sigterm()
    try:
        while True:
            # a pass at least every POLL_SECONDS (progress_seconds if shorter: the running
            # steps' progress records are read each pass)
            actions_here.wait, actions_here.acted = min(POLL_SECONDS, config.progress_seconds), False
            reconcile_once_sync(run, observer, actions_here, actions_here.status, generation=1,
                                config=config, tasks=tasks)
            status, wait, acted = actions_here.status, actions_here.wait, actions_here.acted
            phase = (status or {}).get("phase")
            if phase == Phase.SUCCEEDED:
                children.wait_jobs(timeout=60)
                return progress.results
            if phase == Phase.FAILED:
                failed = [s for s in status["stages"] if s["phase"] == Phase.FAILED]
                stage = failed[0]["name"] if failed else status.get("stage", "")
                raise progress.fail(StageFailed(stage, failed[0].get("message", "") if failed
                                                else status.get("message", "")))
            if not acted:
                children.wait(wait)
    except RunError as e:
        raise progress.fail(e) from None
    except KeyboardInterrupt:
        raise progress.fail(Interrupted("interrupted (Ctrl-C): every process and vLLM server "
                                        "of the run was stopped")) from None
    finally:
        children.stop_all()
        _restore_sigterm(previous_sigterm)


def write_status(log_dir: Path, status: dict) -> None:
    """`<log dir>/status.json`: the run's status as the operator would patch it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = log_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
    tmp.replace(log_dir / "status.json")


def _trap_sigterm():
    """A SIGTERM ends the run through `finally` (servers and processes stopped), as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, terminate)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def default_log_dir(run: AlignmentRun) -> Path:
    return Path("xwin-logs") / run.metadata.namespace / run.metadata.name


def describe_root(run: AlignmentRun, store_uri: str | None) -> str:
    return run_root(run.spec, run.metadata.namespace, run.metadata.name, store_uri)


def default_nproc_per_node() -> int:
    """`xwin run`'s ranks per training step: the visible GPUs, else 1 (torch is not imported:
    CUDA_VISIBLE_DEVICES, else nvidia-smi's list)."""
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 1
        return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))
    return 1


def python_for_jobs() -> str:
    return os.environ.get("XWIN_PYTHON", sys.executable)
