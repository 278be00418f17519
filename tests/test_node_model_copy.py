"""One model download per node (issue 23, item 1): the ranks of a node share one copy of the
stage's model in the scratch volume (XWIN_WORKDIR), and a restarted stage reuses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_scoring import reward_model  # noqa: F401  (the tiny reward model fixture)
from training_runs import TORCHRUN, job_env, make_world, run_command, stage_task

from xwin_jobs.model_cache import COPY_RECORD, node_model_copy, verified
from xwin_jobs.store import MARKER, Store

DOWNLOADING = re.compile(r"model (s3://\S+): downloading into")
REUSING = re.compile(r"model (s3://\S+): reusing this node's verified copy")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory)


@pytest.mark.slow
def test_two_gloo_ranks_share_one_download_and_a_restart_reuses_it(world, s3_server, s3_bucket, tmp_path):
    store = Store(s3_server.endpoint_url)
    base = f"{s3_bucket}/models/base/"
    store.upload_dir(world["base"], base)
    scratch = tmp_path / "scratch"
    task = stage_task(world, "sft", "node-copy", {"model": base, "data": f"file://{world['conversations']}"},
                      {"epochs": 1, "learningRate": 1e-3, "globalBatchSize": 4, "microBatchSize": 2,
                       "maxLength": 96, "zeroStage": 0, "checkpointEvery": 0, "maxSteps": 1,
                       "gradientCheckpointing": False})
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    env = {**job_env("cpu"), **s3_server.env, "XWIN_WORKDIR": str(scratch)}

    done = run_command([*TORCHRUN, "sft", "--task", str(task_file)], env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert DOWNLOADING.findall(done.stderr) == [base]  # one download for the two ranks
    assert REUSING.findall(done.stderr) == [base]      # the other rank read that copy
    (copy,) = [p for p in (scratch / "models").iterdir() if p.is_dir()]
    assert (copy / COPY_RECORD).exists() and (copy / "model.safetensors").exists()

    # the stage restarted in the same pod (its scratch volume kept): no download at all
    (Path(task.output[len("file://"):]) / MARKER).unlink()
    again = run_command([*TORCHRUN, "sft", "--task", str(task_file)], env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert DOWNLOADING.findall(again.stderr) == [] and REUSING.findall(again.stderr) == [base, base]


def test_an_incomplete_or_changed_copy_is_not_reused(world, s3_server, s3_bucket, tmp_path):
    store = Store(s3_server.endpoint_url)
    uri = f"{s3_bucket}/models/m/"
    store.upload_dir(world["base"], uri)
    first = node_model_copy(store, uri, "digest-1", root=tmp_path)
    remote = sorted(f[len(uri):] for f in store.list_files(uri))
    assert verified(tmp_path / first.split("/")[-1], remote)
    assert node_model_copy(store, uri, "digest-1", root=tmp_path) == first
    # a truncated file: downloaded again
    weights = tmp_path / first.split("/")[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not verified(weights.parent, remote)
    assert node_model_copy(store, uri, "digest-1", root=tmp_path) == first
    assert verified(weights.parent, remote)
    # another input digest (the model was retrained): a new copy, the old one deleted
    second = node_model_copy(store, uri, "digest-2", root=tmp_path)
    assert second != first and not weights.parent.exists()
    # local models are read in place
    assert node_model_copy(Store(), f"file://{world['base']}", "d", root=tmp_path) == str(world["base"])


def test_scratch_size_becomes_an_ephemeral_storage_request():
    from xwin_operator.api.spec_io import load_run, parse_run
    from xwin_operator.kube.plan_print import planned_manifests

    root = Path(__file__).resolve().parents[1]
    children = {(m["kind"], m["metadata"]["name"]): m for _, _, m in
                planned_manifests(load_run(root / "manifests/samples/xwin-7b.yaml"), "uid")}
    pod = children["PyTorchJob", "xwin-7b-sft-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["requests"]["ephemeral-storage"] == "120Gi"
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "120Gi"}} in pod["volumes"]
    server = children["Deployment", "xwin-7b-pairs-serve-1"]["spec"]["template"]["spec"]
    assert server["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    # a storage class: a generic ephemeral volume of that size, nothing asked of the node's disk
    text = (root / "manifests/samples/xwin-7b.yaml").read_text().replace(
        "scratch: 120Gi}", "scratch: 600Gi, scratchStorageClass: fast-nvme}")
    job = next(m for _, _, m in planned_manifests(parse_run(text), "uid") if m["kind"] == "PyTorchJob")
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "scratch"]
    claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "fast-nvme" and claim["resources"]["requests"]["storage"] == "600Gi"
    assert "ephemeral-storage" not in pod["containers"][0]["resources"].get("requests", {})


@pytest.mark.slow
def test_the_scoring_ranks_share_one_copy_of_the_reward_model(reward_model, s3_server, s3_bucket, tmp_path):
    """bestOfN's score step under torchrun (2 ranks, the reward model on moto): one download."""
    import json

    from test_scoring import sample_records, score_task

    from xwin_jobs.stages.best_of_n import sampling_digest
    from xwin_jobs.task import StageTask, upstream_digests

    store = Store(s3_server.endpoint_url)
    rm = f"{s3_bucket}/models/rm/"
    store.upload_dir(reward_model, rm)
    local = score_task(tmp_path, reward_model, n=2)
    task = StageTask(stage="bestOfN", output=local.output, inputs={**local.inputs, "rewardModel": rm},
                     params=local.params)
    samples = tmp_path / "bestOfN" / "samples"
    samples.mkdir(parents=True)
    (samples / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample_records(6, 2)))
    (samples / "_PROGRESS.json").write_text(json.dumps(
        {"digest": sampling_digest(task, upstream_digests(store, task)), "complete": True}))
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    env = {**job_env("cpu"), **s3_server.env, "XWIN_WORKDIR": str(tmp_path / "scratch")}
    done = run_command([*TORCHRUN, "score", "--task", str(task_file)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert DOWNLOADING.findall(done.stderr) == [rm] and REUSING.findall(done.stderr) == [rm]
    assert (tmp_path / "bestOfN" / MARKER).is_file()
