"""Inputs known by their content: fingerprints, the jobs and the planner agreeing on them, and
`xwin run` rerunning what an in-place edit changed (and nothing else).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kube.fixtures import cluster, kubelet_factory, operator_factory  # noqa: F401
from xwin_jobs import fingerprint as fp
from xwin_jobs.fingerprint import MISSING, Fingerprints, fingerprint
from xwin_jobs.store import Store
from xwin_jobs.task import StageTask, upstream_digests


def test_a_file_is_known_by_its_bytes_a_large_one_by_size_and_mtime(tmp_path, monkeypatch):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"id": "a"}\n')
    store, uri = Store(), f"file://{data}"
    first = fingerprint(store, uri)
    assert first.startswith("sha256:") and fingerprint(store, uri) == first
    data.write_text('{"id": "b"}\n')                      # same size, other bytes
    assert fingerprint(store, uri) != first
    monkeypatch.setattr(fp, "SMALL_FILE", 4)
    st = data.stat()
    assert fingerprint(store, uri) == f"stat:{st.st_size}:{st.st_mtime_ns}"
    assert fingerprint(store, f"file://{tmp_path}/gone.jsonl") == MISSING
    assert fingerprint(store, "hf://org/model@abc123") == "hf:org/model@abc123"


def test_a_folder_is_known_by_its_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    store = Store()
    before = fingerprint(store, f"file://{model}/")
    assert before.startswith("tree:")
    (model / "config.json").write_text('{"a": 1}')
    assert fingerprint(store, f"file://{model}/") != before


def test_s3_objects_by_etag_and_folders_by_their_listing(s3_server, s3_bucket):
    store = Store(endpoint_url=s3_server.endpoint_url)
    store.write_text(f"{s3_bucket}/data/sft.jsonl", '{"id": "a"}\n')
    store.write_text(f"{s3_bucket}/model/config.json", "{}")
    one = fingerprint(store, f"{s3_bucket}/data/sft.jsonl")
    folder = fingerprint(store, f"{s3_bucket}/model/")
    assert one.startswith("etag:") and folder.startswith("tree:")
    store.write_text(f"{s3_bucket}/data/sft.jsonl", '{"id": "b"}\n')   # overwritten in place
    store.write_text(f"{s3_bucket}/model/config.json", '{"a": 1}')
    assert fingerprint(store, f"{s3_bucket}/data/sft.jsonl") != one
    assert fingerprint(store, f"{s3_bucket}/model/") != folder
    assert fingerprint(store, f"{s3_bucket}/data/none.jsonl") == MISSING


def test_a_files_hash_is_kept_while_its_size_and_mtime_stay_and_answers_live_for_the_ttl(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("x\n")
    clock = [0.0]
    prints = Fingerprints(ttl=30, clock=lambda: clock[0])
    store = Store()
    first = prints.of(store, f"file://{data}")
    data.write_text("y\n")
    assert prints.of(store, f"file://{data}") == first      # within the TTL: not looked at
    clock[0] = 31
    assert prints.of(store, f"file://{data}") != first


def test_the_jobs_and_the_planner_compute_the_same_digest(tmp_path, s3_server, s3_bucket):
    """`upstream_digests` (what a job records) and the planner's `inputs_now` (what it observes)
    agree, for file:// and s3:// inputs; an edit moves both."""
    from plan_walk import T0
    from xwin_operator.api.spec_io import parse_run
    from xwin_operator.core.config import OperatorConfig
    from xwin_operator.core.planner import stage_tasks
    from xwin_operator.core.stage_plan import inputs_now
    from xwin_operator.core.types import Observed

    store = Store(endpoint_url=s3_server.endpoint_url)
    local = tmp_path / "sft.jsonl"
    local.write_text('{"id": "a"}\n')
    store.write_text(f"{s3_bucket}/base/config.json", "{}")
    run = parse_run(f"""
apiVersion: xwin.ai/v1alpha1
kind: AlignmentRun
metadata: {{name: fp, namespace: t}}
spec:
  baseModel: {s3_bucket}/base/
  storage: {{uri: {s3_bucket}/runs}}
  stages:
    sft: {{data: "file://{local}"}}
""")
    config = OperatorConfig()
    task = stage_tasks(run, config)["sft"]
    job = upstream_digests(store, task)
    assert set(job) == {f"{s3_bucket}/base/", f"file://{local}"}
    observed = Observed(children=[], markers={}, now=T0,
                        fingerprints={u: fingerprint(store, u) for u in job})
    marker = {"digest": task.digest(job), "inputDigests": job}
    planner, changed = inputs_now(run, task, observed, marker, config)
    assert planner == job and task.digest(planner) == marker["digest"] and changed == {}

    local.write_text('{"id": "b"}\n')
    observed.fingerprints[f"file://{local}"] = fingerprint(store, f"file://{local}")
    planner, changed = inputs_now(run, task, observed, marker, config)
    assert task.digest(planner) != marker["digest"] == task.digest(job)
    assert list(changed) == ["data"] and changed["data"][0] == job[f"file://{local}"]
    assert task.digest(planner) == task.digest(upstream_digests(store, task))   # the job agrees again

    local.unlink()   # deleted after the stage ran: the stage stays done
    observed.fingerprints[f"file://{local}"] = MISSING
    planner, changed = inputs_now(run, task, observed, marker, config)
    assert task.digest(planner) == marker["digest"] and changed == {}


