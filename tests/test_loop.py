"""The pass around `decide`, as both executors run it (core.loop): what it observes, in which
order, and that the actions reach the executor in the planner's order, sync (`xwin run`) or
async (the kopf daemons); and when the kopf side comes back to a run unasked (resync_after)."""

from __future__ import annotations

import asyncio

from xwin_operator.core.config import OperatorConfig
from xwin_operator.core.loop import reconcile_once, reconcile_once_sync, resync_after
from xwin_operator.core.planner import stage_tasks

from planner_helpers import child, make_run


class World:
    """An observer and an executor that record every call; `wrap` makes them async."""

    def __init__(self, wrap=lambda v: v, missing_secrets=(), children=()):
        self.calls: list[tuple] = []
        self.wrap, self._missing_secrets, self._children = wrap, list(missing_secrets), list(children)

    def _ret(self, name, *args, value=None):
        self.calls.append((name, *args))
        return self.wrap(value)

    def children(self):  # in memory on either side: never awaited
        self.calls.append(("children",))
        return self._children
    def markers(self, outputs): return self._ret("markers", value={s: None for s in outputs})
    def missing_inputs(self, uris): return self._ret("missing_inputs", value=[])
    def missing_secrets(self, refs): return self._ret("missing_secrets", value=self._missing_secrets)
    def fingerprints(self, uris): return self._ret("fingerprints", value={})
    def progress(self, uris): return self._ret("progress", value={})
    def create(self, child): return self._ret("create", f"{child.kind}/{child.name}")
    def delete(self, kind, name): return self._ret("delete", kind, name)
    def suspend(self, kind, name, suspend): return self._ret("suspend", kind, name, suspend)
    def fail(self, kind, name, reason, message): return self._ret("fail", kind, name, reason)
    def patch_status(self, status): return self._ret("patch_status", status["phase"])
    def event(self, reason, message, type_): return self._ret("event", reason)
    def requeue(self, seconds, reason): return self._ret("requeue", seconds)


def once(world: World, run, status=None, config=None, sync=True):
    config = config or OperatorConfig()
    return (reconcile_once_sync if sync else reconcile_once)(run, world, world, status, generation=1, config=config,
                                                             tasks=stage_tasks(run, config))


def test_a_new_run_is_observed_children_first_then_its_first_child_created_then_its_status():
    run = make_run()
    world = World()
    outcome = (once(world, run))
    names = [c[0] for c in world.calls]
    assert names[:6] == ["children", "markers", "missing_inputs", "missing_secrets", "fingerprints", "progress"]
    assert world.calls[6:] == [("create", "PyTorchJob/demo-sft-1"), ("patch_status", "Running"),
                               ("event", "StageStarted"), ("event", "StageReused")]
    assert outcome.status["phase"] == "Running" and outcome.requeue is None
    assert [type(a).__name__ for a in outcome.actions] == ["CreateChild", "PatchStatus", "EmitEvent",
                                                           "EmitEvent"]


def test_the_async_executor_gets_the_same_calls_in_the_same_order():
    async def value(v):
        await asyncio.sleep(0)   # really suspends, as an API call does
        return v

    run = make_run()
    sync_world, async_world = World(), World(wrap=value)
    (once(sync_world, run))
    asyncio.run(once(async_world, run, sync=False))
    assert async_world.calls == sync_world.calls


def test_a_missing_secret_holds_the_children_back():
    world = World(missing_secrets=["s3-creds"])
    outcome = (once(world, make_run()))
    assert world.calls[6:] == [("patch_status", "Pending"), ("event", "StageReused"),
                               ("event", "SecretNotFound")]
    assert outcome.status["phase"] == "Pending"


# resync_after(outcome, interval=3, idle=30): when the resync reconciles the run again unasked


def test_a_run_waiting_on_the_child_it_created_or_has_is_resynced_only_by_the_safety_net():
    created = (once(World(), make_run()))                   # creates the sft child
    assert resync_after(created, 3.0, 30.0) == 30.0
    running = (once(World(children=[child("sft")]), make_run(), created.status))
    assert not [a for a in running.actions if type(a).__name__ == "CreateChild"]
    assert resync_after(running, 3.0, 30.0) == 30.0


def test_a_run_waiting_on_what_no_event_announces_is_resynced_every_interval():
    held = (once(World(missing_secrets=["s3-creds"]), make_run()))  # a Secret created later heals it
    assert resync_after(held, 3.0, 30.0) == 3.0


def test_a_backoff_is_resynced_when_it_ends():
    failed = child("sft", phase="Failed", finished="2999-01-01T00:00:00Z")  # failed "now": the whole backoff
    outcome = (once(World(children=[failed]), make_run(), config=OperatorConfig(backoff_seconds=20)))
    assert outcome.requeue is not None and 0 < outcome.requeue
    assert resync_after(outcome, 3.0, 30.0) == min(outcome.requeue, 30.0)
    assert resync_after(outcome, 3.0, 5.0) == 5.0  # never later than the safety net
