"""What the online and batch judges share: settings, requests, results, errors, the client.

`JudgeSettings.from_params(task.params["judge"])` reads the stage's judge settings (the
AlignmentRun's `judge` block plus optional tuning keys). The API key is never a setting: it
is read from the environment variable OPENAI_API_KEY only when the client is built, and every
error message passes through `redact` so the key cannot leak into logs, metrics or
exceptions. The base URL comes from `judge.baseURL`, else OPENAI_BASE_URL, else OpenAI.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from .cost import Price, estimate_prompt_tokens, price_for
from .templates import TEMPLATES, Template

API_KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
NOISY_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2")


class JudgeError(Exception):
    """The judge cannot go on (bad settings, no key, refused credentials, a request the
    judge rejects as malformed). The message never holds the API key."""


def redact(text: str, secret: str | None = None) -> str:
    """`text` with the API key (and any 12+ character piece of it) replaced by ***."""
    secret = os.environ.get(API_KEY_ENV) if secret is None else secret
    if not secret or len(secret) < 4:
        return text
    out = text.replace(secret, "***")
    window = 12
    if len(secret) > window:
        for i in range(len(secret) - window + 1):
            piece = secret[i:i + window]
            if piece in out:
                out = out.replace(piece, "***")
    return out


_FIELDS = {
    # params.judge key: (attribute, type, minimum)
    "model": ("model", str, None),
    "baseURL": ("base_url", str, None),
    "mode": ("mode", str, None),
    "maxConcurrency": ("max_concurrency", int, 1),
    "requestsPerMinute": ("requests_per_minute", float, 0.001),
    "tokensPerMinute": ("tokens_per_minute", float, 1),
    "budgetUSD": ("budget_usd", float, 0),
    "stageBudgetUSD": ("stage_budget_usd", float, 0),
    "requestTimeoutSeconds": ("request_timeout_s", float, 0.001),
    "maxAttempts": ("max_attempts", int, 1),
    "maxReasks": ("max_reasks", int, 0),
    "maxTokens": ("max_tokens", int, 1),
    "temperature": ("temperature", float, 0),
    "backoffBaseSeconds": ("backoff_base_s", float, 0),
    "backoffMaxSeconds": ("backoff_max_s", float, 0),
    "pollIntervalSeconds": ("poll_interval_s", float, 0),
    "batchMaxRequests": ("batch_max_requests", int, 1),
    "batchMaxBytes": ("batch_max_bytes", int, 1024),
}
IGNORED_KEYS = {"apiKeySecret"}  # the operator maps it to OPENAI_API_KEY; never read here

# The OpenAI Batch API takes at most 50,000 requests and a 200 MB input file per batch.
OPENAI_BATCH_MAX_REQUESTS = 50_000
OPENAI_BATCH_MAX_BYTES = 200 * 1000 * 1000


@dataclass(frozen=True)
class JudgeSettings:
    model: str = "gpt-4-0613"
    base_url: str | None = None
    mode: str = "online"                 # online | batch
    max_concurrency: int = 32
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    budget_usd: float | None = None      # the run's (every judge stage's spend counts)
    stage_budget_usd: float | None = None  # this stage's own, optional
    request_timeout_s: float = 120.0
    max_attempts: int = 8                # per ask, over 429 / 5xx / timeouts / connection errors
    max_reasks: int = 2                  # further asks after an unparseable reply
    max_tokens: int = 512
    temperature: float = 0.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    poll_interval_s: float = 30.0
    batch_max_requests: int = OPENAI_BATCH_MAX_REQUESTS
    batch_max_bytes: int = OPENAI_BATCH_MAX_BYTES - 10 * 1000 * 1000

    @classmethod
    def from_params(cls, judge: Mapping[str, Any] | None,
                    env: Mapping[str, str] | None = None) -> "JudgeSettings":
        """Settings from `task.params["judge"]`; errors name the field."""
        env = os.environ if env is None else env
        if judge is None:
            raise JudgeError("params.judge is required (the AlignmentRun's spec.judge)")
        if not isinstance(judge, Mapping):
            raise JudgeError("params.judge must be an object")
        values: dict[str, Any] = {}
        for key, raw in judge.items():
            if key in IGNORED_KEYS or raw is None:
                continue
            if key not in _FIELDS:
                raise JudgeError(f"params.judge.{key}: unknown setting (known: "
                                 f"{', '.join(sorted(_FIELDS))})")
            attr, kind, minimum = _FIELDS[key]
            if kind is str:
                if not isinstance(raw, str) or not raw:
                    raise JudgeError(f"params.judge.{key}: must be a non-empty string")
                values[attr] = raw
                continue
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or \
                    (kind is int and not float(raw).is_integer()):
                raise JudgeError(f"params.judge.{key}: must be {'an integer' if kind is int else 'a number'}")
            if minimum is not None and raw < minimum:
                raise JudgeError(f"params.judge.{key}: must be >= {minimum}")
            values[attr] = kind(raw)
        if values.get("mode", "online") not in ("online", "batch"):
            raise JudgeError(f"params.judge.mode: must be online or batch, not {values['mode']!r}")
        if "base_url" not in values and env.get(BASE_URL_ENV):
            values["base_url"] = env[BASE_URL_ENV]
        base = values.get("base_url")
        if base is not None and not base.startswith(("http://", "https://")):
            raise JudgeError("params.judge.baseURL: must start with http:// or https://")
        limit = values.get("batch_max_requests")
        if limit is not None and limit > OPENAI_BATCH_MAX_REQUESTS:
            raise JudgeError(f"params.judge.batchMaxRequests: at most {OPENAI_BATCH_MAX_REQUESTS} "
                             "(the Batch API's limit per batch)")
        return cls(**values)

    @property
    def price(self) -> Price:
        return price_for(self.model)

    def describe(self) -> dict[str, Any]:
        """The settings for metrics and logs (no secrets here by construction)."""
        from ..store import redact_endpoint

        return {"model": self.model, "mode": self.mode,
                "baseURL": redact_endpoint(self.base_url) if self.base_url else "openai",
                "maxConcurrency": self.max_concurrency,
                "requestsPerMinute": self.requests_per_minute,
                "tokensPerMinute": self.tokens_per_minute, "budgetUSD": self.budget_usd}


@dataclass(frozen=True)
class JudgeRequest:
    """One judging request. `key` = judgment_key(model, template.version, messages)."""

    key: str
    template: Template
    messages: list[dict[str, str]]

    @property
    def kind(self) -> str:
        return self.template.kind

    def estimated_tokens(self, max_tokens: int) -> int:
        return estimate_prompt_tokens(self.messages) + max_tokens


@dataclass
class JudgeRun:
    """What judging a list of requests gave."""

    judgments: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> cache entry
    failed: dict[str, str] = field(default_factory=dict)  # key -> last error (not stored)
    budget_stopped: bool = False
    stats: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def is_final(entry: dict[str, Any] | None, max_reasks: int) -> bool:
    """A stored judgment that needs no more asking: ok, refused, or unparseable after all
    the re-asks allowed (an unparseable one with asks left is continued, not restarted)."""
    if entry is None:
        return False
    if entry["status"] != "unparseable":
        return True
    return int(entry.get("asks", 1)) >= 1 + max_reasks


def new_entry(request: JudgeRequest, settings: JudgeSettings, mode: str) -> dict[str, Any]:
    return {"key": request.key, "model": settings.model, "template": request.template.version,
            "kind": request.kind, "status": "unparseable", "verdict": None, "reply": None,
            "problem": None, "asks": 0, "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "costUSD": 0.0, "mode": mode}


def add_usage(entry: dict[str, Any], prompt_tokens: int, completion_tokens: int,
              cost_usd: float) -> None:
    entry["asks"] = int(entry.get("asks", 0)) + 1
    usage = entry.setdefault("usage", {"prompt_tokens": 0, "completion_tokens": 0})
    usage["prompt_tokens"] = int(usage.get("prompt_tokens", 0)) + int(prompt_tokens)
    usage["completion_tokens"] = int(usage.get("completion_tokens", 0)) + int(completion_tokens)
    entry["costUSD"] = round(float(entry.get("costUSD", 0.0)) + cost_usd, 10)
    entry["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


REFUSAL_CODES = {"content_filter", "content_policy_violation", "context_length_exceeded",
                 "invalid_prompt", "string_above_max_length"}


def api_key(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    key = env.get(API_KEY_ENV, "")
    if not key:
        raise JudgeError(f"{API_KEY_ENV} is not set: the judge's API key comes only from this "
                         "environment variable (the operator maps judge.apiKeySecret there)")
    return key


def make_client(settings: JudgeSettings, env: Mapping[str, str] | None = None):
    """An `openai.AsyncOpenAI` client with its own retries off (ours honour Retry-After and
    the rate limits) and its HTTP loggers quieted (they could print request details)."""
    from openai import AsyncOpenAI

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return AsyncOpenAI(api_key=api_key(env), base_url=settings.base_url, max_retries=0,
                       timeout=settings.request_timeout_s)
