"""Training stages tokenize once (xwin_jobs.tokenized): Parquet and dataset-repo inputs train,
the examples land in `<stage>/tokenized/<key>/` as Arrow files, two gloo ranks tokenize once,
a second attempt (a restart, a changed learning rate, a sibling stage reading the same
records, a fresh node on an S3 store) reuses them, bad input stops the stage before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_inputs import README, write_parquet
from training_runs import TORCHRUN, TRAINING, job_env, make_world, run_command

from xwin_jobs.records import RecordError, read_records
from xwin_jobs.stages import run_stage
from xwin_jobs.store import MARKER, Store
from xwin_jobs.task import StageTask
from xwin_jobs.tokenized import MANIFEST

FAST = {**TRAINING, "epochs": 1, "checkpointEvery": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory)
    root = w["root"]
    conversations = read_records(Store(), w["conversations"], "conversation")
    pairs = read_records(Store(), w["pairs"], "pair")
    # a Parquet folder of the conversations, and a Hub-laid-out repo of them in TRL's format
    # (no ids) whose `prefs` config holds the pairs as plain strings
    half = len(conversations) // 2
    for n, part in enumerate((conversations[:half], conversations[half:])):
        write_parquet(root / "parquet" / f"part-{n}.parquet", part)
    repo = root / "hub" / "org" / "math"
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", [{"messages": c["messages"]} for c in conversations])
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", [{"messages": conversations[0]["messages"]}])
    write_parquet(repo / "prefs" / "train-00000-of-00001.parquet",
                  [{"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
                    "rejected": p["rejected"][0]["content"]} for p in pairs])
    (repo / "README.md").write_text(README)
    return {**w, "parquet": f"file://{root}/parquet/", "hub": root / "hub"}


@pytest.fixture
def hub(world, monkeypatch):
    monkeypatch.setenv("XWIN_HF_DATASETS_DIR", str(world["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return world


def task(world, stage: str, name: str, inputs: dict, training: dict | None = None, **params) -> StageTask:
    """A stage of run `t/<name>` laid out as the operator lays it out: <root>/t/<name>/<stage>/."""
    return StageTask(stage=stage, output=f"file://{world['root']}/runs/t/{name}/{stage}/",
                     inputs={"model": world["base"], **inputs},
                     params={"training": dict(training or FAST), **params}, run={"namespace": "t", "name": name})


def tokenized_folders(output: str) -> list[Path]:
    return sorted((Path(output[len("file://"):]) / "tokenized").iterdir())


def test_sft_from_parquet_tokenizes_once_and_a_later_attempt_reuses(world):
    first = task(world, "sft", "parquet", {"data": world["parquet"]})
    marker = run_stage(first, Store())
    assert marker["counts"]["examples"] == 14
    assert (marker["metrics"]["tokenizedReused"], marker["metrics"]["tokenizedRanks"]) == (False, 1)
    folder, = tokenized_folders(first.output)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["stats"]["examples"] == 14 and manifest["kind"] == "sft"
    assert list(folder.glob("*.arrow"))  # datasets' own files: load_from_disk reads them
    # another learning rate: another stage digest, the same examples
    again = task(world, "sft", "parquet", {"data": world["parquet"]}, {**FAST, "learningRate": 5e-4})
    marker2 = run_stage(again, Store())
    assert (marker2["metrics"]["tokenizedReused"], marker2["metrics"]["tokenizedRanks"]) == (True, 0)
    assert marker2["counts"] == marker["counts"] and tokenized_folders(again.output) == [folder]
    # another maxLength: other examples, tokenized again; the stale ones are deleted
    shorter = task(world, "sft", "parquet", {"data": world["parquet"]}, {**FAST, "maxLength": 64})
    assert run_stage(shorter, Store())["metrics"]["tokenizedReused"] is False
    assert len(tokenized_folders(shorter.output)) == 1 and tokenized_folders(shorter.output) != [folder]
    # the same records from JSON Lines train the same examples in the same order
    jsonl = run_stage(task(world, "sft", "jsonl", {"data": world["conversations"]}), Store())
    assert jsonl["metrics"]["trainLoss"] == pytest.approx(marker["metrics"]["trainLoss"], rel=1e-5)


def test_sft_and_reward_model_from_a_dataset_repo(hub):
    sft = run_stage(task(hub, "sft", "hub", {"data": "hf://datasets/org/math"}), Store())
    assert sft["counts"]["examples"] == 14 and sft["inputDigests"]["hf://datasets/org/math"].startswith("tree:")
    rm = run_stage(task(hub, "rewardModel", "hub", {"pairs": "hf://datasets/org/math/prefs:train"}), Store())
    assert rm["counts"]["examples"] == 10 and rm["metrics"]["heldOutPairs"] == 1
    # dpo of the same run on the same pairs with the same tokenizer: the reward model's examples
    dpo = run_stage(task(hub, "dpo", "hub", {"pairs": "hf://datasets/org/math/prefs:train"}, pairsFrom="pairs"),
                    Store())
    assert dpo["metrics"]["tokenizedReused"] is True and dpo["counts"]["examples"] == 10
    assert not (Path(hub["root"]) / "runs" / "t" / "hub" / "dpo" / "tokenized").exists()


def test_dpo_from_parquet_pairs(world):
    pairs = read_records(Store(), world["pairs"], "pair")
    path = write_parquet(world["root"] / "pairs.parquet", pairs)
    marker = run_stage(task(world, "dpo", "dpo-parquet", {"pairs": path}, pairsFrom="pairs"), Store())
    assert marker["counts"]["examples"] == 10 and marker["metrics"]["tokenizedReused"] is False


def test_a_parquet_file_without_the_column_stops_before_training(world, tmp_path):
    path = write_parquet(tmp_path / "chat.parquet", [{"conversation": "hi"}])
    bad = task(world, "sft", "bad", {"data": f"file://{path}"})
    with pytest.raises(RecordError, match=r"chat.parquet: no column 'messages' \(columns: conversation\)"):
        run_stage(bad, Store())
    out = Path(bad.output[len("file://"):])
    assert not (out / MARKER).exists() and not (out / "checkpoints").exists()


def test_two_ranks_tokenize_once_and_a_restart_reuses(world, tmp_path):
    t = task(world, "sft", "ranks", {"data": world["parquet"]})
    task_file = tmp_path / "task.json"
    task_file.write_text(t.to_json())
    env = {**job_env("cpu"), "XWIN_WORKDIR": str(tmp_path / "scratch")}
    runs = []
    for attempt in range(2):
        done = run_command([*TORCHRUN, "sft", "--task", str(task_file)], env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((json.loads((Path(t.output[len("file://"):]) / "metrics.json").read_text()), done.stderr))
        (Path(t.output[len("file://"):]) / MARKER).unlink()  # the next attempt runs again
    (first, log1), (second, log2) = runs
    assert (first["tokenizedRanks"], first["tokenizedReused"]) == (1, False)
    assert log1.count("tokenized 14 record(s)") == 1   # one rank tokenized, the other read its files
    assert (second["tokenizedRanks"], second["tokenizedReused"]) == (0, True)
    assert "tokenized 14 record(s)" not in log2
    assert second["trainLoss"] == pytest.approx(first["trainLoss"], rel=1e-6)


def test_on_s3_a_fresh_node_downloads_the_examples(world, s3_server, s3_bucket, monkeypatch, tmp_path):
    store = Store(endpoint_url=s3_server.endpoint_url)
    store.upload_dir(world["base"], f"{s3_bucket}/models/base/")
    store.upload_dir(Path(world["parquet"][len("file://"):]), f"{s3_bucket}/data/chat/")

    def attempt(node: str, lr: float):
        monkeypatch.setenv("XWIN_WORKDIR", str(tmp_path / node))
        t = StageTask(stage="sft", output=f"{s3_bucket}/runs/t/s3/sft/",
                      inputs={"model": f"{s3_bucket}/models/base/", "data": f"{s3_bucket}/data/chat/"},
                      params={"training": {**FAST, "learningRate": lr}}, run={"namespace": "t", "name": "s3"})
        return run_stage(t, store)

    first = attempt("node-a", 1e-3)
    names = {u.rsplit("/", 1)[-1] for u in store.list_files(f"{s3_bucket}/runs/t/s3/sft/tokenized/")}
    assert MANIFEST in names and any(n.endswith(".arrow") for n in names)
    second = attempt("node-b", 5e-4)  # a new pod on another node: its scratch volume is empty
    assert (first["metrics"]["tokenizedReused"], second["metrics"]["tokenizedReused"]) == (False, True)
    assert (tmp_path / "node-b" / "tokenized").is_dir()
