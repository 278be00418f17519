"""`scheduling.launcher: TrainJob`: every training child a Kubeflow Trainer v2 TrainJob, driven
by the same planner as PyTorchJobs (a real operator process, the test kubelet running the
TrainJobs): the run succeeds; a failed TrainJob is retried as a new attempt; suspend
suspends it and resume finishes; on a cluster without the TrainJob CRD the run says so
(condition and one Warning Event naming the field) and the operator keeps running."""

from __future__ import annotations

import asyncio
import time

from kube import Cluster, Kubelet, Outcome
from kube.fixtures import NS, cluster, create_run, kubelet_factory, operator_factory, tiny_run  # noqa: F401
from kube.harness import RUNS, OperatorProcess, complete_with_marker, created_names, events_of, run_status, \
    wait_phase, write_marker_for

TRAINJOBS = "trainer.kubeflow.org/v1alpha1/trainjobs"
LAUNCHER = {"launcher": "TrainJob", "trainingRuntime": "torch-distributed"}


def trainjob_run(name: str, tmp_path, **spec) -> dict:
    return tiny_run(name, storage={"uri": f"file://{tmp_path}/store"}, scheduling=dict(LAUNCHER), **spec)


def test_a_run_with_trainjobs_succeeds_and_retries_a_failed_one(cluster, kubelet_factory, operator_factory, tmp_path):
    failed_once: set[str] = set()

    async def fail_sft_once(child: dict) -> Outcome:
        stage = child["metadata"]["labels"]["xwin.ai/stage"]
        if stage == "sft" and not failed_once:
            failed_once.add(child["metadata"]["name"])
            return Outcome("Failed", 1, "first attempt fails")
        await asyncio.to_thread(write_marker_for, child)
        return Outcome()

    kubelet_factory(instant=fail_sft_once)
    op = operator_factory(env={"XWIN_BACKOFF_SECONDS": "0.2"})
    create_run(cluster, trainjob_run("tj", tmp_path))
    status = wait_phase(cluster, NS, "tj", timeout=60, operator=op)
    kinds = {res for res, _ in created_names(cluster, NS)}
    assert kinds == {"trainjobs"}, kinds  # no PyTorchJob at all
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert sft["attempts"] == 2 and sft["children"] == ["TrainJob/tj-sft-1", "TrainJob/tj-sft-2"]
    assert failed_once == {"tj-sft-1"}
    job = cluster.get(TRAINJOBS, NS, "tj-sft-2")
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    # Events are posted in the background (best effort): wait for the run's last one first
    cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, "tj")),
                     timeout=10, what="the RunSucceeded Event")
    assert any(e["reason"] == "StageAttemptFailed" for e in events_of(cluster, NS, "tj"))


def test_suspend_suspends_the_trainjob_and_resume_finishes(cluster, kubelet_factory, operator_factory, tmp_path):
    release = asyncio.Event()

    async def wait_for_release(child: dict) -> Outcome:
        while not release.is_set():
            await asyncio.sleep(0.05)
        await asyncio.to_thread(write_marker_for, child)
        return Outcome()

    kubelet_factory(instant=wait_for_release)
    op = operator_factory()
    create_run(cluster, trainjob_run("tjs", tmp_path))
    cluster.wait_for(lambda: cluster.get(TRAINJOBS, NS, "tjs-sft-1"), timeout=30, what="the sft TrainJob")
    cluster.patch(RUNS, NS, "tjs", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: (cluster.get(TRAINJOBS, NS, "tjs-sft-1") or {}).get("spec", {}).get("suspend") is True,
                     timeout=30, what="the TrainJob suspended")
    status = wait_phase(cluster, NS, "tjs", phases=("Suspended",), timeout=30, operator=op)
    assert status["phase"] == "Suspended"
    cluster.patch(RUNS, NS, "tjs", {"spec": {"suspend": False}})
    cluster.call(lambda: asyncio.sleep(0, release.set()))
    wait_phase(cluster, NS, "tjs", timeout=60, operator=op)
    assert cluster.get(TRAINJOBS, NS, "tjs-sft-1")["spec"]["suspend"] is False


def test_without_the_trainjob_crd_the_run_says_so_once(tmp_path):
    from xwin_operator.api.crd import crd

    with Cluster(namespaces=(NS,), crds=(crd(),), without=(TRAINJOBS,)) as c:
        kubelet = Kubelet(c, work=tmp_path / "node", namespace=NS, instant=complete_with_marker()).start()
        op = OperatorProcess(c, tmp_path / "operator", namespace=NS, interval=0.3).start()
        try:
            c.create(RUNS, trainjob_run("nocrd", tmp_path))
            status = c.wait_for(lambda: (lambda s: s if any(x["type"] == "Progressing" for x in s.get("conditions") or [])
                                         else None)(run_status(c, NS, "nocrd")), timeout=30, what="a Progressing condition")
            cond = next(x for x in status["conditions"] if x["type"] == "Progressing")
            assert status["phase"] == "Pending" and cond["reason"] == "LauncherNotInstalled"
            assert "trainjobs.trainer.kubeflow.org" in cond["message"] and "spec.scheduling.launcher" in cond["message"]
            time.sleep(1.5)  # several resyncs
            warnings = [e["reason"] for e in events_of(c, NS, "nocrd") if e["type"] == "Warning"]
            assert warnings == ["LauncherNotInstalled"]
            assert op.alive and "Traceback" not in op.output()
        finally:
            op.stop()
            kubelet.stop()
