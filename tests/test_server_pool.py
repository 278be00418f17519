"""`xwin run` loads each model into vLLM once per run: a server a later stage serves again is
kept idle between stages (operator/xwin_operator/local/server_pool.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from xwin_operator.api.spec import Serving
from xwin_operator.api.spec_io import load_run
from xwin_operator.core.planner import stage_tasks
from xwin_operator.local.server_pool import Parked, ServerPool, serve_keys, wanted_later
from xwin_jobs.vllm_server import LocalVllmServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_run():
    run = load_run(ROOT / "examples/tiny/run.yaml")
    return run, stage_tasks(run)


def status(**phases: str) -> dict:
    return {"stages": [{"name": s, "phase": p} for s, p in phases.items()]}


def test_the_sft_server_is_kept_for_the_stages_that_serve_the_sft_model_again(demo_run):
    run, tasks = demo_run
    keys = {(s, m): k for s, m, k in serve_keys(run.spec, tasks)}
    # pairs' and bestOfN's policy and evaluate's first model are the same artifact, same settings
    assert keys["pairs", "policy"] == keys["bestOfN", "policy"] == keys["evaluate", "model:sft"]
    assert keys["evaluate", "model:dpo"] != keys["evaluate", "model:sft"]

    early = status(sft="Succeeded", pairs="Running")
    assert wanted_later(run.spec, tasks, early, "pairs", "policy")
    assert wanted_later(run.spec, tasks, None, "pairs", "policy")
    late = status(sft="Succeeded", pairs="Succeeded", rewardModel="Succeeded", bestOfN="Running")
    assert wanted_later(run.spec, tasks, late, "bestOfN", "policy")       # evaluate still will
    last = {**late, "stages": late["stages"] + [{"name": "bestOfN", "phase": "Succeeded"},
                                                {"name": "evaluate", "phase": "Running"}]}
    assert not wanted_later(run.spec, tasks, last, "evaluate", "model:sft")
    # models no other step serves are stopped at once
    assert not wanted_later(run.spec, tasks, early, "evaluate", "model:rejectionSampling")
    assert not wanted_later(run.spec, tasks, early, "evaluate", "model:dpo")
    # a stage that has ended (or failed) will serve nothing again
    done = status(pairs="Running", bestOfN="Succeeded", evaluate="Failed")
    assert not wanted_later(run.spec, tasks, done, "pairs", "policy")


def test_other_serving_settings_make_another_server(demo_run, tmp_path):
    run, _ = demo_run
    other = run.model_copy(deep=True)
    other.spec.stages.evaluate.serving = Serving(concurrency=4)
    tasks = stage_tasks(other)
    assert wanted_later(other.spec, tasks, None, "pairs", "policy")            # bestOfN
    assert not wanted_later(other.spec, tasks, status(pairs="Succeeded"), "bestOfN", "policy")


def stand_in(tmp_path: Path, name: str) -> LocalVllmServer:
    """A LocalVllmServer whose process is a sleeping stand-in (a real process, its own
    session, as vLLM's is): what the pool does with it is what it does with vLLM."""
    server = LocalVllmServer(sys.executable, str(tmp_path), None, tmp_path / f"{name}.log")
    server.port = 1
    server.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                   start_new_session=True)
    return server


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_a_parked_server_is_adopted_once_and_stopped_when_the_run_ends(tmp_path):
    pool = ServerPool()
    a, b = stand_in(tmp_path, "a"), stand_in(tmp_path, "b")
    pid_a, pid_b = a.proc.pid, b.proc.pid
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    class Scratch:  # a TemporaryDirectory's interface
        def cleanup(self):
            scratch.rmdir()
    try:
        pool.park("k1", Parked(a, None))
        pool.park("k2", Parked(b, Scratch()))
        assert pool.take("other") is None
        got = pool.take("k1")
        assert got is not None and got.server is a and alive(pid_a)
        assert pool.take("k1") is None            # adopted: no longer idle
        pool.park("k1", got)                      # released again
        pool.close()
        for p in (a, b):
            assert p.proc is None                 # stopped through LocalVllmServer.stop
        assert not alive(pid_a) and not alive(pid_b)
        assert not scratch.exists()               # the fetched model went with its server
        assert pool.keys() == []
    finally:
        for pid in (pid_a, pid_b):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_server_that_died_while_parked_is_not_adopted(tmp_path):
    pool = ServerPool()
    server = stand_in(tmp_path, "dead")
    server.proc.kill()
    server.proc.wait()
    pool.park("k", Parked(server, None))
    assert pool.take("k") is None and pool.keys() == []
