"""The 'same calls' peer of bench_operator.py: a minimal kopf operator that makes exactly the
API calls the xwin operator makes for a one-stage run, with none of its logic.

    kopf run --standalone -n NS benchmarks/peer_operator.py

Per run, as xwin_operator does: on the run's first event, add a finalizer (ours is kopf's, held
by the run's daemon), create one PyTorchJob (labelled and owned like ours), patch the run's
status to Running and post a StageStarted Event; when that PyTorchJob reports Succeeded, patch
the status to Succeeded, post StageSucceeded and RunSucceeded, and remove the finalizer. It
watches what ours watches (the five child kinds, their pods, Kueue's Workloads) into indexes.
PEER_CALLS=before drops the finalizer and the extra watches (the calls before issue 21). Same kopf settings (standalone, watch-event handlers only, no annotations), same
API client and login (xwin_operator.kube.client.KubeApi: the official `kubernetes` client in worker
threads; kopf logged in through xwin_operator.kube.kubeconfig). Nothing else: no spec parsing, no planner, no stage
markers, no daemons, no resync, no retries. It is what any kopf operator doing this job must
at least cost, so `xwin / peer` is the price of our logic, and `peer / no-op` the price of the
API work itself.

The bodies are ours too (PEER_BODIES=same, the default): the PyTorchJob and the status patches
are the xwin operator's own for the first run the peer sees (rendered once, with our planner
and manifests), then copied with each run's name and uid. The pod needs what the manifest
carries (the stage task, security context, volumes), and `kubectl get ar` shows the status, so
a job like ours costs those bytes on every watch whoever sends them: with PEER_BODIES=small (a
bare 0.9 KB PyTorchJob, a 48-byte status) the API server and the watches carry half the bytes
per run, which is not the price of our logic.
"""

from __future__ import annotations

import copy
import logging
import os
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


SAME_BODIES = os.environ.get("PEER_BODIES", "same") == "same"
# PEER_CALLS=before: the calls of the operator before issue 21 (no finalizer; runs and
# PyTorchJobs watched only), for comparing with the rows measured then
SAME_CALLS = os.environ.get("PEER_CALLS", "same") == "same"
TEMPLATES: dict[str, Any] = {}


def small_bodies(name: str, namespace: str, uid: str) -> tuple[dict, dict, dict]:
    """A bare PyTorchJob and one-field status patches (PEER_BODIES=small)."""
    labels = {**MANAGED, "xwin.ai/run": name, "xwin.ai/stage": "sft", "xwin.ai/step": "train",
              "xwin.ai/attempt": "1"}
    pod = {"metadata": {"labels": labels},
           "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "pytorch", "image": "trainer",
                                    "command": ["python", "-m", "xwin_jobs", "sft"]}]}}
    job = {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": f"{name}-sft-1", "namespace": namespace, "labels": labels,
                     "ownerReferences": [{"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun",
                                          "name": name, "uid": uid, "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "ExitCode",
                                                    "template": pod}}}}
    return job, {"phase": "Running", "stage": "sft"}, {"phase": "Succeeded", "stage": None}


def our_bodies(body: Any) -> tuple[dict, dict, dict]:
    """The xwin operator's PyTorchJob and Running status patch for `body` (its planner and
    manifests, as its first reconcile makes them), and a Succeeded patch of the same shape."""
    from xwin_operator.core.config import OperatorConfig
    from xwin_operator.core.planner import decide
    from xwin_operator.core.types import CreateChild, Observed, PatchStatus, now_iso
    from xwin_operator.kube.manifests import render
    from xwin_operator.kube.run_body import parse_run

    config = OperatorConfig.from_env()
    run, _ = parse_run(body, None, 1, now_iso())
    actions = decide(run, Observed(children=[], markers={}, now=now_iso()), None, generation=1, config=config)
    child = next(a.child for a in actions if isinstance(a, CreateChild))
    running = next(a.status for a in actions if isinstance(a, PatchStatus))
    done = copy.deepcopy(running)
    done["phase"] = "Succeeded"
    for stage in done.get("stages") or []:
        stage["phase"] = "Succeeded"
    return render(run, child, body["metadata"]["uid"], config), running, done


