"""An OpenAI-compatible judge server on loopback, for tests, benchmarks and the demo.

    python examples/judge_server.py --port 8765 [--rpm 600 --window 10] [--latency 0.05]
        [--rate-429 0.05] [--rate-5xx 0.05] [--rate-timeout 0.01] [--rate-malformed 0.05]
        [--api-key KEY] [--grader module:function]

Endpoints: POST /v1/chat/completions; POST /v1/files, GET /v1/files/{id}[/content];
POST /v1/batches, GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel; GET /_stats (the
counters as JSON) and POST /_reset.

Verdicts come from a grader `grade(prompt_messages, response) -> float` (by default the tiny
synthetic task's exact grader, examples/tiny/synthetic.py): it reads the judging request
that xwin_jobs.judge.templates rendered (conversation and answers as JSON between markers),
grades each answer, and replies with the JSON verdict the template asks for (pairwise: the
higher grade wins, equal grades tie; single: 1 + 9 * grade).

Faults, decided by a seeded hash of (comparison, how many times that comparison was asked),
so a re-run meets the same faults: latency (+ jitter), 429 with Retry-After, 5xx, timeouts
(the server holds the request until the client gives up), malformed verdicts, garbage
bodies, position bias (a valid verdict for whichever answer is shown first), and a
requests-per-window limit answered with 429 + Retry-After.

Counters: every request by route and status; per comparison (the judging request's input,
so a re-ask after a malformed reply is the same comparison) the number of valid verdicts
delivered, online and in batches. A verdict counts as delivered only if the client was still
connected when it was sent; `paid_twice` lists comparisons that got a valid verdict more than
once, which a well-behaved client never causes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import math
import random
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

HERE = Path(__file__).resolve().parent
for extra in (HERE / "tiny", HERE.parent):
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

from xwin_jobs.judge.templates import extract_payload  # noqa: E402

Grader = Callable[[list[dict[str, Any]], str], float]

MALFORMED = (
    "I think answer A is better.",
    '{"winner": "C", "reason": "neither"}',
    '{"winner": "A", "reason": "cut off',
    'Verdict: {"winner": "B"} (final)',
    '{"verdict": "A"}',
    "",
    '{"score": 11}',
    '[{"winner": "A"}]',
)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None          # when set, requests need "Authorization: Bearer <key>"
    echo_key_in_errors: bool = False    # a careless server: 401 messages repeat the key sent
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    hang_s: float = 600.0
    rate_malformed: float = 0.0
    rate_garbage_body: float = 0.0
    rate_position_bias: float = 0.0     # valid verdicts that just pick the first answer shown
    requests_per_window: int | None = None
    window_s: float = 60.0
    batch_seconds: float = 0.0          # how long a batch stays in_progress
    batch_rate_malformed: float = 0.0
    batch_rate_error: float = 0.0
    batch_max_requests: int = 50_000
    seed: int = 0


def default_grader() -> Grader:
    import synthetic

    return synthetic.grade


def load_grader(spec: str | None) -> Grader:
    if not spec:
        return default_grader()
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "grade")


def comparison_key(messages: list[dict[str, Any]], model: str) -> str:
    payload = extract_payload(messages)
    basis = payload if payload is not None else messages
    return hashlib.sha256(json.dumps([model, basis], sort_keys=True).encode()).hexdigest()


def verdict_text(payload: dict[str, Any] | None, grader: Grader) -> str:
    """The grader's verdict for a templated judging request, as the template asks for it."""
    if not payload:
        return "I can only judge requests in the xwin judge template format."
    conversation = payload.get("conversation") or []
    if "answer_a" in payload:
        ga = grader(conversation, str(payload.get("answer_a", "")))
        gb = grader(conversation, str(payload.get("answer_b", "")))
        winner = "A" if ga > gb else "B" if gb > ga else "tie"
        return json.dumps({"reason": f"A grades {ga:g}, B grades {gb:g}.", "winner": winner})
    if conversation and conversation[-1].get("role") == "assistant":
        g = grader(conversation[:-1], str(conversation[-1].get("content", "")))
        return json.dumps({"reason": f"grade {g:g}", "score": 1 + int(9 * g + 0.5)})
    return "The request has nothing to grade."


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.http: Counter[str] = Counter()
        self.chat: Counter[str] = Counter()
        self.asks_by_comparison: Counter[str] = Counter()
        self.valid_by_comparison: Counter[str] = Counter()
        self.paid_by_comparison: Counter[str] = Counter()
        self.batch_paid_by_request: Counter[str] = Counter()
        self.delivered_at: list[float] = []
        self.accepted_at: list[float] = []      # chat requests that passed the rate limit
        self.valid_times: dict[str, list[float]] = {}   # comparison -> wall-clock delivery times
        self.batches_created = 0
        self.batch_requests = 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            valid = self.valid_by_comparison
            return {
                "http": dict(self.http),
                "chat": dict(self.chat),
                "comparisons": len(self.asks_by_comparison),
                "first_time": len(valid),
                "repeated": sum(n - 1 for n in valid.values() if n > 1),
                "paid_twice": sorted(k for k, n in valid.items() if n > 1),
                "paid_requests": sum(self.paid_by_comparison.values()),
                "batches_created": self.batches_created,
                "batch_requests": self.batch_requests,
                "batch_paid_duplicates": sum(n - 1 for n in self.batch_paid_by_request.values() if n > 1),
                "delivered": len(self.delivered_at),
                "accepted": len(self.accepted_at),
                "first_delivery": self.delivered_at[0] if self.delivered_at else None,
                "last_delivery": self.delivered_at[-1] if self.delivered_at else None,
            }


