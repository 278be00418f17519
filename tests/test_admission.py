"""New runs first: the completion lane (xwin_operator.kube.admission)."""

from __future__ import annotations

import asyncio

import pytest

from xwin_operator.kube.admission import CompletionLane


async def _track(lane: CompletionLane, running: list[int], peak: list[int], hold: float) -> None:
    async with lane:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(hold)
        running[0] -= 1


def test_no_limit_while_no_run_arrives():
    async def scenario() -> int:
        lane, running, peak = CompletionLane(limit=2, window=0.2), [0], [0]
        await asyncio.gather(*(_track(lane, running, peak, 0.02) for _ in range(10)))
        return peak[0]

    assert asyncio.run(scenario()) == 10


def test_while_runs_arrive_at_most_limit_then_all_at_once_when_they_stop():
    async def scenario() -> tuple[int, int, float]:
        loop = asyncio.get_running_loop()
        lane, running, peak = CompletionLane(limit=2, window=0.1), [0], [0]
        stop = loop.time() + 0.3

        async def arrivals() -> None:  # a new run every 20 ms for 0.3 s
            while loop.time() < stop:
                lane.arrived()
                await asyncio.sleep(0.02)

        feeder = asyncio.create_task(arrivals())
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(_track(lane, running, peak, 0.05)) for _ in range(30)]
        await asyncio.sleep(0.25)
        during = peak[0]
        await feeder
        await asyncio.gather(*tasks)
        return during, peak[0], loop.time() - stop

    during, overall, after = asyncio.run(scenario())
    assert during == 2          # at most `limit` while runs arrive
    assert overall > 10         # the rest went at once once the burst was over
    assert after < 0.1 + 0.05 + 0.1  # within the window and one hold (and some slack)


def test_a_cancelled_waiter_gives_its_turn_away():
    async def scenario() -> tuple[int, int]:
        lane = CompletionLane(limit=1, window=10.0)
        lane.arrived()
        entered = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with lane:
                entered.set()
                await release.wait()

        first = asyncio.create_task(holder())
        await entered.wait()
        waiter = asyncio.create_task(_track(lane, [0], [0], 0))
        await asyncio.sleep(0.01)
        waiting = lane.waiting
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        await first
        await asyncio.wait_for(lane.__aenter__(), 1.0)  # the slot came back, not kept by the cancelled waiter
        await lane.__aexit__(None, None, None)
        return waiting, lane.waiting

    assert asyncio.run(scenario()) == (1, 0)


def test_a_waiter_cancelled_as_a_turn_frees_up_neither_breaks_nor_leaks_the_turn():
    async def scenario() -> int:
        lane = CompletionLane(limit=1, window=10.0)
        lane.arrived()
        await lane.__aenter__()  # the one turn, held here
        waiter = asyncio.create_task(_track(lane, [0], [0], 0))
        await asyncio.sleep(0.01)
        waiter.cancel()                          # its wait is cancelled at once ...
        await lane.__aexit__(None, None, None)   # ... and the turn frees up before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(lane.__aenter__(), 1.0)  # the turn is free again
        return lane.waiting

    assert asyncio.run(scenario()) == 0
