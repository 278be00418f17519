"""What the loopback judge server (judge_server.py) answers: graders, the verdict a grader
gives for a templated judging request, the malformed replies it injects, and the
OpenAI-shaped response and error bodies.

Pure functions except the aiohttp error response; examples/ and examples/tiny must be on
sys.path (judge_server.py puts them there).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import random
import sys
import time
import uuid
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


def judge_reply(body: dict[str, Any], rng: random.Random, grader: Grader, malformed_rate: float,
                position_bias_rate: float) -> tuple[str, bool]:
    """(reply text, whether it is a valid verdict) for a chat-completion request body: a
    malformed reply with probability `malformed_rate`, else for a pairwise request "A wins"
    with probability `position_bias_rate`, else the grader's verdict."""
    messages = body.get("messages") or []
    if rng.random() < malformed_rate:
        return MALFORMED[rng.randrange(len(MALFORMED))], False
    payload = extract_payload(messages)
    if payload is not None and "answer_a" in payload and rng.random() < position_bias_rate:
        return json.dumps({"reason": "The first answer is better.", "winner": "A"}), True
    return verdict_text(payload, grader), payload is not None


def usage(messages: list[dict[str, Any]], reply: str) -> dict[str, int]:
    """Token counts, roughly four characters a token."""
    prompt = sum(math.ceil(len(str(m.get("content", ""))) / 4) + 4 for m in messages) + 3
    completion = max(1, math.ceil(len(reply) / 4))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_body(body: dict[str, Any], reply: str) -> dict[str, Any]:
    """A chat.completion object answering request `body` with `reply`."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "judge"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage(body.get("messages") or [], reply)}


def error_response(status: int, message: str, kind: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped error body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)