# --- `xwin run`: an in-place edit reruns its stage and what reads it, nothing else -----------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_in_place_edit_reruns_its_stage_and_downstream_and_dry_run_says_why(tmp_path):
    from test_xwin_run import ROOT, outcomes

    sys.path.insert(0, str(ROOT / "examples/tiny"))
    try:
        from make_task import make_task
    finally:
        sys.path.pop(0)
    make_task(tmp_path / "examples/tiny/work", seed=0)
    spec = (ROOT / "examples/tiny/run-training.yaml").read_text()
    (tmp_path / "run.yaml").write_text(spec.split("    bestOfN:")[0]     # sft, pairs (from:), rewardModel
                                       .replace("maxSteps: 64", "maxSteps: 8"))

    def xwin(*args):
        return subprocess.run([sys.executable, "-m", "xwin_operator.cli", "run", "run.yaml", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    first = xwin()
    assert first.returncode == 0, first.stdout + first.stderr
    assert outcomes(first.stdout) == {"sft": "ran", "pairs": "reused", "rewardModel": "ran"}
    again = xwin("--dry-run")
    assert "sft: skip: done for the same inputs" in again.stdout
    assert "rewardModel: skip: done for the same inputs" in again.stdout

    pairs = tmp_path / "examples/tiny/work/pairs.jsonl"
    lines = pairs.read_text().splitlines(keepends=True)
    before = fingerprint(Store(), f"file://{pairs}")
    time.sleep(0.01)
    pairs.write_text("".join(lines[:-1]))            # one pair fewer, edited in place
    after = fingerprint(Store(), f"file://{pairs}")
    dry = xwin("--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "sft: skip: done for the same inputs" in dry.stdout
    assert (f"rewardModel: run: pairs changed ({before[:15]} -> {after[:15]})") in dry.stdout

    third = xwin()
    assert third.returncode == 0, third.stdout + third.stderr
    assert outcomes(third.stdout) == {"sft": "skipped", "pairs": "reused", "rewardModel": "ran"}
    marker = json.loads((tmp_path / "xwin-runs/demo/tiny/rewardModel/_SUCCESS.json").read_text())
    assert marker["inputDigests"]["file://./examples/tiny/work/pairs.jsonl"] == after   # recorded
    assert outcomes(xwin().stdout) == {"sft": "skipped", "pairs": "reused", "rewardModel": "skipped"}


# --- the operator: an overwritten S3 object reruns the stage that reads it -----------------------


def test_the_operator_reruns_only_the_stage_whose_s3_input_was_overwritten(
        cluster, kubelet_factory, operator_factory, s3_server, s3_bucket):  # noqa: F811
    """The run is made twice under one name (so over the same artifacts): the second time,
    after `pairs.jsonl` was overwritten on S3, only rewardModel (which reads it) runs again."""
    from kube.fixtures import NS, create_run, tiny_run
    from kube.harness import RUNS, complete_with_marker, created_names, wait_phase
    from test_operator_e2e import s3_secret, storage

    store = Store(endpoint_url=s3_server.endpoint_url)
    pairs = f"{s3_bucket}/data/pairs.jsonl"
    store.write_text(pairs, '{"id": "p0"}\n')
    s3_secret(cluster, s3_server.env)
    kubelet_factory(instant=complete_with_marker())
    op = operator_factory(env=s3_server.env)
    run = tiny_run(storage=storage(s3_server, s3_bucket))
    run["spec"]["stages"]["pairs"] = {"from": pairs}

    create_run(cluster, run)
    wait_phase(cluster, NS, "tiny", timeout=60, operator=op)
    jobs = sorted(n for r, n in created_names(cluster, NS) if r == "pytorchjobs")
    assert jobs == ["tiny-dpo-1", "tiny-rejectionsampling-1", "tiny-rewardmodel-1", "tiny-sft-1"]

    store.write_text(pairs, '{"id": "p0"}\n{"id": "p1"}\n')   # overwritten in place
    cluster.delete(RUNS, NS, "tiny")
    cluster.wait_for(lambda: cluster.get(RUNS, NS, "tiny") is None, timeout=10, what="the run deleted")
    create_run(cluster, run)
    status = wait_phase(cluster, NS, "tiny", timeout=60, operator=op)
    again = [n for r, n in created_names(cluster, NS) if r == "pytorchjobs"]
    assert sorted(again) == sorted(jobs + ["tiny-rewardmodel-1"])   # rewardModel alone, once more
    assert next(s for s in status["stages"] if s["name"] == "rewardModel")["phase"] == "Succeeded"
