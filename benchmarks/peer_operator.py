"""The 'same calls' peer of bench_operator.py: a minimal kopf operator that makes exactly the
API calls the xwin operator makes for a one-stage run, with none of its logic.

    kopf run --standalone -n NS benchmarks/peer_operator.py

Per run, as xwin_operator does: on the run's first event, create one PyTorchJob (labelled and
owned like ours), patch the run's status to Running and post a StageStarted Event; when that
PyTorchJob reports Succeeded, patch the status to Succeeded and post StageSucceeded and
RunSucceeded. Same kopf settings (standalone, watch-event handlers only, no annotations), same
API client and login (xwin_operator.kube.client.KubeApi: the official `kubernetes` client in worker
threads; kopf logged in through xwin_operator.kube.kubeconfig). Nothing else: no spec parsing, no planner, no stage
markers, no indexes, no resync, no retries. It is what any kopf operator doing this job must
at least cost, so `xwin / peer` is the price of our logic, and `peer / no-op` the price of the
API work itself.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from xwin_operator.kube.client import KubeApi
from xwin_operator.kube.kubeconfig import MemFiles, load_login

MANAGED = {"app.kubernetes.io/managed-by": "xwin-operator"}


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """No diff-base: only change-detection handlers read it and there are none (as ours)."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="xwin.ai")
    settings.persistence.diffbase_storage = NoDiffBase(prefix="xwin.ai", key="last-handled-configuration")
    settings.persistence.finalizer = "xwin.ai/finalizer"
    settings.posting.level = logging.WARNING
    memo.api = KubeApi(lambda: load_login(MEMFILES))


MEMFILES = MemFiles()


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(**load_login(MEMFILES).connection_info())


def involved(body: Any) -> dict:
    meta = body["metadata"]
    return {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "name": meta["name"],
            "namespace": meta["namespace"], "uid": meta["uid"]}


def _new_run(type: str | None, body: Any, **_: Any) -> bool:
    return type in (None, "ADDED") and not (body.get("status") or {}).get("phase")


@kopf.on.event("xwin.ai", "v1alpha1", "alignmentruns", when=_new_run)
async def run_added(body: Any, name: str, namespace: str, uid: str, memo: kopf.Memo, **_: Any) -> None:
    labels = {**MANAGED, "xwin.ai/run": name, "xwin.ai/stage": "sft", "xwin.ai/step": "train",
              "xwin.ai/attempt": "1"}
    pod = {"metadata": {"labels": labels},
           "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "pytorch", "image": "trainer",
                                    "command": ["python", "-m", "xwin_jobs", "sft"]}]}}
    await memo.api.create({
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": f"{name}-sft-1", "namespace": namespace, "labels": labels,
                     "ownerReferences": [{"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun",
                                          "name": name, "uid": uid, "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "ExitCode",
                                                    "template": pod}}}})
    await memo.api.patch_status(namespace, name, {"phase": "Running", "stage": "sft"})
    await memo.api.post_event(involved(body), "StageStarted", "stage sft started")


def _succeeded(body: Any, **_: Any) -> bool:
    return any(c.get("type") == "Succeeded" and c.get("status") == "True"
               for c in (body.get("status") or {}).get("conditions") or [])


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=MANAGED, when=_succeeded)
async def child_succeeded(body: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    owner = body["metadata"]["ownerReferences"][0]
    run = {"metadata": {"name": owner["name"], "namespace": namespace, "uid": owner["uid"]}}
    await memo.api.patch_status(namespace, owner["name"], {"phase": "Succeeded", "stage": None})
    await memo.api.post_event(involved(run), "StageSucceeded", "stage sft succeeded")
    await memo.api.post_event(involved(run), "RunSucceeded", "run succeeded")
