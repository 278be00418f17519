"""The operator's children, by run, as the watch events of the child kinds said last (the kopf
event filters of handlers.py feed every event in), and, per namespace, whether the book is
complete: every child that existed when the namespace's first run was reconciled has been seen.

A restarted operator must see every child it made before it plans a run (else it would plan
them again). kopf's indexes promise that, at the price of a pass through kopf's handler
machinery for every event of every child; the book promises it with one listing of the
namespace's children (`expect`, the uids found): complete once each of them has been seen by
the watch, or is gone from a later listing (deleted meanwhile). The children themselves come
from the watch only, so a child deleted between the listing and the watch leaves no trace.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

from ..core.children import LABEL_RUN
from ..core.types import ChildState
from .observe import child_state


class ChildBook:
    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], dict[str, ChildState]] = {}   # (namespace, run) -> uid -> child
        self._where: dict[str, tuple[str, str]] = {}                    # uid -> (namespace, run)
        self._expected: dict[str, set[str]] = {}      # namespace -> listed uids not seen yet
        self._complete: dict[str, asyncio.Event] = {}  # namespace -> set once nothing is expected

    # --- the watch -------------------------------------------------------------------------

    def saw(self, type_: str | None, body: Mapping[str, Any]) -> ChildState | None:
        """Record one watch event of a child kind; the child as the planner sees it (None when
        it is deleted or not a child)."""
        meta = body.get("metadata") or {}
        uid, namespace = meta.get("uid", ""), meta.get("namespace", "")
        labels = meta.get("labels") or {}
        child = None if type_ == "DELETED" or LABEL_RUN not in labels else child_state(body)
        old = self._where.pop(uid, None)
        if old is not None:
            children = self._runs.get(old, {})
            children.pop(uid, None)
            if not children:
                self._runs.pop(old, None)
        if child is not None:
            key = (namespace, labels[LABEL_RUN])
            self._runs.setdefault(key, {})[uid] = child
            self._where[uid] = key
        expected = self._expected.get(namespace)
        if expected:
            expected.discard(uid)
            self._settle(namespace)
        return child

    def children(self, namespace: str, run: str) -> list[ChildState]:
        return list(self._runs.get((namespace, run), {}).values())

    # --- completeness --------------------------------------------------------------------------

    def complete(self, namespace: str) -> bool:
        event = self._complete.get(namespace)
        return event is not None and event.is_set()

    def listed(self, namespace: str) -> bool:
        """Whether the namespace's children were listed (its completeness is being awaited)."""
        return namespace in self._complete

    def expect(self, namespace: str, uids: set[str]) -> None:
        """The uids of the namespace's children, listed: the namespace is complete once the
        watch has shown each (those it already showed count)."""
        seen = {uid for uid, (ns, _) in self._where.items() if ns == namespace}
        self._expected[namespace] = set(uids) - seen
        self._complete.setdefault(namespace, asyncio.Event())
        self._settle(namespace)

    def still_there(self, namespace: str, uids: set[str]) -> None:
        """A later listing: the expected children no longer in it were deleted meanwhile."""
        if namespace in self._expected:
            self._expected[namespace] &= set(uids)
            self._settle(namespace)

    async def wait(self, namespace: str) -> None:
        await self._complete[namespace].wait()

    def _settle(self, namespace: str) -> None:
        if not self._expected.get(namespace) and namespace in self._complete:
            self._expected.pop(namespace, None)
            self._complete[namespace].set()
