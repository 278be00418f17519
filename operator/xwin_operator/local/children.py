"""The children of `xwin run`: what a planner's CreateChild becomes on this machine.

`LocalChildren` is the local stand-in for the Kubernetes objects the operator creates. A
planned child (core.children.PlannedChild) is run by its step (core/steps.py) and task:

  * a `train` or `job` step (PyTorchJob, Job) -> `python -m xwin_jobs <job> --task FILE`;
    with `--nproc-per-node N` > 1 a `train` step runs as a PyTorchJob replica runs it,
    `python -m xwin_jobs.launch --standalone --nproc-per-node N -m xwin_jobs <job> --task FILE`
    (torchrun, N ranks: `train_command`) (`steps.step_env`; a sample step also gets its server's URL and never the judge's key,
    `sampling.sampler_env`), output teed to `<log dir>/<child name>.log`;
  * a `serve` step's Deployment -> a real vLLM server (`sampling.start_server`), Running
    once `/health` answers; no server is started when the samples it would serve are already
    complete (a re-run after a later step failed);
  * its Service -> Running at once (the sample step reads the server's own URL).

This is a laptop executor: at most ONE job process runs at a time, plus the vLLM server its
sample step needs and, beside a sampler, the next server of the same stage attempt that the
planner creates early (evaluate's next model: its cold start overlaps the sampling; two
servers at most). Children the planner creates together (independent stages) are queued and
started one by one; a queued child is observed as Pending. `state()` gives every child as a
planner `ChildState`; `changed` is notified whenever a child changes phase, so the executor
sleeps until something happens (or a backoff ends).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from xwin_jobs.task import StageTask

from ..core.children import TRAIN_LAUNCHER, PlannedChild
from ..core.steps import Step
from ..core.types import ACTIVE, FINISHED, ChildState, Phase, now_iso
from .server_pool import Parked, ServerPool, running

JOB_KINDS = ("PyTorchJob", "TrainJob", "Job")


def train_command(python: str, step: Step, task_file: Path, nproc_per_node: int) -> list[str]:
    """The command of a `train` or `job` step on this machine: a `train` step with more than
    one process per node is the PyTorchJob replica's command (core.children.TRAIN_LAUNCHER) on a
    standalone rendezvous; otherwise the one process torchrun would start."""
    job = [step.job, "--task", str(task_file)]
    if step.kind == "train" and nproc_per_node > 1:
        launcher, module = TRAIN_LAUNCHER[1:3], TRAIN_LAUNCHER[3:]
        return [python, *launcher, "--standalone", "--nproc-per-node", str(nproc_per_node),
                *module, *job]
    return [python, "-m", "xwin_jobs", *job]


def run_job(cmd: list[str], env: dict[str, str], log_path: Path,
            on_line: Callable[[str], None] = lambda line: None,
            on_start: Callable[[subprocess.Popen], None] = lambda proc: None) -> tuple[int, str]:
    """Run `cmd`, teeing its output to `log_path` (appended) and `on_line`; returns (exit code,
    last non-empty output line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=1)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1, stdin=subprocess.DEVNULL)
        on_start(proc)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            line = line.rstrip()
            if line:
                tail.append(line)
                on_line(line)
        code = proc.wait()
    return code, (tail[-1] if tail else "(no output)")


@dataclass
class LocalChild:
    """One child: its identity from the labels, its phase, and the process behind it."""

    kind: str
    name: str
    stage: str
    step: Step
    attempt: int
    task: StageTask
    created: str
    phase: Phase = Phase.PENDING  # Pending (queued or starting) | Running | Succeeded | Failed
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    finished: str | None = None
    started_at: float | None = None   # time.monotonic() when its process started
    handle: Any = None                # Popen of a job, LocalVllmServer of a Deployment
    scratch: Any = None               # the TemporaryDirectory a server's model was fetched into
    url: str | None = None            # a server's OpenAI base URL (None: no server needed)
    server_key: str | None = None     # a server's model and settings (server_pool.server_key)
    stopped: bool = False            # deleted: its thread must not report back
    permanent: bool = False          # a failure every attempt would repeat (server_exit)

    @property
    def active(self) -> bool:
        return self.started_at is not None and self.phase in ACTIVE

    def state(self) -> ChildState:
        return ChildState(kind=self.kind, name=self.name, stage=self.stage, step=self.step.name,
                          attempt=self.attempt, phase=self.phase, reason=self.reason,
                          message=self.message, exit_code=self.exit_code, created=self.created,
                          finished=self.finished, permanent=self.permanent)


