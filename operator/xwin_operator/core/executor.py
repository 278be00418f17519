"""The one interface both executors implement for the planner's actions, and the one dispatch of
the actions onto it (kube/ turns them into API calls, local/ into processes); loop.py runs it
after `decide`. Pure.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from .children import PlannedChild
from .types import Action, CreateChild, DeleteChild, EmitEvent, FailChild, PatchStatus, RequeueAfter, SuspendChild


class Executor(Protocol):
    """What an executor does with each action: kube/'s methods are coroutines (loop.reconcile_once
    awaits each), local/'s plain calls (loop.reconcile_once_sync); `apply` hands back whatever
    each returns, in the actions' order."""

    def create(self, child: PlannedChild) -> Any: ...          # a 409 (it exists) is fine
    def delete(self, kind: str, name: str) -> Any: ...         # a 404 is fine
    def suspend(self, kind: str, name: str, suspend: bool) -> Any: ...
    def fail(self, kind: str, name: str, reason: str, message: str) -> Any: ...  # stop it, mark it Failed
    def patch_status(self, status: dict) -> Any: ...           # the full new .status
    def event(self, reason: str, message: str, type_: str) -> Any: ...
    def requeue(self, seconds: float, reason: str) -> Any: ...


def apply(actions: list[Action], executor: Executor) -> Iterator[Any]:
    """Each action as a call of `executor`, in order (lazily: a caller awaits or drops each
    result before the next call is made)."""
    for a in actions:
        if isinstance(a, CreateChild):
            yield executor.create(a.child)
        elif isinstance(a, DeleteChild):
            yield executor.delete(a.kind, a.name)
        elif isinstance(a, SuspendChild):
            yield executor.suspend(a.kind, a.name, a.suspend)
        elif isinstance(a, FailChild):
            yield executor.fail(a.kind, a.name, a.reason, a.message)
        elif isinstance(a, PatchStatus):
            yield executor.patch_status(a.status)
        elif isinstance(a, EmitEvent):
            yield executor.event(a.reason, a.message, a.type)
        elif isinstance(a, RequeueAfter):
            yield executor.requeue(a.seconds, a.reason)
        else:
            raise TypeError(f"not a planner action: {a!r}")
