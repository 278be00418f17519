"""Parsing judge replies into verdicts: strict, never guessing.

A reply is accepted only when it is one JSON object (optionally inside a single ```json
fence, as chat models often add) with the fields the template asked for:

- pairwise: `winner` is "A", "B" or "tie" (case-insensitive); `reason` optional text;
- single: `score` a number from 1 to 10 (not a boolean, not a string); `reason` optional.

Anything else (prose around the JSON, two objects, duplicate keys, a missing or misspelt
field, "A or B", a score of 11) is `Unparseable` with the problem in words, so the caller can
re-ask a bounded number of times and then record the comparison as unparseable.

Pure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Union

_FENCE = re.compile(r"^```(?:json|JSON)?[ \t]*\n(.*)\n[ \t]*```$", re.DOTALL)
MAX_REASON = 4000


@dataclass(frozen=True)
class PairwiseVerdict:
    winner: str          # "A" | "B" | "tie"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "reason": self.reason}


@dataclass(frozen=True)
class SingleVerdict:
    score: float         # 1..10
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "reason": self.reason}


@dataclass(frozen=True)
class Unparseable:
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return {"problem": self.problem}


Verdict = Union[PairwiseVerdict, SingleVerdict]
Parsed = Union[PairwiseVerdict, SingleVerdict, Unparseable]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_object(text: Any) -> dict[str, Any] | Unparseable:
    if not isinstance(text, str):
        return Unparseable("the reply has no text")
    body = text.strip()
    if not body:
        return Unparseable("the reply is empty")
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        return Unparseable(f"the JSON object has the key '{e}' twice")
    except json.JSONDecodeError as e:
        return Unparseable(f"not a single JSON object ({e.msg} at line {e.lineno} "
                           f"column {e.colno})")
    if not isinstance(obj, dict):
        return Unparseable(f"the reply is JSON but a {type(obj).__name__}, not an object")
    return obj


def _reason(obj: dict[str, Any]) -> str | Unparseable:
    reason = obj.get("reason", "")
    if reason is None:
        return ""
    if not isinstance(reason, str):
        return Unparseable("'reason' must be a string")
    return reason[:MAX_REASON]


def parse_pairwise(text: Any) -> PairwiseVerdict | Unparseable:
    """A pairwise verdict (`winner` A | B | tie) or Unparseable."""
    obj = _json_object(text)
    if isinstance(obj, Unparseable):
        return obj
    if "winner" not in obj:
        return Unparseable("the JSON object has no 'winner'")
    winner = obj["winner"]
    if not isinstance(winner, str):
        return Unparseable("'winner' must be the string \"A\", \"B\" or \"tie\"")
    normal = {"a": "A", "b": "B", "tie": "tie"}.get(winner.strip().lower())
    if normal is None:
        return Unparseable(f"'winner' is {winner[:40]!r}; it must be \"A\", \"B\" or \"tie\"")
    reason = _reason(obj)
    if isinstance(reason, Unparseable):
        return reason
    return PairwiseVerdict(normal, reason)


def parse_single(text: Any) -> SingleVerdict | Unparseable:
    """A 1-10 grade (`score`) or Unparseable."""
    obj = _json_object(text)
    if isinstance(obj, Unparseable):
        return obj
    if "score" not in obj:
        return Unparseable("the JSON object has no 'score'")
    score = obj["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return Unparseable("'score' must be a number from 1 to 10")
    if not 1 <= score <= 10:
        return Unparseable(f"'score' is {score}; it must be from 1 to 10")
    reason = _reason(obj)
    if isinstance(reason, Unparseable):
        return reason
    return SingleVerdict(float(score), reason)


PARSERS = {"pairwise": parse_pairwise, "single": parse_single}


def parse_verdict(kind: str, text: Any) -> Parsed:
    try:
        return PARSERS[kind](text)
    except KeyError:
        raise ValueError(f"unknown verdict kind {kind!r} (pairwise | single)") from None


def verdict_from_dict(kind: str, d: dict[str, Any] | None) -> Parsed:
    """A verdict stored by `to_dict` (in the cache) back as an object."""
    if not d or "problem" in d:
        return Unparseable(str((d or {}).get("problem", "no verdict")))
    if kind == "pairwise":
        return PairwiseVerdict(str(d["winner"]), str(d.get("reason", "")))
    return SingleVerdict(float(d["score"]), str(d.get("reason", "")))
