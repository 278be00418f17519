"""The online judge: an async `openai` client that asks many judging requests at once.

- at most `maxConcurrency` requests in flight (a pool of workers);
- client-side rate limits by requests and tokens per minute (`RateLimiter`: requests are
  spaced evenly, no bursts, so a server-side limit of R per window is not exceeded);
- retries of 429, 5xx, 408/409, timeouts and connection errors with exponential backoff and
  full jitter, honouring `Retry-After` / `retry-after-ms` (a 429 also pauses every worker);
- a per-request timeout;
- bounded re-asks of unparseable replies, each ask stored as it arrives (an unparseable entry
  with asks left is continued by the next run, not restarted);
- the budget: a request is sent only if the estimated spend stays within budgetUSD.

Fatal errors (no key, refused credentials, unknown model, a request the API calls malformed,
no quota) stop everything with a `JudgeError` whose message never holds the key.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from typing import Any, Callable

from .cache import JudgmentCache
from .core import (REFUSAL_CODES, JudgeError, JudgeRequest, JudgeRun, JudgeSettings, add_usage,
                   is_final, make_client, new_entry, redact)
from .cost import Budget
from .templates import reask_messages
from .verdict import Unparseable, parse_verdict

log = logging.getLogger("xwin_jobs.judge")
MAX_RETRY_AFTER_S = 900.0


class RateLimiter:
    """Spaces request starts so that at most `rpm` requests and `tpm` tokens start per
    minute (generic cell rate: each start books the next free slot; no burst builds up while
    idle). `pause_until` holds every start back after a 429."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._next_request = 0.0
        self._next_tokens = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def book(self, tokens: int) -> float:
        """Book a start for a request of `tokens` tokens; returns its start time."""
        start = max(self.clock(), self._next_request, self._next_tokens, self._paused_until)
        if self.rpm:
            self._next_request = start + 60.0 / self.rpm
        if self.tpm:
            self._next_tokens = start + tokens * 60.0 / self.tpm
        return start

    def pause_until(self, when: float) -> None:
        self._paused_until = max(self._paused_until, when)

    async def acquire(self, tokens: int = 0) -> None:
        if not self.rpm and not self.tpm:
            delay = self._paused_until - self.clock()
        else:
            async with self._lock:
                delay = self.book(tokens) - self.clock()
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self._paused_until - self.clock()  # a 429 may have paused us meanwhile


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
    except (TypeError, ValueError):
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, retry_after: float | None, base: float, cap: float,
                  rand: float) -> float:
    """Delay before retry number `attempt` (1, 2, ...): the server's Retry-After plus up to
    10% jitter when given, else full jitter over base * 2^(attempt-1), capped at `cap`."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S) * (1.0 + 0.1 * rand)
    return rand * min(cap, base * 2 ** max(0, attempt - 1))


class _Retry(Exception):
    def __init__(self, why: str, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(why)
        self.retry_after, self.rate_limited = retry_after, rate_limited


class _Refused(Exception):
    pass


class _OverBudget(Exception):
    pass


def classify(exc: BaseException) -> Exception:
    """An openai exception as _Retry (transient), _Refused (this request, permanently) or
    JudgeError (fatal)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return _Retry("timed out")
    if isinstance(exc, openai.APIConnectionError):
        return _Retry(f"connection error: {type(exc.__cause__ or exc).__name__}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = str(getattr(exc, "code", "") or "")
        after = retry_after_seconds(exc.response.headers if exc.response is not None else None)
        message = redact(str(getattr(exc, "message", "") or exc))[:300]
        if status == 429 and code == "insufficient_quota":
            return JudgeError(f"the judge refused with 429 insufficient_quota: the account has "
                              f"no quota left ({message})")
        if status == 429:
            return _Retry("429 rate limited", after, rate_limited=True)
        if status >= 500 or status in (408, 409):
            return _Retry(f"HTTP {status}", after)
        if status in (400, 422) and code in REFUSAL_CODES:
            return _Refused(f"HTTP {status} {code}: {message}")
        if status == 401:
            return JudgeError("the judge refused the API key (HTTP 401): check the secret "
                              "mapped to OPENAI_API_KEY")
        if status == 403:
            return JudgeError(f"the judge denied access (HTTP 403): {message}")
        if status == 404:
            return JudgeError(f"the judge answered 404 (is the model name right? is baseURL "
                              f"an OpenAI-compatible /v1 endpoint?): {message}")
        return JudgeError(f"the judge rejected a request (HTTP {status} {code}): {message}")
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return _Retry(f"unreadable response: {type(exc).__name__}")
    return JudgeError(redact(f"judge client error: {type(exc).__name__}: {exc}"))


class OnlineJudge:
    """Judges requests through the chat completions API, storing each judgment in `cache`."""

    def __init__(self, settings: JudgeSettings, cache: JudgmentCache, budget: Budget,
                 client: Any = None, rng: random.Random | None = None,
                 progress_every_s: float = 10.0):
        self.settings, self.cache, self.budget = settings, cache, budget
        self.client = client
        self.rng = rng or random.Random()
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self.progress_every_s = progress_every_s
        self.progress: Any = None  # the step's live record (xwin_jobs.progress.ProgressWriter)
        self._started = time.monotonic()
        self._stop = False
        self._fatal: JudgeError | None = None

    async def run(self, requests: list[JudgeRequest]) -> JudgeRun:
        run = JudgeRun()
        started = self._started = time.monotonic()
        todo: list[JudgeRequest] = []
        for r in requests:
            entry = self.cache.get(r.key)
            if is_final(entry, self.settings.max_reasks):
                run.judgments[r.key] = entry
                run.stats["cached"] += 1
            else:
                todo.append(r)
        if todo:
            own_client = self.client is None
            if own_client:
                self.client = make_client(self.settings)
            queue: asyncio.Queue[JudgeRequest] = asyncio.Queue()
            for r in todo:
                queue.put_nowait(r)
            workers = [asyncio.create_task(self._worker(queue, run))
                       for _ in range(min(self.settings.max_concurrency, len(todo)))]
            reporter = asyncio.create_task(self._report(run, len(requests)))
            try:
                await asyncio.gather(*workers)
            finally:
                reporter.cancel()
                for w in workers:
                    w.cancel()
                if own_client:
                    await self.client.close()
                    self.client = None
        run.seconds = time.monotonic() - started
        if self._fatal is not None:
            raise self._fatal
        run.budget_stopped = self._stop and not self._fatal
        return run

    async def _report(self, run: JudgeRun, total: int) -> None:
        while True:
            await asyncio.sleep(self.progress_every_s)
            log.info("judge: %d/%d judged (%d from the cache, %d asked), %d failed, %s",
                     len(run.judgments), total, run.stats["cached"], run.stats["asks"],
                     len(run.failed), self.budget.describe())

    async def _worker(self, queue: asyncio.Queue, run: JudgeRun) -> None:
        while not self._stop:
            try:
                request = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                entry = await self._judge(request, run)
            except _OverBudget:
                self._stop = True
                return
            except JudgeError as e:
                self._fatal = self._fatal or e
                self._stop = True
                return
            except _Retry as e:
                run.failed[request.key] = str(e)
                run.stats["failed"] += 1
                continue
            run.judgments[request.key] = entry
            if self.progress is not None:
                elapsed = max(time.monotonic() - self._started, 1e-9)
                self.progress.update(len(run.judgments), usd=self.budget.spent_usd,
                                     requestsPerSecond=run.stats["asks"] / elapsed)

    async def _judge(self, request: JudgeRequest, run: JudgeRun) -> dict[str, Any]:
        """Ask until a verdict parses or the re-asks run out, storing after every ask."""
        entry = self.cache.get(request.key) or new_entry(request, self.settings, "online")
        entry = dict(entry)
        messages = request.messages
        if entry["asks"] and entry["status"] == "unparseable":  # continue an earlier chain
            messages = reask_messages(request.messages, entry["reply"] or "",
                                      entry["problem"] or "unparseable", request.template)
        while True:
            try:
                text, finish, usage = await self._ask(messages, request, run)
            except _Refused as e:
                entry.update(status="refused", problem=str(e), verdict=None)
                run.stats["refused"] += 1
                await self.cache.aput(entry)
                return entry
            add_usage(entry, usage[0], usage[1],
                      self.settings.price.cost(usage[0], usage[1], batch=False))
            entry["reply"] = text
            if finish == "content_filter":
                entry.update(status="refused", problem="the judge's reply was filtered",
                             verdict=None)
                run.stats["refused"] += 1
                await self.cache.aput(entry)
                return entry
            parsed = parse_verdict(request.kind, text)
            if isinstance(parsed, Unparseable):
                entry.update(status="unparseable", problem=parsed.problem, verdict=None)
                run.stats["unparseable_replies"] += 1
                await self.cache.aput(entry)
                if is_final(entry, self.settings.max_reasks):
                    run.stats["unparseable"] += 1
                    return entry
                run.stats["reasks"] += 1
                messages = reask_messages(request.messages, text or "", parsed.problem,
                                          request.template)
                continue
            entry.update(status="ok", problem=None, verdict=parsed.to_dict())
            await self.cache.aput(entry)
            return entry

    async def _ask(self, messages: list[dict[str, str]], request: JudgeRequest,
                   run: JudgeRun) -> tuple[str, str | None, tuple[int, int]]:
        """One answered chat completion: (text, finish reason, (prompt, completion) tokens).
        Retries transient failures; raises _Retry after max_attempts, _OverBudget when the
        budget does not allow it, _Refused or JudgeError."""
        s = self.settings
        probe = JudgeRequest(request.key, request.template, messages)
        tokens = probe.estimated_tokens(s.max_tokens)
        estimate = s.price.cost(tokens - s.max_tokens, s.max_tokens)
        attempt = 0
        while True:
            if self._stop:
                raise _OverBudget() if self._fatal is None else self._fatal
            if not self.budget.try_reserve(estimate):
                raise _OverBudget()
            attempt += 1
            await self.limiter.acquire(tokens)
            actual = 0.0
            try:
                run.stats["requests"] += 1
                resp = await asyncio.wait_for(
                    self.client.chat.completions.create(
                        model=s.model, messages=messages, temperature=s.temperature,
                        max_tokens=s.max_tokens, timeout=s.request_timeout_s),
                    timeout=s.request_timeout_s + 5.0)
                choice = resp.choices[0]
                usage = getattr(resp, "usage", None)
                prompt_t = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else tokens - s.max_tokens
                completion_t = int(getattr(usage, "completion_tokens", 0) or 0) if usage else s.max_tokens
                actual = s.price.cost(prompt_t, completion_t)
                run.stats["asks"] += 1
                return choice.message.content or "", choice.finish_reason, (prompt_t, completion_t)
            except asyncio.TimeoutError:
                outcome: Exception = _Retry("timed out")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (classified below)
                outcome = classify(e)
            finally:
                self.budget.settle(estimate, actual)
            if not isinstance(outcome, _Retry):
                raise outcome
            run.stats["retries"] += 1
            run.stats["rate_limited" if outcome.rate_limited else "transient_errors"] += 1
            if attempt >= s.max_attempts:
                raise _Retry(f"{outcome} (gave up after {attempt} attempts)")
            delay = backoff_delay(attempt, outcome.retry_after, s.backoff_base_s,
                                  s.backoff_max_s, self.rng.random())
            if outcome.rate_limited:
                self.limiter.pause_until(self.limiter.clock() + delay)
            log.debug("judge request %s: %s; retry %d in %.2fs", request.key[:12], outcome,
                      attempt, delay)
            await asyncio.sleep(delay)
