"""The planner's vocabulary: what was observed (ChildState, Observed), what to do (the
actions), and what it concluded per stage (StageView). Pure data; see planner.py for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Union

from .children import PlannedChild


# --- what was observed ------------------------------------------------------------------


@dataclass(frozen=True)
class ChildState:
    """One child as observed (found by the label xwin.ai/run; stage/step/attempt from labels)."""

    kind: str            # PyTorchJob | Deployment | Service | Job
    name: str
    stage: str           # label xwin.ai/stage
    step: str            # label xwin.ai/step: "train", "serve", "sample", "score", "judge", ...
    attempt: int         # label xwin.ai/attempt
    phase: str           # Pending | Running | Succeeded | Failed
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    created: str | None = None     # metadata.creationTimestamp (ISO, UTC, "Z")
    finished: str | None = None    # completion / failure time (ISO), when known
    suspended: bool = False        # PyTorchJob runPolicy.suspend / Job spec.suspend
    permanent: bool = False        # failed in a way every attempt would repeat (a model the
                                   # serving backend cannot run): no retry


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


Action = Union[CreateChild, DeleteChild, SuspendChild, PatchStatus, EmitEvent, RequeueAfter]


# --- what the planner concluded about one stage -------------------------------------------


@dataclass
class StageView:
    """What the planner concluded about one stage (status.py turns it into status)."""

    name: str
    phase: str = "Pending"        # Pending | Running | Succeeded | Failed | Suspended | Skipped
    attempts: int = 0
    artifact: str | None = None
    children: list[ChildState] = field(default_factory=list)
    marker: dict | None = None
    reason: str = ""              # machine-readable: Waiting, StageRunning, Backoff, ...
    message: str = ""
    changed: bool = False         # finished, but the spec now asks for something else
    creates: list[PlannedChild] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    requeue: float | None = None
    needs_judge: bool = False     # the creates reference judge.apiKeySecret
    finishing: list[ChildState] = field(default_factory=list)  # succeeded, its last child exiting


def now_iso() -> str:
    """The current time as the planner and status read it (ISO, UTC, "Z")."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
