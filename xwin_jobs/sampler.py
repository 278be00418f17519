"""The sampler: n responses per prompt from an OpenAI-compatible server (vLLM), asynchronously.

`sample_responses(prompts, n, sampling, client_cfg, encode)` is the one client used by every
stage that samples: `bestOfN` (n responses), `pairs` (k candidates) and `evaluate` (one answer).
It sends each prompt to the completions endpoint as token ids made by `encode(messages)`
(the stages pass `chat.encode_prompt` with the run's chat template and the policy's tokenizer,
so the model sees exactly the text it was trained on, special tokens included) and yields
`(prompt_record, [n texts])` as answers arrive (not in input order). `chat.chat_format`
makes that encoder plus `to_content`, which removes the separator the template puts before an
assistant message (vicuna's space after "ASSISTANT:"), so a sampled answer stored as message
content renders in later training exactly as it was generated.

Per request: `n`, `temperature`, `top_p`, `max_tokens`, and a seed derived from the sampling
seed and the prompt id (`prompt_seed`), so a prompt's responses do not depend on the order or
the concurrency prompts are sent in. Generation stops at the tokenizer's end-of-sequence token
(vLLM's default; the server is started with `--generation-config vllm` so nothing else
changes the request). At most `client_cfg.concurrency` requests are in flight.

What is an error and what is a counted skip:

- errors (`SamplerError`, the job fails; everything already yielded has been written by the
  caller and is kept for the re-run):
  - the server cannot be reached, answers 5xx / 429 or times out on `max_attempts` attempts
    in a row (exponential backoff in between): the message names the URL;
  - the server stops answering altogether (it exited, its pod was killed): every request in
    flight fails to connect. The requests share one `Reachability`: once no request has
    reached the server for longer than one request's whole retry schedule
    (`ClientConfig.retry_span_s`, 31 s by default), the sampler ends at once with one message
    naming the URL, how long and how many requests failed, instead of each prompt spending
    its own retries in turn;
  - the server refuses a request (another 4xx, e.g. an unknown model): names the prompt id;
  - a response with other than exactly n choices (vLLM has had such bugs): names the prompt
    id, n and the count returned;
  - a prompt with no room to generate under the server's `max_model_len`: names the prompt;
  - the same prompt id twice in the input;
- counted, never silent (`SampleStats`):
  - empty (whitespace-only) responses are kept as they are; the scorer gives them no score
    and selection skips them (`empty`);
  - responses cut at `max_tokens` (`truncated`, finish_reason `length`);
  - requests whose `max_tokens` was lowered to fit the server's `max_model_len` (`clamped`);
  - retried requests (`retries`).

A malformed prompt line is a `RecordError` (file, line, field) from `records.iter_records`
before it reaches this module.

`openai` is imported lazily; importing this module is light.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)


class SamplerError(RuntimeError):
    """Sampling cannot go on; the message names the server URL or the prompt id."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "SamplingParams":
        """From a stage's resolved `sampling` (spec names: temperature, topP, maxTokens, seed)."""
        p = {k: v for k, v in dict(params or {}).items() if v is not None}
        try:
            out = cls(temperature=float(p.get("temperature", cls.temperature)),
                      top_p=float(p.get("topP", cls.top_p)),
                      max_tokens=int(p.get("maxTokens", cls.max_tokens)),
                      seed=int(p.get("seed", cls.seed)))
        except (TypeError, ValueError) as e:
            raise SamplerError(f"params.sampling: {e}") from None
        if out.temperature < 0:
            raise SamplerError(f"params.sampling.temperature: must be >= 0, got {out.temperature}")
        if not 0 < out.top_p <= 1:
            raise SamplerError(f"params.sampling.topP: must be in (0, 1], got {out.top_p}")
        if out.max_tokens < 1:
            raise SamplerError(f"params.sampling.maxTokens: must be >= 1, got {out.max_tokens}")
        return out


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how hard to try.

    base_url: the OpenAI base URL (`http://host:port/v1`).
    model: the served model name; None = the server's only model (asked at start).
    concurrency: requests in flight at most.
    max_attempts / backoff_s / max_backoff_s: a failing request is tried `max_attempts` times,
        waiting backoff_s, 2*backoff_s, ... (at most max_backoff_s, with jitter) in between.
    timeout_s: one request's time limit (a timeout is retried like a connection error).
    connect_timeout_s: the limit on opening a connection (a server whose pod is gone may
        leave a connection hanging rather than refused).
    """

    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"
    concurrency: int = 64
    max_attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0

    @property
    def retry_span_s(self) -> float:
        """How long one request's retries wait in all (the backoffs between its attempts,
        without jitter): a server unreachable for longer than this is taken to be gone."""
        return sum(min(self.backoff_s * 2 ** i, self.max_backoff_s)
                   for i in range(self.max_attempts - 1))

    @classmethod
    def from_env(cls, serving: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, **overrides: Any) -> "ClientConfig":
        """`OPENAI_BASE_URL` (required), `XWIN_SERVED_MODEL` (optional), `OPENAI_API_KEY`
        (optional; vLLM needs none), concurrency from the stage's resolved `serving`
        (`concurrency` per replica times `replicas`); `XWIN_SAMPLER_MAX_ATTEMPTS` and
        `XWIN_SAMPLER_BACKOFF_SECONDS` override the retry policy."""
        env = os.environ if env is None else env
        url = overrides.pop("base_url", None) or env.get("OPENAI_BASE_URL")
        if not url:
            raise SamplerError("no sampling server: set OPENAI_BASE_URL to the vLLM server's "
                               "OpenAI base URL (http://host:port/v1)")
        serving = dict(serving or {})
        concurrency = int(serving.get("concurrency") or 64) * int(serving.get("replicas") or 1)
        kwargs: dict[str, Any] = dict(base_url=url.rstrip("/"), concurrency=concurrency,
                                      model=env.get("XWIN_SERVED_MODEL") or None,
                                      api_key=env.get("OPENAI_API_KEY") or "EMPTY")
        try:
            if env.get("XWIN_SAMPLER_MAX_ATTEMPTS"):
                kwargs["max_attempts"] = max(1, int(env["XWIN_SAMPLER_MAX_ATTEMPTS"]))
            if env.get("XWIN_SAMPLER_BACKOFF_SECONDS"):
                kwargs["backoff_s"] = float(env["XWIN_SAMPLER_BACKOFF_SECONDS"])
        except ValueError as e:
            raise SamplerError(f"sampler retry settings: {e}") from None
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class SampleStats:
    prompts: int = 0
    responses: int = 0
    empty: int = 0
    truncated: int = 0
    clamped: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_counts(self) -> dict[str, int]:
        d = asdict(self)
        d.pop("started")
        return d

    def line(self, total: int | None = None) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        of = f"/{total}" if total is not None else ""
        return (f"sampled {self.prompts}{of} prompts ({self.prompts / elapsed:.2f}/s), "
                f"{self.responses} responses, {self.empty} empty, {self.truncated} truncated, "
                f"{self.retries} retries")


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The request seed of one prompt: a function of the sampling seed and the prompt id only."""
    digest = hashlib.sha256(f"{int(seed)}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int | None


class Reachability:
    """Whether the server still answers, shared by every request of one sampler: the time the
    last request reached it (any HTTP answer counts) and the connection failures since."""

    def __init__(self, span_s: float):
        self.span_s = span_s
        self.last_reached: float | None = None   # never reached: each request's retries decide
        self.failures = 0

    def reached(self) -> None:
        self.last_reached, self.failures = time.monotonic(), 0

    def unreachable(self, cfg: "ClientConfig", exc: BaseException) -> None:
        """Count one connection failure; SamplerError once nothing has reached the server for
        longer than one request's retry schedule (after it was reached at least once)."""
        self.failures += 1
        if self.last_reached is None:
            return
        if time.monotonic() - self.last_reached > self.span_s and self.failures >= 2:
            raise self.gone(cfg, exc)

    def gone(self, cfg: "ClientConfig", exc: BaseException) -> SamplerError:
        down = time.monotonic() - (self.last_reached or time.monotonic())
        return SamplerError(
            f"the server at {cfg.base_url} stopped answering: {self.failures} requests failed "
            f"to reach it over the last {down:.0f}s (last error: {_message(exc)}); it has most "
            "likely exited: see its log (`xwin run`: the serve step's log) or its pod "
            "(`kubectl logs --previous`)")


def _connection_failure(exc: BaseException) -> bool:
    import openai

    return isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError))


