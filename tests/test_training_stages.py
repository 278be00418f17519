"""The four training stages on a tiny model and a few dozen synthetic records.

Runs stages the way a pod does (`python -m xwin_jobs <stage> --task FILE`) for the CLI
contract, and in-process (`run_stage`) for the rest, to keep the file fast.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_files import tiny_model_module, write_jsonl

from xwin_jobs.stages import StageError, run_stage
from xwin_jobs.store import MARKER, MissingInputError, Store, StoreError
from xwin_jobs.task import StageTask, upstream_digests

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"epochs": 2, "learningRate": 1e-3, "globalBatchSize": 8, "microBatchSize": 4,
            "maxLength": 96, "zeroStage": 0, "gradientCheckpointing": False, "seed": 7,
            "checkpointEvery": 3, "warmupRatio": 0.0, "weightDecay": 0.0,
            "lrScheduler": "linear", "maxSteps": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model and synthetic conversation / pair / scored records (addition)."""
    root = tmp_path_factory.mktemp("stages")
    rng = random.Random(0)
    conversations, pairs, scored = [], [], []
    for i in range(24):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = [{"role": "user", "content": f"what is {a} plus {b}?"}]
        answer = {"role": "assistant", "content": f"{a} plus {b} is {a + b}"}
        conversations.append({"id": f"c{i}", "messages": question + [answer, {"role": "user", "content": "thanks"},
                                                                       {"role": "assistant", "content": "glad to help"}]})
        pairs.append({"id": f"p{i}", "prompt": question, "chosen": [answer],
                      "rejected": [{"role": "assistant", "content": "no idea, sorry"}],
                      "chosen_score": 9.0, "rejected_score": 1.0, "judge": {"model": "exact"}})
        scored.append({"id": f"s{i}", "prompt": question,
                       "responses": [{"content": f"{a} plus {b} is {a + b + d}", "score": -abs(d)}
                                     for d in (2, 0, -1, 1)]})
    corpus = [m["content"] for c in conversations for m in c["messages"]] + [
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
        "no idea, sorry"]
    base = tiny_model_module().build_tiny_model(root / "base", corpus, seed=0)
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((base / "config.json").read_text())
    return {
        "root": root, "base": str(base), "no_weights": str(no_weights),
        "conversations": write_jsonl(root / "data" / "sft.jsonl", conversations),
        "pairs": write_jsonl(root / "data" / "pairs.jsonl", pairs),
        "scored": write_jsonl(root / "data" / "scored" / "part-00000.jsonl", scored),
    }


def make_task(world, stage, name, inputs, **params) -> StageTask:
    return StageTask(stage=stage, output=f"file://{world['root']}/runs/{name}/", inputs=inputs,
                     params={"training": dict(TRAINING), **params}, run={"namespace": "t", "name": name})


def output_dir(task: StageTask) -> Path:
    return Path(task.output[len("file://"):])