def _error(status: int, message: str, kind: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _usage(messages: list[dict[str, Any]], reply: str) -> dict[str, int]:
    prompt = sum(math.ceil(len(str(m.get("content", ""))) / 4) + 4 for m in messages) + 3
    completion = max(1, math.ceil(len(reply) / 4))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class JudgeServer:
    """The server; `start()` runs it on its own thread (tests), `serve_forever()` in the
    foreground (the CLI)."""

    def __init__(self, config: ServerConfig | None = None, grader: Grader | None = None):
        self.config = config or ServerConfig()
        self.grader = grader or default_grader()
        self.counters = Counters()
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._window: deque[float] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None

    # -- life cycle
    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 ** 3)
        app.add_routes([
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/files", self.upload),
            web.get("/v1/files/{id}", self.file_info),
            web.get("/v1/files/{id}/content", self.file_content),
            web.post("/v1/batches", self.create_batch),
            web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{id}", self.get_batch),
            web.post("/v1/batches/{id}/cancel", self.cancel_batch),
            web.get("/_stats", self.stats_route),
            web.post("/_reset", self.reset_route),
        ])
        return app

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "JudgeServer":
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as e:  # noqa: BLE001
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=main, name="judge-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return self.counters.snapshot()

    def reset(self) -> None:
        self.counters = Counters()
        self._window.clear()

    # -- helpers
    def _count(self, request: web.Request, route: str, status: int) -> None:
        with self.counters.lock:
            self.counters.http[f"{request.method} {route} {status}"] += 1

    def _auth(self, request: web.Request) -> web.Response | None:
        want = self.config.api_key
        if not want:
            return None
        got = request.headers.get("Authorization", "")
        if got == f"Bearer {want}":
            return None
        sent = got.removeprefix("Bearer ")
        shown = sent if self.config.echo_key_in_errors else (sent[:3] + "***" + sent[-4:] if len(sent) > 8 else "***")
        return _error(401, f"Incorrect API key provided: {shown}.", "invalid_request_error",
                      "invalid_api_key")

    def _draw(self, key: str, attempt: int, salt: str) -> random.Random:
        seed = hashlib.sha256(f"{self.config.seed}:{key}:{attempt}:{salt}".encode()).digest()
        return random.Random(int.from_bytes(seed[:8], "big"))

    def _rate_limited(self) -> float | None:
        """Seconds until a slot frees, when the window is full; else None (and the request
        takes a slot)."""
        limit = self.config.requests_per_window
        if not limit:
            return None
        now = time.monotonic()
        while self._window and self._window[0] <= now - self.config.window_s:
            self._window.popleft()
        if len(self._window) >= limit:
            return max(0.001, self._window[0] + self.config.window_s - now)
        self._window.append(now)
        return None

    @staticmethod
    def _gone(request: web.Request) -> bool:
        """Whether the client has hung up: the transport says so, or its socket shows an
        end-of-stream or a reset that the event loop has not processed yet (a killed client's
        kernel closes the connection at once)."""
        transport = request.transport
        if transport is None or transport.is_closing():
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:
            return True
        try:
            return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        finally:
            dup.close()

    def completion(self, body: dict[str, Any], reply: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "judge"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": _usage(body.get("messages") or [], reply)}

    def answer(self, body: dict[str, Any], rng: random.Random, malformed_rate: float) -> tuple[str, bool]:
        """(reply text, whether it is a valid verdict)."""
        messages = body.get("messages") or []
        if rng.random() < malformed_rate:
            return MALFORMED[rng.randrange(len(MALFORMED))], False
        payload = extract_payload(messages)
        if payload is not None and "answer_a" in payload and rng.random() < self.config.rate_position_bias:
            return json.dumps({"reason": "The first answer is better.", "winner": "A"}), True
        return verdict_text(payload, self.grader), payload is not None

    # -- chat completions
    async def chat(self, request: web.Request) -> web.StreamResponse:
        route = "/v1/chat/completions"
        denied = self._auth(request)
        if denied is not None:
            self._count(request, route, 401)
            return denied
        try:
            body = await request.json()
            messages = body["messages"]
            assert isinstance(messages, list) and body.get("model")
        except Exception:  # noqa: BLE001
            self._count(request, route, 400)
            return _error(400, "the body must be JSON with model and messages", "invalid_request_error")
        c = self.config
        key = comparison_key(messages, str(body["model"]))
        with self.counters.lock:
            self.counters.chat["requests"] += 1
            attempt = self.counters.asks_by_comparison[key]
            self.counters.asks_by_comparison[key] += 1
        wait = self._rate_limited()
        if wait is not None:
            self._count(request, route, 429)
            with self.counters.lock:
                self.counters.chat["rate_limited"] += 1
            return _error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded",
                          {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000))})
        with self.counters.lock:
            self.counters.accepted_at.append(time.monotonic())
        rng = self._draw(key, attempt, "online")
        roll = rng.random()
        edges = [("429", c.rate_429), ("5xx", c.rate_5xx), ("timeout", c.rate_timeout),
                 ("garbage", c.rate_garbage_body)]
        fault, edge = None, 0.0
        for name, rate in edges:
            edge += rate
            if roll < edge:
                fault = name
                break
        delay = c.latency_s + (rng.random() * c.latency_jitter_s if c.latency_jitter_s else 0.0)
        if fault == "429":
            self._count(request, route, 429)
            with self.counters.lock:
                self.counters.chat["injected_429"] += 1
            return _error(429, "Rate limit reached (injected)", "requests", "rate_limit_exceeded",
                          {"Retry-After": f"{c.retry_after_s:g}",
                           "retry-after-ms": str(int(c.retry_after_s * 1000))})
        if fault == "5xx":
            status = rng.choice((500, 502, 503))
            self._count(request, route, status)
            with self.counters.lock:
                self.counters.chat["injected_5xx"] += 1
            return _error(status, "The server had an error (injected)", "server_error")
        if fault == "timeout":
            with self.counters.lock:
                self.counters.chat["injected_timeouts"] += 1
            deadline = time.monotonic() + c.hang_s
            while time.monotonic() < deadline and not self._gone(request):
                await asyncio.sleep(0.02)
            self._count(request, route, 504)
            return _error(504, "timed out (injected)", "server_error")
        if delay > 0:
            await asyncio.sleep(delay)
        if self._gone(request):
            self._count(request, route, 499)
            with self.counters.lock:
                self.counters.chat["aborted"] += 1
            return web.Response(status=499)
        if fault == "garbage":
            self._count(request, route, 200)
            with self.counters.lock:
                self.counters.chat["garbage_bodies"] += 1
                self.counters.paid_by_comparison[key] += 1
            return web.Response(text="<html>upstream hiccup</html>", content_type="application/json")
        reply, valid = self.answer(body, rng, c.rate_malformed)
        completion = self.completion(body, reply)
        response = web.json_response(completion)
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            with self.counters.lock:
                self.counters.chat["aborted"] += 1
            return response
        self._count(request, route, 200)
        with self.counters.lock:
            self.counters.chat["ok" if valid else "malformed"] += 1
            self.counters.paid_by_comparison[key] += 1
            if valid:
                self.counters.valid_by_comparison[key] += 1
                self.counters.valid_times.setdefault(key, []).append(time.time())
            self.counters.delivered_at.append(time.monotonic())
        return response

    # -- files
    async def upload(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            self._count(request, "/v1/files", 401)
            return denied
        form = await request.post()
        upload = form.get("file")
        purpose = str(form.get("purpose", ""))
        if upload is None or not hasattr(upload, "file"):
            self._count(request, "/v1/files", 400)
            return _error(400, "a multipart 'file' field is required", "invalid_request_error")
        data = upload.file.read()
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                               "created_at": int(time.time()), "filename": upload.filename,
                               "purpose": purpose, "status": "processed", "_data": data}
        self._count(request, "/v1/files", 200)
        return web.json_response(self._file_view(file_id))

    def _file_view(self, file_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.files[file_id].items() if not k.startswith("_")}

    async def file_info(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            self._count(request, "/v1/files/{id}", 404)
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        self._count(request, "/v1/files/{id}", 200)
        return web.json_response(self._file_view(file_id))

    async def file_content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            self._count(request, "/v1/files/{id}/content", 404)
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        self._count(request, "/v1/files/{id}/content", 200)
        return web.Response(body=self.files[file_id]["_data"], content_type="application/octet-stream")

    def _store_file(self, data: bytes, purpose: str, name: str) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                               "created_at": int(time.time()), "filename": name,
                               "purpose": purpose, "status": "processed", "_data": data}
        return file_id

    # -- batches
    def _batch_view(self, batch_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    async def create_batch(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            self._count(request, "/v1/batches", 401)
            return denied
        body = await request.json()
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            self._count(request, "/v1/batches", 400)
            return _error(400, f"input_file_id {file_id!r} does not exist", "invalid_request_error")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": file_id, "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata") or None}
        with self.counters.lock:
            self.counters.batches_created += 1
        task = asyncio.create_task(self._process_batch(batch_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._count(request, "/v1/batches", 200)
        return web.json_response(self._batch_view(batch_id))

    async def _process_batch(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        lines = self.files[batch["input_file_id"]]["_data"].decode("utf-8").splitlines()
        requests, problems, seen = [], [], set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                assert item["method"] == "POST" and item["url"] == batch["endpoint"]
                assert item["custom_id"] not in seen and item["body"]["messages"]
            except Exception:  # noqa: BLE001
                problems.append({"code": "invalid_request", "line": number,
                                 "message": f"line {number} is not a valid batch request"})
                continue
            seen.add(item["custom_id"])
            requests.append(item)
        if len(requests) > self.config.batch_max_requests:
            problems.append({"code": "too_many_requests", "line": None,
                             "message": f"a batch holds at most {self.config.batch_max_requests} requests"})
        if problems:
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": problems[:10]})
            return
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = len(requests)
        await asyncio.sleep(self.config.batch_seconds)
        if batch["status"] != "in_progress":
            return   # cancelled meanwhile
        out, err = [], []
        for item in requests:
            body = item["body"]
            key = comparison_key(body["messages"], str(body.get("model")))
            with self.counters.lock:
                attempt = self.counters.asks_by_comparison[key]
                self.counters.asks_by_comparison[key] += 1
                self.counters.batch_requests += 1
            rng = self._draw(key, attempt, "batch")
            row_id = f"batch_req_{uuid.uuid4().hex[:24]}"
            if rng.random() < self.config.batch_rate_error:
                err.append({"id": row_id, "custom_id": item["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": row_id,
                                         "body": {"error": {"message": "server error (injected)",
                                                            "type": "server_error", "code": None}}}})
                batch["request_counts"]["failed"] += 1
                continue
            reply, valid = self.answer(body, rng, self.config.batch_rate_malformed)
            out.append({"id": row_id, "custom_id": item["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": row_id,
                                     "body": self.completion(body, reply)}})
            identical = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            with self.counters.lock:
                self.counters.paid_by_comparison[key] += 1
                self.counters.batch_paid_by_request[identical] += 1
                if valid:
                    self.counters.valid_by_comparison[key] += 1
                    self.counters.valid_times.setdefault(key, []).append(time.time())
            batch["request_counts"]["completed"] += 1
        batch.update(status="finalizing", finalizing_at=int(time.time()))

        def jsonl(rows: list[dict[str, Any]]) -> bytes:
            return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")

        if out:
            batch["output_file_id"] = self._store_file(jsonl(out), "batch_output", f"{batch_id}_output.jsonl")
        if err:
            batch["error_file_id"] = self._store_file(jsonl(err), "batch_output", f"{batch_id}_error.jsonl")
        batch.update(status="completed", completed_at=int(time.time()))

    async def get_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if batch_id not in self.batches:
            self._count(request, "/v1/batches/{id}", 404)
            return _error(404, f"No such Batch: {batch_id}", "invalid_request_error")
        self._count(request, "/v1/batches/{id}", 200)
        return web.json_response(self._batch_view(batch_id))

    async def list_batches(self, request: web.Request) -> web.Response:
        limit = min(100, int(request.query.get("limit", 20)))
        after = request.query.get("after")
        ordered = sorted(self.batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
        if after:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        self._count(request, "/v1/batches", 200)
        return web.json_response({"object": "list", "data": [self._batch_view(b["id"]) for b in page],
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None,
                                  "has_more": len(ordered) > limit})

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if batch_id not in self.batches:
            return _error(404, f"No such Batch: {batch_id}", "invalid_request_error")
        batch = self.batches[batch_id]
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        return web.json_response(self._batch_view(batch_id))

    # -- admin
    async def stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def reset_route(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    def serve_forever(self) -> None:
        async def main() -> None:
            await self._start()
            print(f"judge server on {self.base_url}", flush=True)
            await asyncio.Event().wait()

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            pass


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="stays on loopback unless you say otherwise")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--api-key", default=None, help="require this bearer key")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    ap.add_argument("--jitter", type=float, default=0.0, help="extra random latency, up to this")
    ap.add_argument("--rate-429", type=float, default=0.0)
    ap.add_argument("--retry-after", type=float, default=1.0)
    ap.add_argument("--rate-5xx", type=float, default=0.0)
    ap.add_argument("--rate-timeout", type=float, default=0.0)
    ap.add_argument("--hang", type=float, default=600.0, help="how long a timeout fault holds")
    ap.add_argument("--rate-malformed", type=float, default=0.0)
    ap.add_argument("--rate-garbage-body", type=float, default=0.0)
    ap.add_argument("--rate-position-bias", type=float, default=0.0)
    ap.add_argument("--rpm", type=int, default=None, help="requests allowed per window")
    ap.add_argument("--window", type=float, default=60.0, help="seconds of the --rpm window")
    ap.add_argument("--batch-seconds", type=float, default=0.0)
    ap.add_argument("--batch-rate-malformed", type=float, default=0.0)
    ap.add_argument("--batch-rate-error", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grader", default=None, help="module:function (default: the tiny task's)")
    a = ap.parse_args(argv)
    config = ServerConfig(host=a.host, port=a.port, api_key=a.api_key, latency_s=a.latency,
                          latency_jitter_s=a.jitter, rate_429=a.rate_429, retry_after_s=a.retry_after,
                          rate_5xx=a.rate_5xx, rate_timeout=a.rate_timeout, hang_s=a.hang,
                          rate_malformed=a.rate_malformed, rate_garbage_body=a.rate_garbage_body,
                          rate_position_bias=a.rate_position_bias,
                          requests_per_window=a.rpm, window_s=a.window, batch_seconds=a.batch_seconds,
                          batch_rate_malformed=a.batch_rate_malformed,
                          batch_rate_error=a.batch_rate_error, seed=a.seed)
    return config, a.grader


def main(argv: list[str] | None = None) -> int:
    config, grader = parse_args(argv)
    JudgeServer(config, load_grader(grader)).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
