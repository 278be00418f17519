"""The judge's cost before the run (issue 23, item 5): `xwin plan` prints each judge stage's
estimated requests, tokens and USD and the run's total; `xwin validate` warns, naming
judge.budgetUSD, when the estimate passes it (the budget caps the run as a whole)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from xwin_jobs.judge.cost import price_for
from xwin_operator.api.spec_io import parse_run
from xwin_operator.core.judge_estimate import (VERDICT_TOKENS, estimate_judging, pairwise_tokens,
                                               single_tokens)
from test_spec import MINIMAL

ROOT = Path(__file__).resolve().parents[1]
# MINIMAL's sft stage plus a judge and the two judge stages (their prompts in DATA)
RUN = MINIMAL.replace("  stages:\n", "  judge: {model: gpt-4-0613, budgetUSD: BUDGET}\n  stages:\n") + """\
    pairs: {prompts: file://DATA/pairs.jsonl, candidatesPerPrompt: 4, sampling: {maxTokens: 256}}
    rejectionSampling: {from: s3://m/rs/}
    dpo: {from: s3://m/dpo/}
    evaluate:
      models: [sft, rejectionSampling, dpo]
      sampling: {maxTokens: 256}
      alpacaEval: {prompts: file://DATA/alpaca, reference: sft}
      mtBench: {questions: file://DATA/mt.jsonl}
"""


def write_inputs(root: Path) -> None:
    line = json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n"
    (root / "pairs.jsonl").write_text(line * 10)
    (root / "alpaca").mkdir()
    (root / "alpaca" / "part-0.jsonl").write_text(line * 5)
    (root / "alpaca" / "part-1.jsonl").write_text(line * 3 + "\n")  # a blank line is no record
    (root / "mt.jsonl").write_text(line * 4)


def xwin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xwin_operator.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_requests_are_counted_as_the_stages_make_them(tmp_path):
    run = parse_run(RUN.replace("DATA", str(tmp_path)).replace("BUDGET", "100"))
    counts = {f"file://{tmp_path}/pairs.jsonl": 10, f"file://{tmp_path}/alpaca": 8,
              f"file://{tmp_path}/mt.jsonl": 4}
    pairs, evaluate = estimate_judging(run.spec, counts)
    assert pairs.requests == 10 * 4 * 3           # every pair of 4 candidates, both orders
    # AlpacaEval: 2 models (sft is the reference) x 8 prompts x 2 orders; MT-bench: 3 models x
    # 4 questions x 2 turns
    assert evaluate.requests == 2 * 8 * 2 + 3 * 4 * 2
    price = price_for("gpt-4-0613")
    assert pairs.completion_tokens == pairs.requests * VERDICT_TOKENS
    assert pairs.usd == price.cost(120 * pairwise_tokens(1, 128), 120 * VERDICT_TOKENS)
    assert single_tokens(2, 128) > single_tokens(1, 128)  # the second turn carries the first
    half = estimate_judging(parse_run(RUN.replace("DATA", str(tmp_path)).replace(
        "BUDGET", "100, mode: batch")).spec, counts)
    assert half[0].usd == pairs.usd / 2


def test_plan_prints_the_estimate_and_validate_warns_past_the_budget(tmp_path):
    write_inputs(tmp_path)
    f = tmp_path / "run.yaml"
    f.write_text(RUN.replace("DATA", str(tmp_path)).replace("BUDGET", "1"))
    plan = xwin("plan", str(f))
    assert plan.returncode == 0
    tail = plan.stdout[plan.stdout.index("# judge estimate"):]
    assert "pairs: 120 judge requests" in tail and "evaluate: 56 judge requests" in tail
    usd = [float(x.replace(",", "")) for x in re.findall(r"\$([0-9,.]+)", tail)[:3]]
    assert usd[2] == round(usd[0] + usd[1], 2) and "run total: 176 judge requests" in tail
    res = xwin("validate", str(f))
    assert res.returncode == 0  # a warning, not an error
    assert "warning: spec.judge.budgetUSD: 1 is below the run's estimated judging cost" in res.stderr
    f.write_text(RUN.replace("DATA", str(tmp_path)).replace("BUDGET", "1000"))
    assert "warning" not in xwin("validate", str(f)).stderr
    # an input that cannot be read here is named; --count gives its number
    s3 = RUN.replace("DATA", str(tmp_path)).replace("file://" + str(tmp_path) + "/pairs.jsonl",
                                                    "s3://data/p.jsonl").replace("BUDGET", "1000")
    f.write_text(s3)
    assert "pairs: not estimated: the records of s3://data/p.jsonl" in xwin("plan", str(f)).stdout
    assert "pairs: 120 judge requests" in xwin("plan", str(f), "--count", "s3://data/p.jsonl=10").stdout
