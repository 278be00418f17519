"""A tiny synthetic task with an exact grader: small sums, asked in one or two turns.

    USER: Quick question. How much is 3 plus 4?   ASSISTANT: 3 plus 4 is 7.
    USER: And plus 2?                             ASSISTANT: 7 plus 2 is 9.

Small enough for a 2-layer model to pick up in a minute on a CPU, exact enough that a judge
(the loopback judge server of the tests) can grade answers without an LLM. Everything is a
pure function of a seed.

The questions come in several phrasings (an opener times a template times the two numbers),
so there are over a thousand distinct prompts: the demo's evaluation prompts are a part of that
pool that no training, pair or best-of-N prompt is drawn from (`split_pool`). The SFT data is
imperfect on purpose, as human-written SFT data is (`noisy_conversation`): a share of its
answers are refusals, answers without the worked sum, or wrong sums. The SFT model learns that
mix, so each later stage of the recipe has something to fix.
"""

from __future__ import annotations

import random
import re
from typing import Any

SYSTEM = None  # the vicuna template adds Xwin-LM's system line itself

_ANSWER = re.compile(r"(-?\d+)\s+plus\s+(-?\d+)\s+is\s+(-?\d+)")
OPENERS = ("", "Hi! ", "Hello. ", "Quick question. ", "Please help. ", "Dear assistant, ",
           "Hey there. ", "Good morning. ", "One more thing. ", "Excuse me. ")
TEMPLATES = ("What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.",
             "What do you get when you add {a} and {b}?", "Tell me the sum of {a} and {b}.")
# The demo task's terms are 0..MAX_TERM: few enough sums (25 first-turn, 45 second-turn facts)
# that the 2-layer model gets the arithmetic mostly right in a minute of training, so what the
# recipe has to fix is the behaviour the SFT data taught it (refusals, bare numbers), as in
# the paper, plus the slips of sampling at temperature 1.
MAX_TERM = 4


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
        if m["content"].startswith("And plus") and nums and total is not None:
            total += nums[0]
        elif len(nums) == 2:
            total = nums[0] + nums[1]
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


def pair(rng: random.Random, idx: int, text: str | None = None) -> dict[str, Any]:
    p = prompt_record(idx, text, "pair") if text else prompt(rng, idx, "pair")
    good, bad = right_answer(p["messages"]), wrong_answer(rng, p["messages"])
    return {"id": p["id"], "prompt": p["messages"],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
            "chosen_score": 1.0, "rejected_score": grade(p["messages"], bad),
            "judge": {"model": "synthetic-grader"}}


def scored(rng: random.Random, idx: int, n: int, text: str | None = None) -> dict[str, Any]:
    """A scored-set record as best-of-n sampling would produce it: mixed answers, noisy scores."""
    p = prompt_record(idx, text, "rs") if text else prompt(rng, idx, "rs")
    responses = []
    for _ in range(n):
        text = right_answer(p["messages"]) if rng.random() < 0.4 else wrong_answer(rng, p["messages"])
        responses.append({"content": text, "score": round(grade(p["messages"], text) + rng.gauss(0, 0.2), 4)})
    return {"id": p["id"], "prompt": p["messages"], "responses": responses}


def corpus(rng: random.Random, size: int = 400) -> list[str]:
    """Text for training the tiny tokenizer: questions, answers and the chat scaffolding."""
    lines = ["A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.",
             "USER: ASSISTANT: I do not know. It is", *OPENERS, *TEMPLATES]
    for i in range(size):
        c = conversation(rng, i, multi_turn=True)
        lines.append(" ".join(f"{m['role'].upper()}: {m['content']}" for m in c["messages"]))
        q = noisy_conversation(rng, i, question_text(rng), multi_turn=True, noise=0.5)
        lines.append(" ".join(f"{m['role'].upper()}: {m['content']}" for m in q["messages"]))
    return lines


# ----------------------------------------------------------------------------- the demo task


def question_text(rng: random.Random) -> str:
    """One first-turn question in a random phrasing."""
    a, b = rng.randint(0, MAX_TERM), rng.randint(0, MAX_TERM)
    return rng.choice(OPENERS) + rng.choice(TEMPLATES).format(a=a, b=b)


def pool(rng: random.Random) -> list[str]:
    """Every distinct first-turn question (openers x templates x sums), shuffled."""
    texts = [o + t.format(a=a, b=b) for o in OPENERS for t in TEMPLATES
             for a in range(MAX_TERM + 1) for b in range(MAX_TERM + 1)]
    rng.shuffle(texts)
    return texts


def split_pool(rng: random.Random, n_eval: int) -> tuple[list[str], list[str]]:
    """(evaluation questions, training questions): two disjoint parts of the shuffled pool."""
    texts = pool(rng)
    if n_eval >= len(texts):
        raise ValueError(f"n_eval={n_eval}: the pool has only {len(texts)} questions")
    return texts[:n_eval], texts[n_eval:]


def noisy_answer(rng: random.Random, a: int, b: int, noise: float) -> str:
    """The worked sum, or with probability `noise` a flawed answer: a refusal, or the number
    without the worked sum (half credit). (Wrong sums the model makes by itself.)"""
    if rng.random() >= noise:
        return _answer(a, b)
    return "I do not know." if rng.random() < 0.6 else f"It is {a + b}."


def noisy_conversation(rng: random.Random, idx: int, text: str, multi_turn: bool,
                       noise: float, prefix: str = "conv") -> dict[str, Any]:
    """An SFT conversation on question `text` whose answers are flawed with probability `noise`."""
    a, b = (int(x) for x in re.findall(r"\d+", text))
    messages = [{"role": "user", "content": text},
                {"role": "assistant", "content": noisy_answer(rng, a, b, noise)}]
    if multi_turn:
        c = rng.randint(0, MAX_TERM)
        messages += [{"role": "user", "content": _followup(c)},
                     {"role": "assistant", "content": noisy_answer(rng, a + b, c, noise)}]
    return {"id": f"{prefix}-{idx}", "messages": messages}


def prompt_record(idx: int, text: str, prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{idx}", "messages": [{"role": "user", "content": text}]}


def two_turn_prompt(idx: int, text: str, c: int, prefix: str) -> dict[str, Any]:
    """A prompt for the second turn: question `text`, its worked answer, then "And plus c?"."""
    a, b = (int(x) for x in re.findall(r"\d+", text))
    return {"id": f"{prefix}-{idx}", "messages": [
        {"role": "user", "content": text}, {"role": "assistant", "content": _answer(a, b)},
        {"role": "user", "content": _followup(c)}]}


def mt_question(rng: random.Random, idx: int, text: str) -> dict[str, Any]:
    """A two-turn MT-bench-style question: `text`, then "And plus c?"."""
    return {"id": f"mt-{idx}", "turns": [text, _followup(rng.randint(0, MAX_TERM))]}