def _is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError)):  # incl. timeouts
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 429)
    return False


async def _with_retries(call: Callable[[], Any], cfg: ClientConfig, what: str,
                        stats: SampleStats, reach: Reachability | None = None) -> Any:
    import openai

    delay, started, last = cfg.backoff_s, time.monotonic(), None
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            result = await call()
            if reach is not None:
                reach.reached()
            return result
        except Exception as e:  # noqa: BLE001 - sorted below
            if reach is not None:
                if _connection_failure(e):
                    reach.unreachable(cfg, e)
                elif isinstance(e, openai.APIStatusError):
                    reach.reached()  # it answered, if only with an error
            if not _is_retryable(e):
                if isinstance(e, openai.APIStatusError):
                    raise SamplerError(f"{what}: the server at {cfg.base_url} refused the request "
                                       f"(HTTP {e.status_code}): {_message(e)}") from None
                raise
            last = e
        if attempt < cfg.max_attempts:
            stats.retries += 1
            wait = min(delay, cfg.max_backoff_s) * (0.5 + random.random() / 2)
            log.warning("%s: %s (attempt %d of %d); retrying in %.1fs", what, _message(last),
                        attempt, cfg.max_attempts, wait)
            await asyncio.sleep(wait)
            delay *= 2
    if reach is not None and reach.last_reached is not None and _connection_failure(last):
        raise reach.gone(cfg, last)  # it answered before: the server, not this request, is gone
    raise SamplerError(f"{what}: no answer from the server at {cfg.base_url} after "
                       f"{cfg.max_attempts} attempts over {time.monotonic() - started:.0f}s: "
                       f"{_message(last)}")


