"""Reward-model scoring (length-grouped batches) and the bestOfN score step, on a tiny
random reward model built offline."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_files import tiny_model_module

from xwin_jobs.scoring import (RewardScorer, encode_items, fixed_batches, length_grouped_batches,
                               score_token_ids)
from xwin_jobs.stages import StageError, run_stage, upstream_digests
from xwin_jobs.stages.best_of_n import sampling_digest
from xwin_jobs.store import MARKER, Store
from xwin_jobs.task import StageTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A tiny Llama with a scalar head (num_labels=1), as the rewardModel stage saves it."""
    from xwin_jobs.modeling import load_reward_model, load_tokenizer, save_model

    module = tiny_model_module()
    root = tmp_path_factory.mktemp("rm")
    corpus = ["USER: what is 2 plus 3? ASSISTANT: 2 plus 3 is 5", "no idea, sorry", "hello there"]
    base = module.build_tiny_model(root / "base", corpus, seed=0)
    tokenizer = load_tokenizer(str(base))
    import torch

    torch.manual_seed(0)
    model = load_reward_model(str(base), tokenizer.pad_token_id)
    return save_model(model, tokenizer, root / "rm")


def items(count: int, seed: int = 0) -> list[tuple[list[dict], str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = [{"role": "user", "content": f"what is {i} plus {rng.randint(0, 9)}?"}]
        out.append((prompt, " ".join(rng.choice(["2", "plus", "3", "is", "5", "no", "idea"])
                                     for _ in range(rng.randint(1, 60)))))
    return out


# ------------------------------------------------------------------ pure batching


def test_length_grouped_batches_cover_everything_within_the_budget():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    batches = length_grouped_batches(lengths, token_budget=1024)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1024
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert length_grouped_batches([5000, 3], token_budget=100) == [[0], [1]]  # oversize: alone
    assert length_grouped_batches([4, 4, 4], token_budget=100, max_rows=2) == [[0, 1], [2]]
    assert fixed_batches(5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        length_grouped_batches([1], token_budget=0)


# ------------------------------------------------------------------ the model


def test_tokens_are_those_of_encode_conversation(reward_model):
    from xwin_jobs.chat import encode_conversation
    from xwin_jobs.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(reward_model))
    batch = items(6)
    for template in ("vicuna", "tokenizer"):
        ids, truncated = encode_items(batch, template, tokenizer, max_length=None)
        assert truncated == 0
        for (prompt, response), row in zip(batch, ids):
            messages = [*prompt, {"role": "assistant", "content": response}]
            assert row == encode_conversation(messages, template, tokenizer).input_ids
    ids, truncated = encode_items(batch, "vicuna", tokenizer, max_length=8)
    assert truncated == 6 and all(len(r) == 8 for r in ids)


def test_a_score_does_not_depend_on_its_batch(reward_model):
    scorer = RewardScorer(str(reward_model), "vicuna", token_budget=2048)
    batch = items(40)
    grouped, stats = scorer.score(batch)
    fixed, _ = scorer.score(batch, grouped=False, batch_size=7)
    alone = [scorer.score([item])[0][0] for item in batch]
    np.testing.assert_allclose(grouped, alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(fixed, alone, atol=1e-4, rtol=0)
    assert stats.scored == 40 and stats.batches > 1 and len(set(np.round(grouped, 6))) > 30
    # grouping by length wastes less padding than file order
    _, fixed_stats = scorer.score(batch, grouped=False, batch_size=16)
    assert stats.padded_tokens < fixed_stats.padded_tokens


def test_empty_responses_and_nan_scores_are_none_and_counted(reward_model):
    import torch

    scorer = RewardScorer(str(reward_model), "vicuna")
    batch = items(4) + [([{"role": "user", "content": "hi"}], "   ")]
    scores, stats = scorer.score(batch)
    assert scores[4] is None and all(isinstance(s, float) for s in scores[:4])
    assert (stats.empty, stats.scored, stats.nan) == (1, 4, 0)
    with torch.no_grad():
        scorer.model.score.weight.fill_(float("nan"))
    scores, stats = scorer.score(batch)
    assert scores == [None] * 5 and (stats.nan, stats.empty, stats.scored) == (4, 1, 0)


def test_score_token_ids_restores_input_order(reward_model):
    scorer = RewardScorer(str(reward_model), "vicuna")
    seqs, _ = encode_items(items(9), "vicuna", scorer.tokenizer, None)
    forward = score_token_ids(scorer.model, seqs, scorer.pad_id, [list(range(9))])
    shuffled = score_token_ids(scorer.model, seqs, scorer.pad_id, [[8, 1], [0, 5, 3], [2, 4, 6, 7]])
    np.testing.assert_allclose(forward, shuffled, atol=1e-4)


# ------------------------------------------------------------------ the score step


def write_samples(out: Path, task: StageTask, records: list[dict], complete: bool = True) -> None:
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (samples / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    digest = sampling_digest(task, upstream_digests(Store(), task))
    (samples / "_PROGRESS.json").write_text(json.dumps({"digest": digest, "complete": complete}))


def score_task(tmp_path: Path, reward_model: Path, n: int) -> StageTask:
    return StageTask(stage="bestOfN", output=f"file://{tmp_path}/bestOfN/",
                     inputs={"policy": f"file://{reward_model}", "rewardModel": f"file://{reward_model}",
                             "prompts": f"file://{tmp_path}/prompts.jsonl"},
                     params={"n": n, "sampling": {"maxTokens": 8}, "serving": {}})


def sample_records(count: int, n: int) -> list[dict]:
    rows = []
    for i, (prompt, _) in enumerate(items(count)):
        responses = [{"content": text, "finish_reason": "stop"}
                     for _, text in items(n, seed=100 + i)]
        rows.append({"id": f"p{i}", "prompt": prompt, "responses": responses})
    if count > 2:
        rows[1]["responses"][-1]["content"] = ""
        rows[2]["responses"][0]["finish_reason"] = "length"
    return rows


def read_data(out: Path) -> list[dict]:
    rows = []
    for shard in sorted((out / "data").glob("part-*.jsonl")):
        rows += [json.loads(line) for line in shard.read_text().splitlines()]
    return rows


def test_score_step_writes_the_scored_set_metrics_and_marker_last(reward_model, tmp_path):
    task = score_task(tmp_path, reward_model, n=4)
    out = tmp_path / "bestOfN"
    write_samples(out, task, sample_records(6, 4))
    marker = run_stage(task, Store())
    rows = read_data(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(6)]
    assert all(len(r["responses"]) == 4 for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["p1"]["responses"][-1]["score"] is None
    assert all(isinstance(x["score"], float) for r in rows for x in r["responses"] if x["content"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["emptyResponses"] == 1 and metrics["nanScores"] == 0
    assert metrics["responsesPerPrompt"] == 4 and metrics["prompts"] == 6
    assert metrics["truncatedResponses"] == 1
    assert metrics["meanMinScore"] <= metrics["meanScore"] <= metrics["meanMaxScore"]
    assert marker["metrics"] == metrics
    others = [p for p in out.rglob("*") if p.is_file() and p.name != MARKER]
    assert max(p.stat().st_mtime_ns for p in others) <= (out / MARKER).stat().st_mtime_ns

    # records are valid scored-set records that selection reads
    from xwin_jobs.selection import rejection_sampling_records

    chosen, summary = rejection_sampling_records(rows, 1)
    assert len(chosen) == 6 and summary["invalidResponses"] == 1


def test_score_step_resumes_and_scores_only_what_is_missing(reward_model, tmp_path, monkeypatch):
    monkeypatch.setattr("xwin_jobs.stages.best_of_n.SCORE_CHUNK_RESPONSES", 8)  # 2 prompts a shard
    task = score_task(tmp_path, reward_model, n=4)
    out = tmp_path / "bestOfN"
    write_samples(out, task, sample_records(6, 4))
    run_stage(task, Store())
    first = {r["id"]: r for r in read_data(out)}
    shards = sorted((out / "data").glob("part-*.jsonl"))
    assert len(shards) == 3
    shards[-1].unlink()                    # as if killed before the last chunk was written
    (out / MARKER).unlink()
    run_stage(task, Store())
    rows = read_data(out)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(first) and len(ids) == len(set(ids))
    for r in rows:
        got = [x["score"] for x in r["responses"]]
        want = [x["score"] for x in first[r["id"]]["responses"]]
        assert all((a is None and b is None) or math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got, want))


def test_score_step_without_samples_or_server_fails_clearly(reward_model, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    task = score_task(tmp_path, reward_model, n=4)
    with pytest.raises(StageError, match="samples are missing; run the bestOfN-sample step"):
        run_stage(task, Store())
    write_samples(tmp_path / "bestOfN", task, sample_records(2, 4), complete=False)
    with pytest.raises(StageError, match="samples are incomplete"):
        run_stage(task, Store())
    assert not (tmp_path / "bestOfN" / MARKER).exists()


def test_samples_with_the_wrong_count_are_an_error(reward_model, tmp_path):
    task = score_task(tmp_path, reward_model, n=5)
    write_samples(tmp_path / "bestOfN", task, sample_records(2, 4))
    with pytest.raises(StageError, match="prompt 'p0' has 4 responses, expected n=5"):
        run_stage(task, Store())


def test_score_step_through_the_cli(reward_model, tmp_path):
    task = score_task(tmp_path, reward_model, n=2)
    write_samples(tmp_path / "bestOfN", task, sample_records(3, 2))
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    for job in ("bestOfN-score", "score"):
        proc = subprocess.run([sys.executable, "-m", "xwin_jobs", job, "--task", str(task_file)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
    assert "already done" in proc.stderr
    assert (tmp_path / "bestOfN" / MARKER).is_file()


def test_score_step_reads_and_writes_s3(reward_model, s3_server, s3_bucket, tmp_path):
    """Samples, reward model and scored set all in an S3 bucket (moto over HTTP)."""
    store = Store(endpoint_url=s3_server.endpoint_url)
    store.upload_dir(reward_model, f"{s3_bucket}/models/rm/")
    local = score_task(tmp_path, reward_model, n=2)
    task = StageTask(stage="bestOfN", output=f"{s3_bucket}/runs/bestOfN/",
                     inputs={**local.inputs, "rewardModel": f"{s3_bucket}/models/rm/"},
                     params=local.params)
    digest = sampling_digest(task, upstream_digests(store, task))
    rows = sample_records(3, 2)
    store.write_bytes(f"{s3_bucket}/runs/bestOfN/samples/part-00000.jsonl",
                      "".join(json.dumps(r) + "\n" for r in rows).encode())
    store.write_json(f"{s3_bucket}/runs/bestOfN/samples/_PROGRESS.json",
                     {"digest": digest, "complete": True})
    marker = run_stage(task, store)
    assert marker["metrics"]["prompts"] == 3 and marker["counts"]["shards"] == 1
    from xwin_jobs.records import read_records

    scored = read_records(store, f"{s3_bucket}/runs/bestOfN/data/", "scored")
    assert [r["id"] for r in scored] == ["p0", "p1", "p2"]


@pytest.mark.slow
def test_score_step_under_torchrun_splits_the_work_across_ranks(reward_model, tmp_path):
    task = score_task(tmp_path, reward_model, n=2)
    out = tmp_path / "bestOfN"
    write_samples(out, task, sample_records(7, 2))
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "xwin_jobs", "score",
                             "--task", str(task_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:  # never leave ranks behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    rows = read_data(out)                         # every shard: part-* and part-r001-*
    ids = [r["id"] for r in rows]
    assert sorted(ids) == [f"p{i}" for i in range(7)] and len(set(ids)) == 7
    assert {p.name.split("-0")[0] for p in (out / "data").glob("*.jsonl")} == {"part-r000", "part-r001"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 7 and (out / MARKER).is_file()