def run_cli(stage: str, task: StageTask, tmp_path: Path, env=None):
    task_file = tmp_path / f"task-{stage}.json"
    task_file.write_text(task.to_json())
    return subprocess.run([sys.executable, "-m", "xwin_jobs", stage, "--task", str(task_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_marker_written_last(out: Path) -> dict:
    marker = out / MARKER
    assert marker.is_file()
    others = [p for p in out.rglob("*") if p.is_file() and p != marker]
    assert others and max(p.stat().st_mtime_ns for p in others) <= marker.stat().st_mtime_ns
    return json.loads(marker.read_text())


def test_sft_through_the_cli_then_rerun_is_a_noop(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = make_task(world, "sft", "sft", {"model": world["base"], "data": world["conversations"]})
    first = run_cli("sft", task, tmp_path)
    assert first.returncode == 0, first.stderr
    out = output_dir(task)
    marker = assert_marker_written_last(out)
    assert marker["stage"] == "sft" and marker["digest"] == task.digest(upstream_digests(Store(), task))
    assert marker["inputDigests"][world["conversations"]].startswith("sha256:")   # the data, by content
    assert marker["counts"]["examples"] == 24
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == marker["metrics"]
    assert metrics["trainLoss"] < metrics["initialTrainLoss"]  # it learns
    # 24 examples / 8 per step * 2 epochs = 6 steps: checkpoints every 3 steps, not the last
    assert metrics["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert (out / "model" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(out / "model").eos_token == "</s>"
    # readable by the older transformers of a vLLM image too
    tokenizer_config = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "ASSISTANT:" in tokenizer_config["chat_template"]
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(world["base"]).config.vocab_size

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_cli("sft", task, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_model_folder_without_weights_fails_clearly_without_marker(world, tmp_path):
    task = make_task(world, "sft", "no-weights", {"model": world["no_weights"], "data": world["conversations"]})
    result = run_cli("sft", task, tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "no weights" in last and world["no_weights"] in last
    assert "Traceback" not in result.stderr
    assert not (output_dir(task) / MARKER).exists()


def test_cli_usage_errors_exit_2(world, tmp_path):
    task = make_task(world, "sft", "usage", {"model": world["base"], "data": world["conversations"]})
    unknown = run_cli("bestOfM", task, tmp_path)
    assert unknown.returncode == 2 and "unknown stage 'bestOfM'" in unknown.stderr
    bad = subprocess.run([sys.executable, "-m", "xwin_jobs", "sft", "--task", "{not json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "bad task" in bad.stderr
    mismatch = run_cli("dpo", task, tmp_path)
    assert mismatch.returncode == 2 and "for stage 'sft'" in mismatch.stderr


def test_sft_with_the_tokenizer_chat_template(world):
    task = make_task(world, "sft", "sft-tokenizer-template",
                     {"model": world["base"], "data": world["conversations"]})
    task.chat_template = "tokenizer"
    task.params["training"].update(maxSteps=2, checkpointEvery=0)
    marker = run_stage(task, Store())
    assert marker["metrics"]["steps"] == 2
    assert not (output_dir(task) / "checkpoints").exists()


def test_reward_model_reports_held_out_accuracy(world):
    from transformers import AutoModelForSequenceClassification

    task = make_task(world, "rewardModel", "rm", {"model": world["base"], "pairs": world["pairs"]},
                     heldOutFraction=0.25)
    task.params["training"].update(epochs=3)
    marker = run_stage(task, Store())
    out = output_dir(task)
    assert_marker_written_last(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert marker["counts"]["trainPairs"] == 18 and marker["counts"]["heldOutPairs"] == 6
    assert metrics["heldOutPairs"] == 6
    assert 0.0 <= metrics["heldOutAccuracy"] <= 1.0
    assert metrics["trainLoss"] < metrics["initialTrainLoss"]
    rm = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None


def test_rejection_sampling_trains_on_top_k(world):
    task = make_task(world, "rejectionSampling", "rs", {"model": world["base"], "scored": world["scored"]},
                     topK=2)
    marker = run_stage(task, Store())
    assert marker["counts"]["selected"] == 48  # 24 prompts x top 2
    assert marker["counts"]["examples"] == 48
    assert "trainLoss" in marker["metrics"]
    assert_marker_written_last(output_dir(task))


@pytest.mark.parametrize("source", ["bestOfN", "pairs"])
def test_dpo_from_scored_set_or_pairs(world, source):
    from transformers import AutoModelForCausalLM

    inputs = {"model": world["base"]}
    inputs.update({"scored": world["scored"]} if source == "bestOfN" else {"pairs": world["pairs"]})
    task = make_task(world, "dpo", f"dpo-{source}", inputs, beta=0.1, chosen="best",
                     rejected="worst", minMargin=0.0, pairsFrom=source)
    marker = run_stage(task, Store())
    metrics = marker["metrics"]
    # step 1: the policy is the reference, so the loss is exactly ln 2
    assert metrics["initialTrainLoss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["trainLoss"] < math.log(2)
    assert marker["counts"]["pairs"] == 24
    AutoModelForCausalLM.from_pretrained(output_dir(task) / "model")


@pytest.mark.parametrize("name,params,match", [
    # best scores 0, rank 2 scores -1: a gap of 1 < 1.5 drops every pair
    ("dpo-margin", {"rejected": "rank:2", "minMargin": 1.5}, "no DPO pairs"),
    ("dpo-floor", {"rejected": "worst", "rejectedFloor": 1.5}, "params.rejectedFloor: expected a quantile in"),
])
def test_dpo_without_pairs_or_with_a_bad_floor_writes_nothing(world, name, params, match):
    """minMargin dropping every pair from the scored set, a rejectedFloor out of range (named):
    the stage fails and writes no marker."""
    task = make_task(world, "dpo", name, {"model": world["base"], "scored": world["scored"]},
                     beta=0.1, chosen="best", pairsFrom="bestOfN", **params)
    with pytest.raises(StageError, match=match):
        run_stage(task, Store())
    assert not (output_dir(task) / MARKER).exists()


def test_dpo_rpo_alpha_keeps_the_chosen_answers_likelier_and_reports_their_nll(world):
    """The summary reports the chosen answers' per-token NLL; with rpoAlpha it ends lower than
    plain DPO's (the same pairs, seed and steps) and the loss starts above ln 2 by alpha x it."""
    runs = {}
    for alpha in (0.0, 1.0):
        params = dict(beta=0.1, pairsFrom="pairs", **({"rpoAlpha": alpha} if alpha else {}))
        task = make_task(world, "dpo", f"dpo-rpo-{alpha}", {"model": world["base"], "pairs": world["pairs"]},
                         **params)
        runs[alpha] = run_stage(task, Store())["metrics"]
    assert runs[1.0]["trainChosenNll"] < runs[0.0]["trainChosenNll"]
    assert runs[1.0]["initialTrainLoss"] > math.log(2) + 0.5   # ln 2 + NLL of the reference's answers


def test_dpo_negative_rpo_alpha_is_refused_by_name(world):
    task = make_task(world, "dpo", "dpo-rpo-bad", {"model": world["base"], "pairs": world["pairs"]},
                     beta=0.1, pairsFrom="pairs", rpoAlpha=-1)
    with pytest.raises(StageError, match="params.rpoAlpha: must be a number >= 0"):
        run_stage(task, Store())


def test_micro_batch_tokens_below_the_longest_example_is_refused_before_training(world):
    task = make_task(world, "dpo", "dpo-budget", {"model": world["base"], "pairs": world["pairs"]},
                     beta=0.1, pairsFrom="pairs")
    task.params["training"]["microBatchTokens"] = 16
    with pytest.raises(StageError, match=r"training\.microBatchTokens: 16 cannot hold one example"):
        run_stage(task, Store())
    assert not (output_dir(task) / "checkpoints").exists()
    assert not (output_dir(task) / MARKER).exists()


def test_token_budget_packs_without_padding_and_counts_truncation(world):
    task = make_task(world, "sft", "sft-budget", {"model": world["base"], "data": world["conversations"]})
    task.chat_template = "tokenizer"  # short: the first answer fits in maxLength, the second does not
    task.params["training"].update({"microBatchTokens": 128, "maxLength": 24, "epochs": 1})
    metrics = run_stage(task, Store())["metrics"]
    assert metrics["paddingEfficiency"] >= 0.9
    assert metrics["truncated"] > 0  # sequences cut at maxLength are trained on their first 24 tokens
    assert metrics["trainLoss"] < metrics["initialTrainLoss"] or metrics["steps"] == 3


def test_changed_params_retrain_and_missing_upstream_marker_fails(world):
    task = make_task(world, "sft", "rerun", {"model": world["base"], "data": world["conversations"]})
    task.params["training"].update(maxSteps=1, checkpointEvery=0)
    first = run_stage(task, Store())
    task.params["training"].update(maxSteps=2)
    second = run_stage(task, Store())
    assert second["digest"] != first["digest"] and second["metrics"]["steps"] == 2

    upstream = f"file://{world['root']}/runs/never-finished/"
    waiting = make_task(world, "rewardModel", "waits", {"model": world["base"], "pairs": world["pairs"]})
    waiting.markers = [upstream]
    with pytest.raises(MissingInputError, match="never-finished"):
        run_stage(waiting, Store())
    assert not output_dir(waiting).exists()


def test_hub_model_uri_goes_to_from_pretrained(world, tmp_path):
    # hf://org/name is handed to from_pretrained("org/name"); offline here, so it must fail
    # with a one-line message naming the model (run_cli sets HF_HUB_OFFLINE=1)
    task = make_task(world, "sft", "hub", {"model": "hf://some-org/some-model", "data": world["conversations"]})
    result = run_cli("sft", task, tmp_path)
    assert result.returncode == 1
    assert "some-org/some-model" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not (output_dir(task) / MARKER).exists()


def test_stage_reads_model_and_writes_outputs_on_s3(world, s3_server, s3_bucket):
    store = Store(endpoint_url=s3_server.endpoint_url)
    store.upload_dir(world["base"], f"{s3_bucket}/models/base/")
    task = StageTask(stage="sft", output=f"{s3_bucket}/runs/t/demo/sft/",
                     inputs={"model": f"{s3_bucket}/models/base/", "data": world["conversations"]},
                     params={"training": {**TRAINING, "maxSteps": 3, "checkpointEvery": 2}})
    run_stage(task, store)
    files = store.list_files(task.output)
    names = {f[len(task.output):] for f in files}
    assert {"model/model.safetensors", "model/config.json", "metrics.json", MARKER} <= names
    # the resumable checkpoint (keepCheckpoints 1 keeps it after the marker), marker last
    assert {"checkpoints/step-2/state/torch_state.pt", "checkpoints/step-2/rng/rank-0.pt",
            "checkpoints/step-2/trainer_state.json", "checkpoints/step-2/_CHECKPOINT.json"} <= names
    with pytest.raises(StoreError, match="no weights"):
        store.delete_prefix(f"{s3_bucket}/models/base/model.safetensors")
        run_stage(StageTask(stage="sft", output=f"{s3_bucket}/runs/t/demo/sft2/",
                            inputs={"model": f"{s3_bucket}/models/base/", "data": world["conversations"]},
                            params={"training": TRAINING}), store)


def test_a_second_dpo_with_another_beta_reuses_the_reference_logprobs(world, tmp_path):
    """Reference log-probabilities are a shared artifact of the store, keyed by the init model
    and the encoded pairs: a second run's DPO with another beta skips its reference pass and
    trains exactly as if it had computed them."""
    def task(root, name, beta):
        return StageTask(stage="dpo", output=f"file://{root}/t/{name}/dpo/",
                         inputs={"model": world["base"], "pairs": world["pairs"]},
                         params={"training": dict(TRAINING), "beta": beta, "pairsFrom": "pairs"},
                         run={"namespace": "t", "name": name})

    shared = tmp_path / "store"
    first = run_stage(task(shared, "a", 0.1), Store())["metrics"]
    second = run_stage(task(shared, "b", 0.3), Store())["metrics"]
    computed = run_stage(task(tmp_path / "other", "b", 0.3), Store())["metrics"]
    assert (first["referenceReused"], second["referenceReused"], computed["referenceReused"]) == (False, True, False)
    assert second["trainLoss"] == computed["trainLoss"]
    assert second["initialTrainLoss"] == computed["initialTrainLoss"]
    assert [p.name for p in (shared / "_cache/reference-logprobs").iterdir()] == [
        json.loads(next((shared / "_cache/reference-logprobs").rglob("_REFERENCE.json")).read_text())["key"]]


def test_a_stage_that_sets_no_budget_packs_under_the_derived_one_and_logs_its_micro_batches(world, caplog):
    """Fast by default (issue 27): without microBatchTokens, micro-batches take as many
    length-grouped examples as fit microBatchSize x maxLength positions (what a padded
    micro-batch could feed at most), so a step makes fewer forward passes than with
    micro-batches of microBatchSize examples (microBatchTokens: 0), at the same loss up to
    float rounding; the log says what the micro-batches really are."""
    import logging

    runs = {}
    for name, budget in (("sft-derived", None), ("sft-padded", 0)):
        task = make_task(world, "sft", name, {"model": world["base"], "data": world["conversations"]})
        task.chat_template = "tokenizer"
        task.params["training"].update({"maxLength": 256, "epochs": 1, "globalBatchSize": 4,
                                        "microBatchSize": 2, "microBatchTokens": budget})
        with caplog.at_level(logging.INFO, logger="xwin_jobs"):
            caplog.clear()
            runs[name] = run_stage(task, Store())["metrics"], caplog.text
    (derived, log), (padded, padded_log) = runs["sft-derived"], runs["sft-padded"]
    # 24 conversations of equal length: 4 a step fit 2 x 256 positions in one pass
    assert "micro-batches of up to 512 positions: 1.0 a step (1-1), 4.0 examples each, padding efficiency" in log, log
    assert "micro-batches of 2 examples: 2.0 a step (2-2), 2.0 examples each" in padded_log, padded_log
    assert derived["trainTokens"] == padded["trainTokens"]
    assert derived["trainLoss"] == pytest.approx(padded["trainLoss"], rel=1e-4)
