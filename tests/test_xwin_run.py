"""`xwin run` end to end on the tiny example: every training stage, models reloaded from the
store, re-runs that skip finished stages, a crash that leaves finished work alone, and the
operator's planner driving it all: the same children in the same order as `decide` plans,
retries up to `retries.maxAttempts` with the backoff of `--backoff` / XWIN_BACKOFF_SECONDS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ["sft", "rewardModel", "rejectionSampling", "dpo"]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """The demo's data and base model, made once: <dir>/examples/tiny/work/..."""
    base = tmp_path_factory.mktemp("tiny")
    sys.path.insert(0, str(ROOT / "examples/tiny"))
    try:
        from make_task import make_task
    finally:
        sys.path.pop(0)
    make_task(base / "examples/tiny/work", seed=0)
    return base


@pytest.fixture
def workdir(tiny_task, tmp_path):
    """A fresh directory laid out like the repository root, sharing the made data."""
    (tmp_path / "examples/tiny").mkdir(parents=True)
    os.symlink(tiny_task / "examples/tiny/work", tmp_path / "examples/tiny/work")
    shutil.copy(ROOT / "examples/tiny/run-training.yaml", tmp_path / "run.yaml")
    return tmp_path


def xwin_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "xwin_operator.cli", "run", "run.yaml", *args]


