"""New runs first: the reconciles a child's change wakes (a stage finished, a server ready: the
next stage, the status, the Events) wait their turn while new runs are arriving.

Why: kopf's watcher admits one new object per turn of the event loop (each new object's worker
starts behind an `asyncio.sleep(0)`), so how fast new runs reach their first reconcile (their
first child: what a user waits for) is how fast the loop turns, and every reconcile running in
the same loop makes each turn longer. Under a burst of new runs, the children of the first runs
finish while later runs are still queued in the watch stream; their completion work then slows
the admission of those later runs (1000 runs at once: first-child p50 0.6-1.1 s without a limit,
the runs' children finishing sooner than they are started).

`CompletionLane` lets at most `limit` such reconciles run at once while runs are arriving (one
seen for the first time within the last `window` seconds) and any number otherwise: once the
burst is over, every waiting reconcile goes at once, so the total work and its end are the
same. The first reconcile of a run and the resync do not pass through it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

LIMIT = 16      # completion reconciles at once while new runs arrive
WINDOW = 0.25   # seconds after the last new run during which runs count as arriving


class CompletionLane:
    """An async context manager: `async with lane: ...` (see the module docstring). Call
    `arrived()` whenever a run is seen for the first time. Runs in one event loop."""

    def __init__(self, limit: int = LIMIT, window: float = WINDOW):
        self.limit, self.window = limit, window
        self._active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._last_arrival = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def arrived(self) -> None:
        """A run seen for the first time (cheap: the burst's end is found by a timer only while
        reconciles wait)."""
        self._last_arrival = asyncio.get_running_loop().time()

    def busy(self) -> bool:
        """Whether runs are arriving."""
        return asyncio.get_running_loop().time() - self._last_arrival < self.window

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def __aenter__(self) -> None:
        if self._active < self.limit or not self.busy():
            self._active += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._arm()
        try:
            await future  # woken with its slot counted (_wake)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # woken, then cancelled before it ran
            elif future in self._waiters:  # (a _wake may have dropped it already, cancelled)
                self._waiters.remove(future)
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        self._active -= 1
        self._wake()

    def _wake(self) -> None:
        busy = self.busy()
        while self._waiters and (self._active < self.limit or not busy):
            future = self._waiters.popleft()
            if not future.done():
                self._active += 1
                future.set_result(None)

    def _arm(self) -> None:
        """A timer at the end of the burst as known now: it wakes every waiter if no run has
        arrived since, else waits for the new end."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._last_arrival + self.window, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._waiters:
            return
        if self.busy():
            self._arm()
        else:
            self._wake()
