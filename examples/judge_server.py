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

This module holds the config, life cycle, chat endpoint, counters and CLI; the Files and
Batch API is judge_batches.py, verdicts and reply bodies judge_verdicts.py, fault injection
judge_faults.py (examples/ must be on sys.path, as it is when this file runs as a script).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE / "tiny", HERE.parent):
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

from judge_batches import FilesAndBatches  # noqa: E402
from judge_faults import RequestWindow, client_gone, pick_fault, seeded_rng  # noqa: E402
from judge_verdicts import (  # noqa: E402,F401  (re-exported: the server's import surface)
    MALFORMED, Grader, comparison_key, completion_body, default_grader, error_response,
    judge_reply, load_grader, verdict_text,
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



class JudgeServer(FilesAndBatches):
    """The server; `start()` runs it on its own thread (tests), `serve_forever()` in the
    foreground (the CLI)."""

    def __init__(self, config: ServerConfig | None = None, grader: Grader | None = None):
        self.config = config or ServerConfig()
        self.grader = grader or default_grader()
        self.counters = Counters()
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._window = RequestWindow()
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
        return error_response(401, f"Incorrect API key provided: {shown}.", "invalid_request_error",
                              "invalid_api_key")

    def _draw(self, key: str, attempt: int, salt: str) -> random.Random:
        return seeded_rng(self.config.seed, key, attempt, salt)

    def _rate_limited(self) -> float | None:
        """Seconds until a slot frees, when the window is full; else None (and the request
        takes a slot)."""
        return self._window.wait_or_admit(self.config.requests_per_window, self.config.window_s)

    @staticmethod
    def _gone(request: web.Request) -> bool:
        return client_gone(request)

    def completion(self, body: dict[str, Any], reply: str) -> dict[str, Any]:
        return completion_body(body, reply)

    def answer(self, body: dict[str, Any], rng: random.Random, malformed_rate: float) -> tuple[str, bool]:
        """(reply text, whether it is a valid verdict)."""
        return judge_reply(body, rng, self.grader, malformed_rate, self.config.rate_position_bias)


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
            return error_response(400, "the body must be JSON with model and messages",
                                  "invalid_request_error")
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
            return error_response(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded",
                                  {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000))})
        with self.counters.lock:
            self.counters.accepted_at.append(time.monotonic())
        rng = self._draw(key, attempt, "online")
        fault = pick_fault(rng.random(), c)
        delay = c.latency_s + (rng.random() * c.latency_jitter_s if c.latency_jitter_s else 0.0)
        if fault == "429":
            self._count(request, route, 429)
            with self.counters.lock:
                self.counters.chat["injected_429"] += 1
            return error_response(429, "Rate limit reached (injected)", "requests", "rate_limit_exceeded",
                                  {"Retry-After": f"{c.retry_after_s:g}",
                                   "retry-after-ms": str(int(c.retry_after_s * 1000))})
        if fault == "5xx":
            status = rng.choice((500, 502, 503))
            self._count(request, route, status)
            with self.counters.lock:
                self.counters.chat["injected_5xx"] += 1
            return error_response(status, "The server had an error (injected)", "server_error")
        if fault == "timeout":
            with self.counters.lock:
                self.counters.chat["injected_timeouts"] += 1
            deadline = time.monotonic() + c.hang_s
            while time.monotonic() < deadline and not self._gone(request):
                await asyncio.sleep(0.02)
            self._count(request, route, 504)
            return error_response(504, "timed out (injected)", "server_error")
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