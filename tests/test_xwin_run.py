"""`xwin run` end to end on the tiny example: every training stage, models reloaded from the
store, re-runs that skip finished stages, and a crash that leaves finished work alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def xwin_run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xwin_operator.cli", "run", "run.yaml", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def outcomes(stdout: str) -> dict[str, str]:
    """stage -> ran | skipped | reused | failed, from the progress lines."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("ran", "skipped", "reused", "failed"):
            out[parts[1]] = parts[0]
    return out


def test_tiny_run_on_s3_then_rerun_is_a_noop(workdir, s3_server, s3_bucket):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from xwin_jobs.store import Store

    env = {**s3_server.env, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    first = xwin_run(workdir, "--store", f"{s3_bucket}/runs", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert outcomes(first.stdout) == {"pairs": "reused", "bestOfN": "reused",
                                      **{s: "ran" for s in TRAINED}}

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
    again = xwin_run(workdir, "--store", f"{s3_bucket}/runs", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert outcomes(again.stdout) == {"pairs": "reused", "bestOfN": "reused",
                                      **{s: "skipped" for s in TRAINED}}
    assert {u: store.read_bytes(u) for u in before} == before


def test_failed_stage_is_named_and_rerun_continues_from_it(workdir):
    scored = workdir / "scored.jsonl"
    good = (workdir / "examples/tiny/work/scored.jsonl").read_text().splitlines()
    bad = list(good)
    bad[4] = json.dumps({"id": "rs-x", "prompt": [{"role": "user", "content": "hi"}],
                         "responses": [{"content": "a", "score": "high"}]})
    scored.write_text("\n".join(bad) + "\n")
    spec = (workdir / "run.yaml").read_text().replace(
        "from: file://./examples/tiny/work/scored.jsonl", f"from: file://{scored}")
    (workdir / "run.yaml").write_text(spec)

    failed = xwin_run(workdir)
    assert failed.returncode != 0
    assert "stage 'rejectionSampling' failed" in failed.stdout
    assert f"{scored}:5" in failed.stdout and "responses.0.score" in failed.stdout
    res = outcomes(failed.stdout)
    assert res["sft"] == "ran" and res["rewardModel"] == "ran" and res["rejectionSampling"] == "failed"
    assert "dpo" not in res
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


def test_invalid_spec_and_missing_base_model(workdir):
    (workdir / "run.yaml").write_text((workdir / "run.yaml").read_text().replace("beta: 0.1", "beta: -1"))
    res = xwin_run(workdir)
    assert res.returncode == 1 and "run.yaml:" in res.stdout and "spec.stages.dpo.beta: must be > 0" in res.stdout

    shutil.copy(ROOT / "examples/tiny/run-training.yaml", workdir / "run.yaml")
    (workdir / "run.yaml").write_text((workdir / "run.yaml").read_text().replace(
        "file://./examples/tiny/work/base-model", "file://./nowhere/base-model"))
    res = xwin_run(workdir)
    assert res.returncode == 1
    assert "stage 'sft' failed" in res.stdout and "nowhere/base-model" in res.stdout
    assert not (workdir / "xwin-runs/demo/tiny/sft/_SUCCESS.json").exists()


def test_unreachable_s3_store_is_named(workdir, s3_server):
    from s3_server import closed_port

    endpoint = f"http://127.0.0.1:{closed_port()}"
    res = xwin_run(workdir, "--store", "s3://artifacts/runs",
                   env={**s3_server.env, "AWS_ENDPOINT_URL": endpoint})
    assert res.returncode == 1
    assert "stage 'sft' failed" in res.stdout
    assert f"cannot reach S3 endpoint {endpoint}" in res.stdout