def _message(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


async def server_info(client: Any, cfg: ClientConfig, stats: SampleStats,
                      reach: Reachability | None = None) -> ServerInfo:
    """The served model (cfg.model, or the server's only one) and its max_model_len."""
    page = await _with_retries(lambda: client.models.list(), cfg, "listing models", stats, reach)
    models = list(page.data)
    names = [m.id for m in models]
    if cfg.model is None:
        if len(models) != 1:
            raise SamplerError(f"the server at {cfg.base_url} serves {len(models)} models "
                               f"({', '.join(names) or 'none'}); set XWIN_SERVED_MODEL to one")
        chosen = models[0]
    else:
        found = [m for m in models if m.id == cfg.model]
        if not found:
            raise SamplerError(f"the server at {cfg.base_url} does not serve model "
                               f"{cfg.model!r} (it serves: {', '.join(names) or 'none'})")
        chosen = found[0]
    extra = getattr(chosen, "model_extra", None) or {}
    mml = extra.get("max_model_len", getattr(chosen, "max_model_len", None))
    return ServerInfo(model=chosen.id, max_model_len=int(mml) if mml else None)


async def _sample_one(client: Any, record: dict, ids: list[int], n: int, sampling: SamplingParams,
                      cfg: ClientConfig, server: ServerInfo, stats: SampleStats,
                      to_content: Callable | None, reach: Reachability | None = None
                      ) -> tuple[dict, list[str], list[str | None]]:
    pid = record["id"]
    max_tokens = sampling.max_tokens
    if server.max_model_len is not None:
        room = server.max_model_len - len(ids)
        if room < 1:
            raise SamplerError(f"prompt {pid!r}: {len(ids)} prompt tokens leave no room to "
                               f"generate under the server's max_model_len {server.max_model_len}")
        if max_tokens > room:
            max_tokens = room
            stats.clamped += 1
    resp = await _with_retries(
        lambda: client.completions.create(
            model=server.model, prompt=ids, n=n, temperature=sampling.temperature,
            top_p=sampling.top_p, max_tokens=max_tokens, seed=prompt_seed(sampling.seed, pid)),
        cfg, f"prompt {pid!r}", stats, reach)
    choices = sorted(resp.choices or [], key=lambda c: c.index)
    if len(choices) != n or [c.index for c in choices] != list(range(n)):
        raise SamplerError(f"prompt {pid!r}: asked the server at {cfg.base_url} for n={n} "
                           f"responses, got {len(choices)}"
                           + ("" if len(choices) != n else " with duplicate indices"))
    texts = [c.text or "" for c in choices]
    if to_content is not None:
        texts = [to_content(record["messages"], t) for t in texts]
    reasons = [c.finish_reason for c in choices]
    stats.prompts += 1
    stats.responses += n
    stats.empty += sum(1 for t in texts if not t.strip())
    stats.truncated += sum(1 for r in reasons if r == "length")
    return record, texts, reasons


async def sample_with_reasons(prompts: Iterable[dict], n: int, sampling: SamplingParams,
                              client_cfg: ClientConfig, encode: Callable[[Sequence[dict]], list[int]],
                              stats: SampleStats | None = None, to_content: Callable | None = None
                              ) -> AsyncIterator[tuple[dict, list[str], list[str | None]]]:
    """Like `sample_responses`, also yielding each response's finish_reason."""
    from openai import AsyncOpenAI, Timeout

    if n < 1:
        raise SamplerError(f"n must be >= 1, got {n}")
    stats = stats if stats is not None else SampleStats()
    for name in ("httpx", "httpx2", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    client = AsyncOpenAI(base_url=client_cfg.base_url, api_key=client_cfg.api_key, max_retries=0,
                         timeout=Timeout(client_cfg.timeout_s,
                                               connect=client_cfg.connect_timeout_s))
    pending: set[asyncio.Task] = set()
    reach = Reachability(client_cfg.retry_span_s)
    try:
        server = await server_info(client, client_cfg, stats, reach)
        seen: set[str] = set()
        source = iter(prompts)
        exhausted = False
        while True:
            while not exhausted and len(pending) < client_cfg.concurrency:
                record = next(source, None)
                if record is None:
                    exhausted = True
                    break
                pid = str(record["id"])
                if pid in seen:
                    raise SamplerError(f"prompt id {pid!r} appears more than once in the input")
                seen.add(pid)
                ids = list(encode(record["messages"]))
                pending.add(asyncio.create_task(
                    _sample_one(client, record, ids, n, sampling, client_cfg, server, stats,
                                to_content, reach)))
            if not pending:
                break
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await client.close()


async def sample_responses(prompts: Iterable[dict], n: int, sampling: SamplingParams,
                           client_cfg: ClientConfig, encode: Callable[[Sequence[dict]], list[int]],
                           stats: SampleStats | None = None, to_content: Callable | None = None
                           ) -> AsyncIterator[tuple[dict, list[str]]]:
    """(prompt_record, [exactly n texts]) for every prompt record ({"id", "messages"}), as the
    answers arrive. `encode(messages)` gives the prompt's token ids and `to_content(messages,
    text)` (optional) turns a completion into message content: `chat.chat_format(template,
    tokenizer)` makes both. See the module docstring for errors and counted skips."""
    async for record, texts, _ in sample_with_reasons(prompts, n, sampling, client_cfg, encode,
                                                      stats, to_content):
        yield record, texts