def serves(server: LocalChild, job: LocalChild) -> bool:
    return (server.stage, server.step.name, server.attempt) == (job.stage, job.step.served_by,
                                                                job.attempt)


def may_start(child: LocalChild, active: list[LocalChild]) -> bool:
    """The one-job rule: a job starts when no other job runs and every server up is its own
    (for a sampler: or the next server of its stage attempt, started early); a server starts
    alone, or beside a sampler of its stage attempt and that sampler's server (two at most).
    `active` are the children started and not ended (Services aside). Pure."""
    jobs = [c for c in active if c.kind in JOB_KINDS]
    servers = [c for c in active if c.kind == "Deployment"]
    ours = all((o.stage, o.attempt) == (child.stage, child.attempt) for o in servers + jobs)
    if child.kind == "Deployment":
        return len(servers) < 2 and ours and all(j.step.served_by for j in jobs)
    if jobs:
        return False
    if all(serves(s, child) for s in servers):
        return True
    return bool(child.step.served_by) and ours and any(serves(s, child) for s in servers)


class LocalChildren:
    """The children of one `xwin run`, by name, with the one-job-at-a-time queue."""

    def __init__(self, ctx: Any, on_start: Callable[[LocalChild], None] = lambda child: None):
        self.ctx, self.on_start = ctx, on_start
        # idle servers a later stage will serve again (server_pool); `keep` says which to park
        self.pool = ServerPool()
        self.keep: Callable[[LocalChild], bool] = lambda child: False
        self.children: dict[tuple[str, str], LocalChild] = {}   # (kind, name): a Deployment
        # and its Service share a name, as on Kubernetes
        self.queue: list[LocalChild] = []
        self.changed = threading.Condition()
        self._dirty = False

    # --- what the planner sees ----------------------------------------------------------

    def states(self) -> list[ChildState]:
        with self.changed:
            return [c.state() for c in self.children.values()]

    def wait(self, timeout: float) -> None:
        """Until a child changes phase, or `timeout` seconds."""
        with self.changed:
            if not self._dirty:
                self.changed.wait(timeout)
            self._dirty = False

    def _notify(self) -> None:
        with self.changed:
            self._dirty = True
            self.changed.notify_all()

    # --- the planner's actions ------------------------------------------------------------

    def create(self, planned: PlannedChild) -> LocalChild | None:
        """Queue a planned child (a name that exists is a 409: None)."""
        if (planned.kind, planned.name) in self.children:
            return None
        child = LocalChild(planned.kind, planned.name, planned.stage, planned.step, planned.attempt,
                           planned.task, now_iso())
        with self.changed:
            self.children[child.kind, child.name] = child
            if child.kind == "Service":  # nothing runs for it: the sampler gets the server's URL
                child.phase, child.started_at = Phase.RUNNING, time.monotonic()
            else:
                self.queue.append(child)
        return child

    def delete(self, kind: str, name: str) -> bool:
        """Stop the child's process or server and forget it (as a deleted object vanishes);
        False when there is no such child (a 404)."""
        with self.changed:
            child = self.children.pop((kind, name), None)
            if child is None:
                return False
            if child in self.queue:
                self.queue.remove(child)
        self._stop(child, park=True)
        return True

    def stop_all(self) -> None:
        """Stop every process and server (the end of the run, an error, Ctrl-C)."""
        with self.changed:
            children, self.queue = list(self.children.values()), []
        for child in children:
            self._stop(child)
        self.pool.close()

    def wait_jobs(self, timeout: float) -> None:
        """Let job processes still exiting (a last step after its marker) finish."""
        deadline = time.monotonic() + timeout
        for child in list(self.children.values()):
            if child.kind in JOB_KINDS and child.handle is not None:
                try:
                    child.handle.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    # --- starting children one by one -------------------------------------------------------

    def start_ready(self) -> None:
        """Start the queued children the one-job rule allows, in the order they were created."""
        with self.changed:
            active = [c for c in self.children.values() if c.active and c.kind != "Service"]
            for child in list(self.queue):
                if not may_start(child, active):
                    continue
                self.queue.remove(child)
                child.started_at = time.monotonic()
                active.append(child)
                target = self._run_server if child.kind == "Deployment" else self._run_job
                threading.Thread(target=target, args=(child,), name=child.name, daemon=True).start()
                self.on_start(child)

    def server_for(self, job: LocalChild) -> LocalChild | None:
        return next((c for c in self.children.values()
                     if c.kind == "Deployment" and serves(c, job)), None)

    def _finish(self, child: LocalChild, phase: Phase, reason: str = "", message: str = "",
                exit_code: int | None = None, permanent: bool = False) -> None:
        with self.changed:
            if child.stopped:
                return
            child.phase, child.reason, child.message = phase, reason, message
            child.exit_code, child.permanent = exit_code, permanent
            if phase in FINISHED:
                child.finished = now_iso()
            self._dirty = True
            self.changed.notify_all()

    def _run_job(self, child: LocalChild) -> None:
        from .sampling import job_env_for

        ctx, log_path = self.ctx, self.ctx.log_dir / f"{child.name}.log"
        try:
            server = self.server_for(child) if child.step.served_by else None
            env = job_env_for(child.step, ctx.env, server.url if server else None)
            task_file = ctx.log_dir / f"{child.name}.task.json"
            ctx.log_dir.mkdir(parents=True, exist_ok=True)
            task_file.write_text(child.task.to_json())
            cmd = train_command(ctx.python, child.step, task_file, ctx.nproc_per_node)
            self._finish(child, Phase.RUNNING)

            def started(proc: subprocess.Popen) -> None:
                child.handle = proc
                if child.stopped:
                    proc.terminate()
            code, last = run_job(cmd, env, log_path, lambda line: ctx.on_line(child.stage, line),
                                 started)
        except Exception as e:  # cannot even start it: a failed child, never a crashed run
            self._finish(child, Phase.FAILED, "StartError", f"{type(e).__name__}: {e} (log: {log_path})")
            return
        if code == 0:
            self._finish(child, Phase.SUCCEEDED, exit_code=0)
        else:
            self._finish(child, Phase.FAILED, "Failed", f"{last} (log: {log_path})",
                         exit_code=code)

    def _run_server(self, child: LocalChild) -> None:
        """Start the server, report it Running once healthy, then watch it until it is
        deleted: a server that ends on its own is a failed child, whatever its exit code,
        named by its last error line (server_exit.diagnose), once."""
        from .sampling import start_server

        try:
            started = start_server(child, self.ctx, self.pool)
        except Exception as e:  # VllmServerError, a model that cannot be fetched, ...
            exit = getattr(e, "exit", None)
            self._finish(child, Phase.FAILED, exit.reason if exit else "ServerFailed", str(e),
                         permanent=bool(exit and exit.permanent))
            return
        if started is None:
            self.ctx.on_line(child.stage, f"{child.name}: samples already complete, no vLLM server")
        self._finish(child, Phase.RUNNING)
        server = child.handle
        proc = getattr(server, "proc", None)
        while proc is not None and not child.stopped:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            if child.stopped or child.handle is not server:  # deleted, or parked for later
                return
            exit = server.exit_of(code)
            self.ctx.on_line(child.stage, f"{child.name}: {exit.message}")
            self._finish(child, Phase.FAILED, exit.reason, f"{exit.message} (log: {server.log_path})",
                         exit_code=code, permanent=exit.permanent)
            return

    def _stop(self, child: LocalChild, park: bool = False) -> None:
        """Stop a child's process; a server a later stage will serve again (`keep`) is parked
        in `pool` instead when `park` (the planner deleted it, the run goes on)."""
        with self.changed:
            child.stopped = True
        handle = child.handle
        if (park and child.kind == "Deployment" and child.server_key and running(handle)
                and self.keep(child)):
            self.pool.park(child.server_key, Parked(handle, child.scratch))
            child.handle = child.scratch = None
            self.ctx.on_line(child.stage, f"{child.name}: vLLM server kept for a later stage")
            return
        if child.kind in JOB_KINDS and handle is not None and handle.poll() is None:
            handle.terminate()
            try:
                handle.wait(timeout=30)
            except subprocess.TimeoutExpired:
                handle.kill()
        elif child.kind == "Deployment" and handle is not None:
            handle.stop()
        if child.scratch is not None:
            child.scratch.cleanup()
            child.scratch = None

