"""Helpers for the judge tests: the loopback judge server, tasks over synthetic candidates and
eval answers, and running a stage step as its own process (as a pod does).

Import the fixtures into a test module with `from judge_fixtures import judge_server, ...`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "examples", ROOT / "examples" / "tiny"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import synthetic  # noqa: E402
from judge_server import JudgeServer, ServerConfig, comparison_key  # noqa: E402,F401

from xwin_jobs.judge.cache import judgment_key  # noqa: E402
from xwin_jobs.judge.core import JudgeRequest  # noqa: E402
from xwin_jobs.judge.templates import PAIRWISE, SINGLE, pairwise_messages, single_messages  # noqa: E402
from xwin_jobs.records import write_records  # noqa: E402
from xwin_jobs.store import Store  # noqa: E402
from xwin_jobs.task import StageTask  # noqa: E402

FAKE_KEY = "sk-xwin-FAKE-test-key-0123456789abcdefDONOTLEAK"
JUDGE_MODEL = "gpt-4-0613"


@pytest.fixture
def judge_server():
    server = JudgeServer(ServerConfig(api_key=FAKE_KEY)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def judge_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return FAKE_KEY


def prompt_and_answers(rng: random.Random, idx: int) -> tuple[dict, str, callable]:
    """A prompt record (every third one multi-turn), its right answer, a wrong-answer maker."""
    if idx % 3 == 2:
        conv = synthetic.conversation(rng, idx, multi_turn=True)
        messages = conv["messages"][:3]
        right = conv["messages"][3]["content"]
    else:
        messages = synthetic.prompt(rng, idx, "pp")["messages"]
        right = synthetic.right_answer(messages)
    return {"id": f"pp-{idx}", "messages": messages}, right, lambda: synthetic.wrong_answer(rng, messages)


def candidate_records(n_prompts: int, k: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        prompt, right, wrong = prompt_and_answers(rng, i)
        texts = [right if rng.random() < 0.4 else wrong() for _ in range(k)]
        out.append({"id": prompt["id"], "prompt": prompt["messages"],
                    "responses": [{"content": t, "finish_reason": "stop"} for t in texts]})
    return out


def pairs_task(root: Path, base_url: str, *, k: int = 4, disagreement: str = "drop",
               **judge: Any) -> StageTask:
    return StageTask(stage="pairs", output=f"file://{root}/pairs/",
                     inputs={"policy": f"file://{root}/no-policy/", "prompts": f"file://{root}/no-prompts.jsonl"},
                     params={"candidatesPerPrompt": k, "disagreement": disagreement,
                             "sampling": {"temperature": 1.0}, "serving": {},
                             "judge": {"model": JUDGE_MODEL, "baseURL": base_url, "maxConcurrency": 8,
                                       "backoffBaseSeconds": 0.02, "pollIntervalSeconds": 0.05, **judge}})


def write_candidates(task: StageTask, records: list[dict[str, Any]]) -> None:
    from xwin_jobs.stages.pairs import CANDIDATES, candidates_digest
    from xwin_jobs.task import upstream_digests

    store = Store()
    folder = task.output + CANDIDATES
    write_records(store, folder, records)
    store.write_json(folder + "_PROGRESS.json", {"digest": candidates_digest(task, upstream_digests(store, task)),
                                                 "complete": True})


def eval_task(root: Path, base_url: str, models: dict[str, float], n_alpaca: int = 8,
              n_mt: int = 4, seed: int = 1, **judge: Any) -> StageTask:
    """An evaluate task whose models' answers are already sampled: model `name` answers right
    with probability `models[name]`; alpaca references alternate right and wrong."""
    from xwin_jobs.stages.evaluate import answers_folder, part_digest
    from xwin_jobs.task import upstream_digests
    from xwin_jobs.stages.pairs import PROGRESS

    rng = random.Random(seed)
    store = Store()
    alpaca = [synthetic.prompt(rng, i, "alpaca") for i in range(n_alpaca)]
    refs = [{"id": p["id"], "prompt": p["messages"],
             "output": synthetic.right_answer(p["messages"]) if i % 2 == 0 else synthetic.wrong_answer(rng, p["messages"])}
            for i, p in enumerate(alpaca)]
    mt = []
    for i in range(n_mt):
        c = synthetic.conversation(rng, i, multi_turn=True)
        mt.append({"id": f"mt-{i}", "turns": [c["messages"][0]["content"], c["messages"][2]["content"]],
                   "_answers": [c["messages"][1]["content"], c["messages"][3]["content"]]})
    data = root / "eval-data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "alpaca.jsonl").write_text("".join(json.dumps(p) + "\n" for p in alpaca))
    (data / "alpaca-ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    (data / "mt-bench.jsonl").write_text("".join(json.dumps({"id": q["id"], "turns": q["turns"]}) + "\n" for q in mt))
    task = StageTask(stage="evaluate", output=f"file://{root}/evaluate/",
                     inputs={**{f"model:{m}": f"file://{root}/models/{m}/" for m in models},
                             "alpacaPrompts": f"file://{data}/alpaca.jsonl",
                             "alpacaReference": f"file://{data}/alpaca-ref.jsonl",
                             "mtBenchQuestions": f"file://{data}/mt-bench.jsonl"},
                     params={"models": list(models), "sampling": {}, "serving": {},
                             "judge": {"model": JUDGE_MODEL, "baseURL": base_url, "maxConcurrency": 8,
                                       "backoffBaseSeconds": 0.02, "pollIntervalSeconds": 0.05, **judge}})
    upstream = upstream_digests(store, task)   # the inputs' fingerprints, as the judge step sees them
    for name, p_right in models.items():
        mrng = random.Random(sum(map(ord, name)))

        def answer(messages, right):
            return right if mrng.random() < p_right else synthetic.wrong_answer(mrng, messages)

        def put(part, records):
            folder = answers_folder(task, name, part)
            write_records(store, folder, records)
            store.write_json(folder + PROGRESS, {"digest": part_digest(task, name, part, upstream), "complete": True})

        put("alpaca", [{"id": p["id"], "prompt": p["messages"],
                        "responses": [{"content": answer(p["messages"], synthetic.right_answer(p["messages"]))}]}
                       for p in alpaca])
        t1 = {q["id"]: answer([{"role": "user", "content": q["turns"][0]}], q["_answers"][0]) for q in mt}
        put("mtbench-1", [{"id": q["id"], "prompt": [{"role": "user", "content": q["turns"][0]}],
                           "responses": [{"content": t1[q["id"]]}]} for q in mt])
        put("mtbench-2", [{"id": q["id"], "prompt": [{"role": "user", "content": q["turns"][0]},
                                                     {"role": "assistant", "content": t1[q["id"]]},
                                                     {"role": "user", "content": q["turns"][1]}],
                           "responses": [{"content": answer([{"role": "user", "content": q["turns"][0]},
                                                             {"role": "user", "content": q["turns"][1]}],
                                                            q["_answers"][1])}]} for q in mt])
    return task


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(PYTHONUNBUFFERED="1", OPENAI_API_KEY=FAKE_KEY)
    env.update(extra or {})
    return env


def step_command(step: str, task_file: Path, log_level: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "xwin_jobs", step, "--task", str(task_file), "--log-level", log_level]


def run_step(step: str, task: StageTask, root: Path, env: dict[str, str] | None = None,
             log_level: str = "INFO", timeout: float = 120) -> subprocess.CompletedProcess:
    task_file = root / f"{step}.task.json"
    task_file.write_text(task.to_json())
    return subprocess.run(step_command(step, task_file, log_level), env=env or job_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def pairwise_requests(n: int, seed: int = 0, model: str = JUDGE_MODEL) -> list[JudgeRequest]:
    """n distinct pairwise judge requests about synthetic sums (right vs wrong answers)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = synthetic.prompt(rng, i, "q")
        a, b = synthetic.right_answer(p["messages"]), f"It is {1000 + i}."
        if rng.random() < 0.5:
            a, b = b, a
        m = pairwise_messages(p["messages"], a, b)
        out.append(JudgeRequest(judgment_key(model, PAIRWISE.version, m), PAIRWISE, m))
    return out


def single_request(conversation: list[dict], model: str = JUDGE_MODEL) -> JudgeRequest:
    m = single_messages(conversation)
    return JudgeRequest(judgment_key(model, SINGLE.version, m), SINGLE, m)
