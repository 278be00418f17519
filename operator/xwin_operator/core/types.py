"""The planner's vocabulary: phases (Phase), what was observed (ChildState, Observed), what
to do (the actions), and what it concluded per stage (StagePlan, frozen). Pure data; see
planner.py for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Mapping, Union

from .children import PlannedChild

try:
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour
    class StrEnum(str, Enum):  # type: ignore[no-redef]
        __str__ = str.__str__
        __format__ = str.__format__


class Phase(StrEnum):
    """A phase of a child (Pending, Running, Succeeded, Failed), a stage (also Suspended and
    Skipped: reused with `from:`) or a run (also Suspended). One enum: the words mean the same
    at each level (a stage runs while its child runs, a run's phase is its stages'). A member
    equals its string, so it compares with the phases of status dicts and Kubernetes objects;
    what is written (status, patches, files) carries `.value`, a plain str (yaml.safe_dump
    refuses enum members)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    SKIPPED = "Skipped"



# --- what was observed ------------------------------------------------------------------

# Why a child's pods cannot run, in Kubernetes' own words (kube/pod_status.py finds them), and
# Kueue holding it for quota: a stage waiting on one says so (reason, Progressing=False, one
# Warning Event per cause).
POD_CAUSES = ("Unschedulable", "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
              "CreateContainerConfigError", "CrashLoopBackOff", "OOMKilled")
# phases, as sets: a child or stage still going; a run or stage that is over; a stage whose
# output exists (Skipped: reused with `from:`); the phases of a run
ACTIVE = (Phase.PENDING, Phase.RUNNING)
FINISHED = (Phase.SUCCEEDED, Phase.FAILED)
DONE = (Phase.SUCCEEDED, Phase.SKIPPED)
RUN_PHASES = (Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED)
WAITING_FOR_QUOTA = "WaitingForQuota"
WAITING_REASONS = (WAITING_FOR_QUOTA, *POD_CAUSES)


@dataclass(frozen=True)
class ChildState:
    """One child as observed (found by the label xwin.ai/run; stage/step/attempt from labels)."""

    kind: str            # PyTorchJob | TrainJob | Deployment | Service | Job
    name: str
    stage: str           # label xwin.ai/stage
    step: str            # label xwin.ai/step: "train", "serve", "sample", "score", "judge", ...
    attempt: int         # label xwin.ai/attempt
    phase: Phase         # Pending | Running | Succeeded | Failed
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    created: str | None = None     # metadata.creationTimestamp (ISO, UTC, "Z")
    finished: str | None = None    # completion / failure time (ISO), when known
    suspended: bool = False        # PyTorchJob runPolicy.suspend / Job spec.suspend
    permanent: bool = False        # failed in a way every attempt would repeat (a model the
                                   # serving backend cannot run): no retry
    suspended_by_us: bool = False  # suspended by the operator (spec.suspend), not by Kueue
    stopped: bool = False          # stopped and marked failed by the operator (FailChild)
    resumed: str | None = None     # when it was last unsuspended (ISO), if ever
    uid: str | None = None         # metadata.uid (kube/: its Kueue Workload is owned by it)
    # what an executor sees of the child's pods and queue (kube/: pod_status.py; local/ leaves them)
    held: str = ""                 # held by Kueue (suspended, not by us): the Workload's state
    cause: str = ""                # what keeps its pods from running: Unschedulable, ImagePullBackOff, ...
    cause_message: str = ""
    waiting_since: str | None = None  # free to run, yet a pod of it has not started since (ISO)
    live_pods: int = 0             # its pods not finished (a failed child still holding nodes)


@dataclass
class Observed:
    children: list[ChildState]
    markers: dict[str, dict | None]           # stage -> its _SUCCESS.json (None if absent)
    now: str = ""                             # ISO time, UTC ("2024-01-01T00:00:00Z")
    missing_secrets: list[str] = field(default_factory=list)
    missing_inputs: list[str] = field(default_factory=list)
    # external input URI -> its fingerprint now (xwin_jobs.fingerprint); an input the executor
    # cannot see is absent, and the fingerprint its stage's marker recorded stands for it
    fingerprints: dict[str, str] = field(default_factory=dict)
    # stage -> the live progress record of its running step (xwin_jobs.progress.Progress)
    progress: dict[str, Any] = field(default_factory=dict)


# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateChild:
    child: PlannedChild      # the executor renders it (a manifest, a local process)


@dataclass(frozen=True)
class DeleteChild:
    kind: str
    name: str


@dataclass(frozen=True)
class SuspendChild:
    kind: str
    name: str
    suspend: bool = True     # False resumes a suspended child


def attempt_failed(attempt: int, stage: str) -> str:
    """How a stage's message begins while a failed attempt waits for the next one (one
    StageAttemptFailed Event per attempt, however the message's details change)."""
    return f"attempt {attempt} of stage {stage} failed"


@dataclass(frozen=True)
class FailChild:
    """Fail a child that never started (scheduling.pendingTimeoutSeconds): free its pods
    (suspend it; a Deployment scaled to 0) and mark it failed, so it stays as its attempt's
    record and the next attempt is planned as after any failure."""

    kind: str
    name: str
    reason: str
    message: str


@dataclass(frozen=True)
class PatchStatus:
    status: dict


@dataclass(frozen=True)
class EmitEvent:
    reason: str
    message: str
    type: str = "Normal"     # Normal | Warning


@dataclass(frozen=True)
class RequeueAfter:
    seconds: float
    reason: str = ""


Action = Union[CreateChild, DeleteChild, SuspendChild, FailChild, PatchStatus, EmitEvent, RequeueAfter]


# --- what the planner concluded about one stage -------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """What the planner concluded about one stage this pass (status.py turns it into status,
    planner.decide into actions). Frozen: a rule that changes it returns a new one
    (dataclasses.replace)."""

    name: str
    phase: Phase = Phase.PENDING  # Pending | Running | Succeeded | Failed | Skipped (Suspended: status.py)
    attempts: int = 0
    artifact: str | None = None
    children: tuple[ChildState, ...] = ()
    marker: Mapping[str, Any] | None = None
    reason: str = ""              # machine-readable: Waiting, StageRunning, Backoff, ...
    message: str = ""
    changed: bool = False         # finished, but the spec now asks for something else
    creates: tuple[PlannedChild, ...] = ()
    deletes: tuple[tuple[str, str], ...] = ()
    requeue: float | None = None
    needs_judge: bool = False     # the creates reference judge.apiKeySecret
    finishing: tuple[ChildState, ...] = ()  # succeeded, its last child exiting
    fails: tuple[ChildState, ...] = ()      # to stop as failed (FailChild)
    failed_attempt: str = ""      # a failed attempt this pass went past (its backoff already over)


def now_iso() -> str:
    """The current time as the planner and status read it (ISO, UTC, "Z")."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
