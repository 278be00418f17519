"""Versioned judge prompt templates asking for a JSON verdict.

A template renders a judging request as chat messages. What is judged (the conversation and
the answers) travels as one line of JSON inside the user message, between two marker lines,
so an answer that itself contains "Answer B:" or a fake verdict cannot blur the boundaries,
and a test server can recover the exact inputs (`extract_payload`).

Templates are frozen by version: never edit the text of a published version; add a new one
and bump `PAIRWISE` / `SINGLE`. The version is part of every judgment's cache key and of
every pair record (`judge.template`).

Two kinds:
- `pairwise` (Xwin-Pair, AlpacaEval): which of two final assistant replies to the same
  conversation is better: `{"reason": "...", "winner": "A" | "B" | "tie"}`.
- `single` (MT-bench): a 1-10 grade of the final assistant reply of a conversation:
  `{"reason": "...", "score": <1-10>}`.

Pure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

BEGIN = "<<<INPUT"
END = "INPUT>>>"


@dataclass(frozen=True)
class Template:
    kind: str       # pairwise | single
    version: str    # e.g. pairwise-v1; part of the cache key
    system: str
    instructions: str
    reply_format: str
    reask: str      # the follow-up when a reply was not a well-formed verdict

    def render(self, payload: dict[str, Any]) -> list[dict[str, str]]:
        body = json.dumps({"template": self.version, **payload}, ensure_ascii=False,
                          sort_keys=True)
        user = (f"{self.instructions}\n\n{BEGIN}\n{body}\n{END}\n\n"
                f"Reply with only this JSON object and no other text:\n{self.reply_format}")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


_SYSTEM = ("You are a careful and impartial judge of AI assistant replies. You follow the "
           "output format exactly.")

PAIRWISE_V1 = Template(
    kind="pairwise",
    version="pairwise-v1",
    system=_SYSTEM,
    instructions=(
        "Compare two candidate replies an AI assistant could give as the next turn of the "
        "conversation below. Judge helpfulness, correctness, relevance, depth and clarity. "
        "Earlier turns of a multi-turn conversation are context: judge only the candidate "
        "replies, as continuations of that context. Do not let the order of the replies, "
        "their length or the labels A and B influence you. Answer \"tie\" only when neither "
        "reply is better.\n\nThe input is one JSON object: \"conversation\" holds the "
        "messages so far (ending with the user's message), \"answer_a\" and \"answer_b\" the "
        "two candidate replies."),
    reply_format='{"reason": "<one or two sentences>", "winner": "A" | "B" | "tie"}',
    reask=("Your previous reply was not a well-formed verdict ({problem}). Reply again with "
           "only the JSON object, exactly in this format:\n"
           '{"reason": "<one or two sentences>", "winner": "A" | "B" | "tie"}'),
)

SINGLE_V1 = Template(
    kind="single",
    version="single-v1",
    system=_SYSTEM,
    instructions=(
        "Grade the final assistant reply of the conversation below on a scale from 1 "
        "(useless or wrong) to 10 (excellent). Judge helpfulness, correctness, relevance, "
        "depth and clarity; earlier turns are context, and a later reply must stay "
        "consistent with them.\n\nThe input is one JSON object: \"conversation\" holds the "
        "messages, ending with the assistant reply to grade."),
    reply_format='{"reason": "<one or two sentences>", "score": <an integer from 1 to 10>}',
    reask=("Your previous reply was not a well-formed verdict ({problem}). Reply again with "
           "only the JSON object, exactly in this format:\n"
           '{"reason": "<one or two sentences>", "score": <an integer from 1 to 10>}'),
)

TEMPLATES = {t.version: t for t in (PAIRWISE_V1, SINGLE_V1)}
PAIRWISE = PAIRWISE_V1   # the current version of each kind
SINGLE = SINGLE_V1


def _plain(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def pairwise_messages(conversation: Sequence[dict[str, Any]], answer_a: str, answer_b: str,
                      template: Template = PAIRWISE) -> list[dict[str, str]]:
    """The judging request for: which of two replies to `conversation` (ending with a user
    message; earlier turns kept) is better."""
    if template.kind != "pairwise":
        raise ValueError(f"template {template.version} is not a pairwise template")
    return template.render({"conversation": _plain(conversation), "answer_a": answer_a,
                            "answer_b": answer_b})


def single_messages(conversation: Sequence[dict[str, Any]],
                    template: Template = SINGLE) -> list[dict[str, str]]:
    """The judging request for: a 1-10 grade of the last (assistant) message of
    `conversation`."""
    if template.kind != "single":
        raise ValueError(f"template {template.version} is not a single-answer template")
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("the conversation to grade must end with an assistant message")
    return template.render({"conversation": _plain(conversation)})


def reask_messages(messages: Sequence[dict[str, str]], bad_reply: str, problem: str,
                   template: Template) -> list[dict[str, str]]:
    """`messages` followed by the unusable reply and a request to answer in the format."""
    return [*messages, {"role": "assistant", "content": bad_reply},
            {"role": "user", "content": template.reask.replace("{problem}", problem)}]


def extract_payload(messages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The JSON input of a request made by `Template.render` (the first user message), with
    its `template` version; None when the messages hold none. Used by test servers."""
    for m in messages:
        if m.get("role") != "user" or not isinstance(m.get("content"), str):
            continue
        text = m["content"]
        start = text.find(f"\n{BEGIN}\n")
        end = text.find(f"\n{END}\n", start + 1)
        if start < 0 or end < 0:
            return None
        try:
            payload = json.loads(text[start + len(BEGIN) + 2:end])
        except json.JSONDecodeError:
            return None
        return payload if isinstance(payload, dict) and "template" in payload else None
    return None