def xwin_run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(xwin_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def created(stdout: str) -> list[str]:
    """Kind/name of every child `xwin run -v` created, in order."""
    return re.findall(r"^\s+· create (\S+/\S+)", stdout, flags=re.M)


def edit_spec(workdir: Path, change) -> None:
    spec = yaml.safe_load((workdir / "run.yaml").read_text())
    change(spec["spec"])
    (workdir / "run.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def status_of(workdir: Path) -> dict:
    return json.loads((workdir / "xwin-logs/demo/tiny/status.json").read_text())


def outcomes(stdout: str) -> dict[str, str]:
    """stage -> ran | skipped | reused | failed, from the progress lines."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("ran", "skipped", "reused", "failed"):
            out[parts[1]] = parts[0]
    return out


@pytest.mark.slow
def test_tiny_run_on_s3_then_rerun_is_a_noop(workdir, s3_server, s3_bucket):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from xwin_jobs.store import Store

    from plan_walk import planned_creates

    from xwin_operator.api.spec_io import load_run

    # the spec's storage is used without --store: its S3 URI and its endpoint
    edit_spec(workdir, lambda spec: spec.update(storage={"uri": f"{s3_bucket}/runs",
                                                         "endpoint": s3_server.endpoint_url}))
    env = dict(s3_server.env)
    first = xwin_run(workdir, "-v", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"→ {s3_bucket}/runs/demo/tiny/" in first.stdout
    assert not (workdir / "xwin-runs").exists()
    assert outcomes(first.stdout) == {"pairs": "reused", "bestOfN": "reused",
                                      **{s: "ran" for s in TRAINED}}
    # the operator's planner walked it: the children decide plans, in its order, one at a time
    plan = planned_creates(load_run(workdir / "run.yaml"), f"{s3_bucket}/runs")
    assert created(first.stdout) == plan == [
        "PyTorchJob/tiny-sft-1", "PyTorchJob/tiny-rewardmodel-1",
        "PyTorchJob/tiny-rejectionsampling-1", "PyTorchJob/tiny-dpo-1"]
    status = status_of(workdir)
    assert status["phase"] == "Succeeded" and status["conditions"][0]["reason"] == "AllStagesSucceeded"
    assert {s["name"]: (s["phase"], s["attempts"]) for s in status["stages"]} == {
        "pairs": ("Skipped", 0), "bestOfN": ("Skipped", 0), **{s: ("Succeeded", 1) for s in TRAINED}}

    store = Store(endpoint_url=s3_server.endpoint_url)
    root = f"{s3_bucket}/runs/demo/tiny"
    for stage in TRAINED:
        marker = store.read_json(f"{root}/{stage}/_SUCCESS.json")
        assert marker["stage"] == stage and marker["digest"]
        metrics = store.read_json(f"{root}/{stage}/metrics.json")
        assert metrics["trainLoss"] > 0
    assert store.read_json(f"{root}/rewardModel/metrics.json")["heldOutAccuracy"] >= 0.5
    # the sft stage checkpoints every 32 steps while training
    assert any("/sft/checkpoints/step-32/" in u for u in store.list_files(f"{root}/sft/checkpoints/"))

    local = workdir / "reloaded"
    lm = AutoModelForCausalLM.from_pretrained(store.download_dir(f"{root}/dpo/model/", local / "dpo"))
    rm = AutoModelForSequenceClassification.from_pretrained(
        store.download_dir(f"{root}/rewardModel/model/", local / "rm"))
    assert lm.config.model_type == "llama" and rm.config.num_labels == 1

    before = {u: store.read_bytes(u) for u in store.list_files(f"{root}/") if u.endswith("_SUCCESS.json")}
    again = xwin_run(workdir, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert outcomes(again.stdout) == {"pairs": "reused", "bestOfN": "reused",
                                      **{s: "skipped" for s in TRAINED}}
    assert created(again.stdout) == []
    assert {u: store.read_bytes(u) for u in before} == before


@pytest.mark.slow
def test_a_training_stage_s_progress_shows_while_it_runs(workdir):
    """`xwin run` (not on a terminal) prints the step's progress while it trains, read from
    the record its rank 0 writes (XWIN_PROGRESS_INTERVAL=0: every step; a pass every 0.3 s),
    and the status it ends with drops it."""
    def only_sft(spec):
        spec["stages"] = {"sft": {**spec["stages"]["sft"], "training": {"maxSteps": 40, "epochs": 40}}}
    edit_spec(workdir, only_sft)
    res = xwin_run(workdir, env={"XWIN_PROGRESS_INTERVAL": "0", "XWIN_PROGRESS_SECONDS": "0.3"})
    assert res.returncode == 0, res.stdout + res.stderr
    seen = [tuple(map(int, m)) for m in re.findall(r"progress sft/train: (\d+)/(\d+) steps", res.stdout)]
    assert seen and all(total == 40 for _, total in seen), res.stdout
    assert any(0 < done < 40 for done, _ in seen), res.stdout   # mid-stage, not only at the end
    record = json.loads((workdir / "xwin-runs/demo/tiny/sft/progress/train.json").read_text())
    assert (record["done"], record["total"], record["unit"]) == (40, 40, "steps")
    assert record["metrics"]["loss"] > 0 and record["metrics"]["tokensPerSecond"] > 0
    final = status_of(workdir)
    assert final["phase"] == "Succeeded" and "progress" not in final["stages"][0]
    assert final["progress"]["summary"] == "100%" and final["cost"]["summary"] == "$0.00, 0.0 GPU-h"
    assert "cost: $0.00, 0.0 GPU-h" in res.stdout   # under the summary table


@pytest.mark.slow
def test_the_spec_storage_uri_is_used_and_store_overrides_it(workdir):
    def only_sft(spec):
        spec["storage"] = {"uri": "file://./elsewhere/artifacts"}   # relative to the working dir
        spec["stages"] = {"sft": {**spec["stages"]["sft"], "training": {"maxSteps": 1}}}
    edit_spec(workdir, only_sft)
    res = xwin_run(workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "→ file://./elsewhere/artifacts/demo/tiny/" in res.stdout
    assert (workdir / "elsewhere/artifacts/demo/tiny/sft/_SUCCESS.json").is_file()
    assert not (workdir / "xwin-runs").exists()
    other = workdir / "override"
    res = xwin_run(workdir, "--store", f"file://{other}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (other / "demo/tiny/sft/_SUCCESS.json").is_file()


@pytest.mark.slow
def test_failed_stage_is_named_after_max_attempts_and_rerun_continues_from_it(workdir):
    scored = workdir / "scored.jsonl"
    good = (workdir / "examples/tiny/work/scored.jsonl").read_text().splitlines()
    bad = list(good)
    bad[4] = json.dumps({"id": "rs-x", "prompt": [{"role": "user", "content": "hi"}],
                         "responses": [{"content": "a", "score": "high"}]})
    scored.write_text("\n".join(bad) + "\n")

    def change(spec):
        spec["stages"]["bestOfN"]["from"] = f"file://{scored}"
        spec["retries"] = {"maxAttempts": 2}
    edit_spec(workdir, change)

    failed = xwin_run(workdir, "--backoff", "0")
    assert failed.returncode != 0
    out = " ".join(failed.stdout.split())  # the console folds long lines
    assert "stage 'rejectionSampling' failed after 2 attempt(s): PyTorchJob/tiny-rejectionsampling-2" in out
    assert "StageRetrying: stage rejectionSampling: attempt 2 of 2" in out
    assert f"{scored}:5" in out and "responses.0.score" in out
    log = workdir / "xwin-logs/demo/tiny/tiny-rejectionsampling-2.log"
    assert f"(log: {log.relative_to(workdir)})" in out and "responses.0.score" in log.read_text()
    res = outcomes(failed.stdout)
    assert res["sft"] == "ran" and res["rewardModel"] == "ran" and res["rejectionSampling"] == "failed"
    assert "dpo" not in res
    status = status_of(workdir)
    assert status["phase"] == "Failed" and status["stage"] == "rejectionSampling"
    assert "needed by spec.stages.dpo.init" in status["message"]
    runs = workdir / "xwin-runs/demo/tiny"
    assert not (runs / "rejectionSampling/_SUCCESS.json").exists()
    sft_marker = (runs / "sft/_SUCCESS.json").read_bytes()

    scored.write_text("\n".join(good) + "\n")
    fixed = xwin_run(workdir)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    res = outcomes(fixed.stdout)
    assert res["sft"] == "skipped" and res["rewardModel"] == "skipped"
    assert res["rejectionSampling"] == "ran" and res["dpo"] == "ran"
    assert (runs / "sft/_SUCCESS.json").read_bytes() == sft_marker


@pytest.mark.slow
def test_a_failed_attempt_is_retried_after_the_backoff_and_succeeds(workdir):
    """Attempt 1 of sft fails (its data is not complete yet: a line cut short); the data is
    fixed during the backoff (XWIN_BACKOFF_SECONDS); attempt 2, a new child, succeeds."""
    data = workdir / "late-sft.jsonl"
    data.write_text('{"id": "c0", "messages": [\n')

    def change(spec):
        spec["stages"] = {"sft": {**spec["stages"]["sft"], "data": f"file://{data}",
                                  "training": {"epochs": 1}}}
    edit_spec(workdir, change)
    proc = subprocess.Popen(xwin_cmd(), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "XWIN_BACKOFF_SECONDS": "4"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if status_of(workdir)["conditions"][0]["reason"] == "Backoff":
                    break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.1)
        assert proc.poll() is None, "xwin run ended before a backoff"
        shutil.copy(workdir / "examples/tiny/work/sft.jsonl", data)
        stdout, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout
    out = " ".join(stdout.split())
    assert outcomes(stdout) == {"sft": "ran"}
    assert "StageAttemptFailed: attempt 1 of stage sft failed (PyTorchJob/tiny-sft-1: Failed (exit code" in out
    assert "attempt 2 of 3 starts after a 4s backoff" in out
    status = status_of(workdir)
    assert status["phase"] == "Succeeded"
    assert status["stages"][0]["attempts"] == 2
    assert status["stages"][0]["children"] == ["PyTorchJob/tiny-sft-1", "PyTorchJob/tiny-sft-2"]
    assert (workdir / "xwin-runs/demo/tiny/sft/_SUCCESS.json").is_file()


def test_invalid_spec_and_missing_base_model(workdir):
    (workdir / "run.yaml").write_text((workdir / "run.yaml").read_text().replace("beta: 0.1", "beta: -1"))
    res = xwin_run(workdir)
    assert res.returncode == 1 and "run.yaml:" in res.stdout and "spec.stages.dpo.beta: must be > 0" in res.stdout

    shutil.copy(ROOT / "examples/tiny/run-training.yaml", workdir / "run.yaml")
    (workdir / "run.yaml").write_text((workdir / "run.yaml").read_text().replace(
        "file://./examples/tiny/work/base-model", "file://./nowhere/base-model"))
    res = xwin_run(workdir, env={"XWIN_BACKOFF_SECONDS": "0"})
    assert res.returncode == 1
    out = " ".join(res.stdout.split())
    # found missing before anything runs (its fingerprint), not after three failed attempts
    assert "stage 'sft' failed: spec.baseModel: file://./nowhere/base-model does not exist" in out
    assert not (workdir / "xwin-runs/demo/tiny/sft/_SUCCESS.json").exists()


def test_unreachable_s3_store_is_named(workdir, s3_server):
    from s3_server import closed_port

    endpoint = f"http://127.0.0.1:{closed_port()}"
    res = xwin_run(workdir, "--store", "s3://artifacts/runs",
                   env={**s3_server.env, "AWS_ENDPOINT_URL": endpoint})
    assert res.returncode == 1
    assert "stage 'sft' failed" in res.stdout
    assert f"cannot reach S3 endpoint {endpoint}" in res.stdout


def test_children_created_together_run_one_at_a_time(tmp_path):
    """rewardModel and rejectionSampling are independent: decide creates both at once; the
    local executor queues the second (Pending) and starts it once the first has ended."""
    from xwin_operator.core.children import planned_children
    from xwin_operator.local.executor import LocalContext
    from xwin_operator.local.children import LocalChildren
    from xwin_operator.api.spec_io import load_run
    from xwin_operator.core.descriptors import steps_of
    from xwin_operator.core.tasks import stage_task

    run = load_run(ROOT / "examples/tiny/run-training.yaml")
    store = f"file://{tmp_path}/runs"   # no sft marker there: both jobs fail at once
    tasks = {s: stage_task(run, s, store) for s in ("rewardModel", "rejectionSampling")}
    ctx = LocalContext(sys.executable, dict(os.environ), tmp_path / "logs")
    starts = []
    children = LocalChildren(ctx, on_start=lambda c: starts.append(
                                 (c.name, [o.phase for o in children.children.values() if o is not c])))
    for stage, task in tasks.items():
        for planned in planned_children(run, stage, steps_of(run.spec, stage)[0], 1, task):
            assert children.create(planned) is not None
    children.start_ready()
    assert {c.name: c.phase for c in children.states()}["tiny-rejectionsampling-1"] == "Pending"
    deadline = time.monotonic() + 120
    while any(c.phase not in ("Succeeded", "Failed") for c in children.states()):
        assert time.monotonic() < deadline
        children.wait(1)
        children.start_ready()
    assert starts == [("tiny-rewardmodel-1", ["Pending"]), ("tiny-rejectionsampling-1", ["Failed"])]
    failed = {c.name: c for c in children.states()}["tiny-rejectionsampling-1"]
    assert failed.exit_code and "sft" in failed.message and "tiny-rejectionsampling-1.log" in failed.message


def test_ctrl_c_stops_the_running_job(workdir):
    # as from a terminal: SIGINT not ignored, even when the tests run as a background job
    # (which inherits SIG_IGN for SIGINT, and Python then installs no KeyboardInterrupt)
    proc = subprocess.Popen(xwin_cmd(), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    task_file = str(workdir / "xwin-logs/demo/tiny/tiny-sft-1.task.json")

    def job_pids() -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and "tiny-sft-1.task.json" in (p / "cmdline").read_text() and \
                        (p / "cwd").resolve() == workdir.resolve():
                    pids.append(int(p.name))
            except OSError:
                pass
        return pids
    try:
        deadline = time.monotonic() + 60
        while not job_pids() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert job_pids(), f"no sft process for {task_file}"
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout
    assert "interrupted (Ctrl-C)" in stdout and "Traceback" not in stdout
    assert not job_pids()


@pytest.mark.slow
def test_nproc_per_node_runs_training_stages_under_torchrun_with_zero(workdir):
    """`xwin run --nproc-per-node 2`: a training stage runs as a PyTorchJob replica runs it,
    torchrun with 2 ranks (here DeepSpeed ZeRO-2 over gloo), and the model it saves loads."""
    def change(spec):
        spec["stages"] = {"sft": {**spec["stages"]["sft"],
                                  "training": {"epochs": 1, "zeroStage": 2, "globalBatchSize": 32,
                                               "microBatchSize": 16, "checkpointEvery": 0}}}
    edit_spec(workdir, change)
    bad = xwin_run(workdir, "--nproc-per-node", "0")
    assert bad.returncode == 2 and "--nproc-per-node: must be >= 1" in bad.stdout
    done = xwin_run(workdir, "--nproc-per-node", "2", env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcomes(done.stdout)["sft"] == "ran"
    log = (workdir / "xwin-logs/demo/tiny/tiny-sft-1.log").read_text()
    assert "xwin_jobs.launch --standalone --nproc-per-node 2 -m xwin_jobs sft" in log or \
        "DeepSpeed ZeRO-2 on 2 rank(s)" in log
    assert "rank 1 of 2" in log and "DeepSpeed ZeRO-2 on 2 rank(s)" in log
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(workdir / "xwin-runs/demo/tiny/sft/model")