def bodies(body: Any, name: str, namespace: str, uid: str) -> tuple[dict, dict, dict]:
    """This run's PyTorchJob and status patches: ours rendered once, then renamed per run."""
    if not SAME_BODIES:
        return small_bodies(name, namespace, uid)
    if not TEMPLATES:
        TEMPLATES["job"], TEMPLATES["running"], TEMPLATES["done"] = our_bodies(body)
    job = copy.deepcopy(TEMPLATES["job"])
    meta = job["metadata"]
    meta["name"], meta["namespace"] = f"{name}-sft-1", namespace
    meta["labels"]["xwin.ai/run"] = name
    meta["ownerReferences"][0].update(name=name, uid=uid)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["metadata"]["labels"]["xwin.ai/run"] = name
    return job, TEMPLATES["running"], TEMPLATES["done"]


# The xwin operator's run daemon holds kopf's finalizer while the run is unfinished (kopf adds it
# before the daemon starts and removes it once the run is Succeeded): the same two writes here,
# under another name (kopf would take its own as a leftover to remove at once).
FINALIZER = "xwin.ai/peer-finalizer"


async def set_finalizers(api: KubeApi, namespace: str, name: str, finalizers: list[str]) -> None:
    await api.request("patch", f"/apis/xwin.ai/v1alpha1/namespaces/{namespace}/alignmentruns/{name}",
                      {"metadata": {"finalizers": finalizers}}, content_type="application/merge-patch+json",
                      reply=False)


@kopf.on.event("xwin.ai", "v1alpha1", "alignmentruns", when=_new_run)
async def run_added(body: Any, name: str, namespace: str, uid: str, memo: kopf.Memo, **_: Any) -> None:
    job, running, _done = bodies(body, name, namespace, uid)
    if SAME_CALLS:
        await set_finalizers(memo.api, namespace, name, [FINALIZER])
    await memo.api.create(job)
    await memo.api.patch_status(namespace, name, running)
    await memo.api.post_event(involved(body), "StageStarted", "stage sft started")


def _succeeded(body: Any, **_: Any) -> bool:
    return any(c.get("type") == "Succeeded" and c.get("status") == "True"
               for c in (body.get("status") or {}).get("conditions") or [])


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=MANAGED, when=_succeeded)
async def child_succeeded(body: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    owner = body["metadata"]["ownerReferences"][0]
    run = {"metadata": {"name": owner["name"], "namespace": namespace, "uid": owner["uid"]}}
    done = TEMPLATES["done"] if SAME_BODIES else {"phase": "Succeeded", "stage": None}
    await memo.api.patch_status(namespace, owner["name"], done)
    await memo.api.post_event(involved(run), "StageSucceeded", "stage sft succeeded")
    await memo.api.post_event(involved(run), "RunSucceeded", "run succeeded")
    if SAME_CALLS:
        await set_finalizers(memo.api, namespace, owner["name"], [])


# The xwin operator watches every kind of child it makes, their pods and Kueue's Workloads (the
# streams it needs to see a run's state): the same watches here, each kept in a plain index.
async def _kept(namespace: str | None, name: str, labels: Any, **_: Any) -> dict:
    return {(namespace, labels.get("xwin.ai/run")): name}


if SAME_CALLS:
    for _group, _version, _plural in (("kubeflow.org", "v1", "pytorchjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
                                      ("batch", "v1", "jobs"), ("apps", "v1", "deployments"), ("", "v1", "services"),
                                      ("", "v1", "pods")):
        kopf.index(_group, _version, _plural, labels=MANAGED, id=f"peer_{_plural}")(_kept)
    kopf.index("kueue.x-k8s.io", "v1beta1", "workloads", id="peer_workloads")(_kept)
