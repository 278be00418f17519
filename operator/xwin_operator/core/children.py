# The children the planner plans, typed: names, labels and kinds of a step's objects, and
# `PlannedChild`, which each executor renders (kube/ into a manifest, local/ into a process). Pure.
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from xwin_jobs.task import StageTask

from ..api.spec import API_GROUP, AlignmentRun
from .steps import Step

MANAGED_BY = "xwin-operator"
LABEL_RUN, LABEL_STAGE, LABEL_STEP, LABEL_ATTEMPT = (f"{API_GROUP}/run", f"{API_GROUP}/stage",
                                                     f"{API_GROUP}/step", f"{API_GROUP}/attempt")
# set by the operator on a child it suspended itself (spec.suspend): only those it resumes
# (Kueue suspends children of a queue until it admits them); and on a child it stopped
# because it never started (scheduling.pendingTimeoutSeconds): {"reason", "message", "at"}
ANNOTATION_SUSPENDED, ANNOTATION_FAILED = f"{API_GROUP}/suspended-by", f"{API_GROUP}/failed"
MAX_CHILD_NAME = 52  # leaves room for the "-worker-NNNN" replica names the Training Operator derives
# What a PyTorchJob replica runs before `<job> --task ...` (`xwin run` runs the same).
TRAIN_LAUNCHER = ("python", "-m", "xwin_jobs.launch", "-m", "xwin_jobs")
STEP_KINDS = {"train": "PyTorchJob", "job": "Job", "serve": "Deployment"}


def dns_name(raw: str, limit: int = MAX_CHILD_NAME) -> str:
    """A DNS-1035 label (what Services and PyTorchJobs need): lowercase alphanumerics and '-',
    starting with a letter, at most `limit` characters; shortened with a hash of `raw`."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = "x-" + name
    if len(name) > limit:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = name[:limit - 9].rstrip("-") + "-" + digest
    return name


def child_name(run_name: str, stage: str, step: str, attempt: int) -> str:
    """`<run>-<stage>[-<step>]-<attempt>` (the step omitted for a stage's only `train` step)."""
    parts = [run_name, stage] + ([] if step == "train" else [step]) + [str(attempt)]
    return dns_name("-".join(parts))


def child_labels(run: AlignmentRun, stage: str, step: str, attempt: int) -> dict[str, str]:
    return {LABEL_RUN: run.metadata.name, LABEL_STAGE: stage, LABEL_STEP: step,
            LABEL_ATTEMPT: str(attempt), "app.kubernetes.io/managed-by": MANAGED_BY}


def step_kind(run: AlignmentRun, kind: str) -> str:
    """The child kind of a step kind (`train` follows `spec.scheduling.launcher`)."""
    return run.spec.scheduling.launcher if kind == "train" else STEP_KINDS[kind]


def step_kinds(run: AlignmentRun, step: Step) -> tuple[str, ...]:
    """The kinds of the objects of one step, in creation order (a server: Deployment, Service)."""
    kind = step_kind(run, step.kind)
    return (kind, "Service") if step.kind == "serve" else (kind,)


@dataclass(frozen=True)
class PlannedChild:
    """One object the planner wants to exist: what kind of work, for which stage, step and
    attempt, under which name and labels, doing which task (its pods sized by the settings
    the task carries). kube/ renders it into a manifest (kube.manifests.render), local/ into a
    process (local.children); neither recomputes its identity."""

    kind: str                 # PyTorchJob | TrainJob | Job | Deployment | Service
    stage: str
    step: Step
    attempt: int
    name: str
    labels: dict[str, str]
    task: StageTask
    server: str | None = None   # a sample step's: the Service of its serve step (same attempt)


def planned_children(run: AlignmentRun, stage: str, step: Step, attempt: int,
                     task: StageTask) -> list[PlannedChild]:
    """Every object of one step's attempt, in creation order."""
    name = child_name(run.metadata.name, stage, step.name, attempt)
    labels = child_labels(run, stage, step.name, attempt)
    server = child_name(run.metadata.name, stage, step.served_by, attempt) if step.served_by else None
    return [PlannedChild(kind, stage, step, attempt, name, labels, task, server) for kind in step_kinds(run, step)]
