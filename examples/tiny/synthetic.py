"""A tiny synthetic task with an exact grader: small sums, asked in one or two turns.

    USER: What is 3 plus 4?          ASSISTANT: 3 plus 4 is 7.
    USER: And plus 2?                ASSISTANT: 7 plus 2 is 9.

Small enough for a 2-layer model to pick up in a minute on a CPU, exact enough that a judge
(the loopback judge server of the tests) can grade answers without an LLM. Everything is a
pure function of a seed.
"""

from __future__ import annotations

import random
import re
from typing import Any

SYSTEM = None  # the vicuna template adds Xwin-LM's system line itself

_ANSWER = re.compile(r"(-?\d+)\s+plus\s+(-?\d+)\s+is\s+(-?\d+)")


def _question(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def _answer(a: int, b: int) -> str:
    return f"{a} plus {b} is {a + b}."


def _followup(c: int) -> str:
    return f"And plus {c}?"


def conversation(rng: random.Random, idx: int, multi_turn: bool) -> dict[str, Any]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    messages = [{"role": "user", "content": _question(a, b)},
                {"role": "assistant", "content": _answer(a, b)}]
    if multi_turn:
        c = rng.randint(0, 9)
        messages += [{"role": "user", "content": _followup(c)},
                     {"role": "assistant", "content": _answer(a + b, c)}]
    return {"id": f"conv-{idx}", "messages": messages}


def prompt(rng: random.Random, idx: int, prefix: str = "prompt") -> dict[str, Any]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"id": f"{prefix}-{idx}", "messages": [{"role": "user", "content": _question(a, b)}]}


def expected_sum(messages: list[dict[str, Any]]) -> int | None:
    """The correct final number for a conversation's last user turn."""
    total = None
    for m in messages:
        if m["role"] != "user":
            continue
        nums = [int(x) for x in re.findall(r"-?\d+", m["content"])]
        if m["content"].startswith("What is") and len(nums) == 2:
            total = nums[0] + nums[1]
        elif m["content"].startswith("And plus") and nums and total is not None:
            total += nums[0]
    return total


def grade(prompt_messages: list[dict[str, Any]], response: str) -> float:
    """1.0 for a well-formed correct answer, 0.5 for the right number in a wrong form, else 0."""
    want = expected_sum(prompt_messages)
    if want is None:
        return 0.0
    m = _ANSWER.search(response)
    if m and int(m.group(3)) == want and int(m.group(1)) + int(m.group(2)) == want:
        return 1.0
    nums = re.findall(r"-?\d+", response)
    return 0.5 if nums and int(nums[-1]) == want else 0.0


def wrong_answer(rng: random.Random, prompt_messages: list[dict[str, Any]]) -> str:
    want = expected_sum(prompt_messages) or 0
    styles = [lambda: f"It is {want + rng.randint(1, 5)}.", lambda: "I do not know.",
              lambda: f"{want} plus {rng.randint(1, 9)} is {want + rng.randint(10, 20)}."]
    return rng.choice(styles)()


def right_answer(prompt_messages: list[dict[str, Any]]) -> str:
    nums = [int(x) for x in re.findall(r"-?\d+", prompt_messages[0]["content"])]
    return _answer(nums[0], nums[1])


def pair(rng: random.Random, idx: int) -> dict[str, Any]:
    p = prompt(rng, idx, "pair")
    good, bad = right_answer(p["messages"]), wrong_answer(rng, p["messages"])
    return {"id": p["id"], "prompt": p["messages"],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
            "chosen_score": 1.0, "rejected_score": grade(p["messages"], bad),
            "judge": {"model": "synthetic-grader"}}


def scored(rng: random.Random, idx: int, n: int) -> dict[str, Any]:
    """A scored-set record as best-of-n sampling would produce it: mixed answers, noisy scores."""
    p = prompt(rng, idx, "rs")
    responses = []
    for _ in range(n):
        text = right_answer(p["messages"]) if rng.random() < 0.4 else wrong_answer(rng, p["messages"])
        responses.append({"content": text, "score": round(grade(p["messages"], text) + rng.gauss(0, 0.2), 4)})
    return {"id": p["id"], "prompt": p["messages"], "responses": responses}


def corpus(rng: random.Random, size: int = 400) -> list[str]:
    """Text for training the tiny tokenizer: questions, answers and the chat scaffolding."""
    lines = ["A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.",
             "USER: ASSISTANT: I do not know. It is"]
    for i in range(size):
        c = conversation(rng, i, multi_turn=True)
        lines.append(" ".join(f"{m['role'].upper()}: {m['content']}" for m in c["messages"]))
    return lines
