"""What a run's judging will cost, before it runs (issue 23, item 5). Pure.

`estimate_judging(spec, counts)` gives, for each judge stage (pairs, evaluate), the requests
the judge will be asked, their prompt and completion tokens and the USD at the judge model's
price (`xwin_jobs.judge.cost`, half in batch mode), from the spec and the number of records of
its input files (`counts`: URI -> records, None where unknown). The requests are counted as the
stages make them: pairs asks every pair of a prompt's candidates in both orders; evaluate asks
each model (the reference model excepted) every AlpacaEval prompt against the reference in both
orders and grades both turns of every MT-bench question. Tokens are estimated as the judge
client estimates them (a third of the bytes: on the high side), with the assumptions below;
re-asks of unparseable replies are not counted. `xwin plan` prints it, `xwin validate` warns
when the run's total passes `judge.budgetUSD` (which caps the run as a whole at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from xwin_jobs.judge.cost import estimate_prompt_tokens, price_for
from xwin_jobs.judge.templates import pairwise_messages, single_messages

from ..api.spec import AlignmentRunSpec, resolved_sampling

QUESTION_TOKENS = 150   # a user turn
ANSWER_SHARE = 0.5      # an answer's length, as a share of the stage's sampling.maxTokens
VERDICT_TOKENS = 200    # the judge's reply (its explanation and verdict)
BYTES_PER_TOKEN = 3     # the client's estimate (estimate_prompt_tokens)


@dataclass
class JudgeEstimate:
    stage: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    unknown: list[str] = field(default_factory=list)  # inputs whose record count is unknown

    @property
    def known(self) -> bool:
        return not self.unknown

    def add(self, requests: int, prompt_tokens_each: int, price, batch: bool) -> None:
        completion = requests * VERDICT_TOKENS
        prompt = requests * prompt_tokens_each
        self.requests += requests
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.usd += price.cost(prompt, completion, batch=batch)

    def describe(self) -> str:
        if self.unknown and not self.requests:
            return (f"{self.stage}: not estimated: the records of {', '.join(self.unknown)} cannot be "
                    f"read here (give their number: --count URI=N)")
        text = (f"{self.stage}: {self.requests:,} judge requests, {self.prompt_tokens:,} prompt + "
                f"{self.completion_tokens:,} completion tokens, ${self.usd:,.2f}")
        if self.unknown:
            text += f" for the inputs counted; not counted (unreadable here): {', '.join(self.unknown)}"
        return text


def _text(tokens: int) -> str:
    return "x" * (tokens * BYTES_PER_TOKEN)


def _conversation(turns: int, answer_tokens: int) -> list[dict[str, str]]:
    conv: list[dict[str, str]] = []
    for turn in range(turns):
        conv.append({"role": "user", "content": _text(QUESTION_TOKENS)})
        if turn < turns - 1:
            conv.append({"role": "assistant", "content": _text(answer_tokens)})
    return conv


def pairwise_tokens(turns: int, answer_tokens: int) -> int:
    return estimate_prompt_tokens(pairwise_messages(_conversation(turns, answer_tokens),
                                                    _text(answer_tokens), _text(answer_tokens)))


def single_tokens(turns: int, answer_tokens: int) -> int:
    conv = _conversation(turns, answer_tokens) + [{"role": "assistant", "content": _text(answer_tokens)}]
    return estimate_prompt_tokens(single_messages(conv))


def _count(counts: Mapping[str, int | None], uri: str | None, est: JudgeEstimate) -> int:
    n = counts.get(uri) if uri else None
    if n is None:
        est.unknown.append(uri or "?")
        return 0
    return int(n)


def estimate_judging(spec: AlignmentRunSpec, counts: Mapping[str, int | None]) -> list[JudgeEstimate]:
    """One JudgeEstimate per judge stage of the run that runs (not reused), in pipeline order."""
    if spec.judge is None:
        return []
    price, batch = price_for(spec.judge.model), spec.judge.mode == "batch"
    out = []
    pairs = spec.stages.pairs
    if pairs is not None and not pairs.reused:
        est = JudgeEstimate("pairs")
        answer = int(resolved_sampling(spec, pairs)["maxTokens"] * ANSWER_SHARE)
        k = pairs.candidatesPerPrompt
        est.add(_count(counts, pairs.prompts, est) * k * (k - 1), pairwise_tokens(1, answer), price, batch)
        out.append(est)
    ev = spec.stages.evaluate
    if ev is not None and not ev.reused:
        est = JudgeEstimate("evaluate")
        answer = int(resolved_sampling(spec, ev)["maxTokens"] * ANSWER_SHARE)
        if ev.alpacaEval:
            judged = [m for m in ev.models if m != ev.alpacaEval.reference]
            est.add(_count(counts, ev.alpacaEval.prompts, est) * 2 * len(judged),
                    pairwise_tokens(1, answer), price, batch)
        if ev.mtBench:
            questions = _count(counts, ev.mtBench.questions, est) * len(ev.models)
            est.add(questions, single_tokens(1, answer), price, batch)
            est.add(questions, single_tokens(2, answer), price, batch)
        out.append(est)
    return out


def judge_inputs(spec: AlignmentRunSpec) -> list[str]:
    """The URIs whose record counts an estimate needs."""
    uris = []
    if spec.stages.pairs is not None and not spec.stages.pairs.reused and spec.stages.pairs.prompts:
        uris.append(spec.stages.pairs.prompts)
    ev = spec.stages.evaluate
    if ev is not None and not ev.reused:
        uris += [x.prompts for x in [ev.alpacaEval] if x] + [x.questions for x in [ev.mtBench] if x]
    return uris


def budget_warning(spec: AlignmentRunSpec, estimates: list[JudgeEstimate]) -> str | None:
    """A warning naming judge.budgetUSD when the run's estimated judging passes it."""
    if spec.judge is None or spec.judge.budgetUSD is None or not estimates:
        return None
    total = sum(e.usd for e in estimates)
    if total <= spec.judge.budgetUSD:
        return None
    partial = "" if all(e.known for e in estimates) else " (for the inputs counted; more for the rest)"
    return (f"spec.judge.budgetUSD: {spec.judge.budgetUSD:g} is below the run's estimated judging "
            f"cost ${total:,.2f}{partial} ("
            + "; ".join(f"{e.stage} ${e.usd:,.2f}" for e in estimates)
            + "): the run would stop at a judge stage once the budget is spent")


def summary_lines(estimates: list[JudgeEstimate], budget: Any = None) -> list[str]:
    lines = [e.describe() for e in estimates]
    if estimates:
        total = sum(e.usd for e in estimates)
        cap = "no budgetUSD" if budget is None else f"budgetUSD {budget:g} (run-wide)"
        which = "run total" if all(e.known for e in estimates) else "run total of the inputs counted"
        lines.append(f"{which}: {sum(e.requests for e in estimates):,} judge requests, "
                     f"${total:,.2f}; {cap}")
    return lines
