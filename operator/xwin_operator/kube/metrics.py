"""The operator's Prometheus metrics: one `Metrics` per operator, with its own CollectorRegistry
(no global one), kept in kopf's memo (state.Operator) and served at /metrics by `serve`.

  * `status_changes(old, new)` (pure) reads what changed between two statuses of one run: stage
    attempts started, stages that turned Failed (with their reason) or finished (their duration),
    and the run's state now (phase, stages' waiting reasons, progress, cost totals);
  * `observe_status(metrics, key, old, new)` applies it where the reconciler writes a run's
    status: a counter moves once per transition, never per pass; the cost counters by the
    increase of the run's totals over what this process counted of it (a run first seen counts
    all it has); counters never decrease;
  * the gauges (runs by phase, waiting stages, a run's progress) are set from the per-run map:
    `seen` records a run the watch shows (a finished run has no daemon), `forget` a deleted one;
  * `api_error` (client.py's callback) and `reconcile_duration` (reconciler.py) are fed as they happen.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import choose_encoder

from ..core.types import FINISHED, RUN_PHASES, WAITING_REASONS, Phase

PHASES = tuple(p.value for p in RUN_PHASES)  # label values: plain strings
COSTS = ("gpuHours", "judgeUSD")   # status.cost: the run's totals
# a stage takes minutes to days (10 s: the tiny runs of tests and demos)
STAGE_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 345600, 604800)
RunKey = tuple[str, str]   # (namespace, name)


@dataclass(frozen=True)
class StatusChanges:
    """What one status write of a run changed (`status_changes`)."""

    phase: str                          # the run's phase now (Pending when it has none yet)
    stages: tuple[str, ...]             # the run's stages now
    attempts: dict[str, int]            # stage -> attempts started since the old status
    failures: list[tuple[str, str]]     # (stage, reason) of stages that turned Failed
    durations: list[tuple[str, float]]  # (stage, seconds from startTime to completionTime) of stages that finished
    waiting: tuple[str, ...]            # the waiting reason of each stage that has one, now
    progress: float | None              # status.progress.percent; None when finished or absent
    cost: dict[str, float]              # status.cost totals now: gpuHours, judgeUSD


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _seconds(start: Any, end: Any) -> float | None:
    try:
        a, b = (datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (start, end))
        seconds = (b - a).total_seconds()
    except (TypeError, ValueError):   # unparsable, or naive against aware
        return None
    return seconds if seconds >= 0 else None


def _stages(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {s["name"]: s for s in (status or {}).get("stages") or [] if isinstance(s, Mapping) and s.get("name")}


def status_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> StatusChanges:
    """What changed from `old` (None: nothing known) to `new`, two statuses of one run. Pure."""
    phase = new.get("phase") if new.get("phase") in PHASES else Phase.PENDING.value
    before = _stages(old)
    attempts: dict[str, int] = {}
    failures: list[tuple[str, str]] = []
    durations: list[tuple[str, float]] = []
    waiting: list[str] = []
    for name, s in _stages(new).items():
        was = before.get(name, {})
        started = int(_number(s.get("attempts")) or 0) - int(_number(was.get("attempts")) or 0)
        if started > 0:
            attempts[name] = started
        if s.get("phase") == Phase.FAILED and was.get("phase") != Phase.FAILED:
            failures.append((name, str(s.get("reason") or "StageFailed")))
        if s.get("phase") in FINISHED and was.get("phase") not in FINISHED:
            seconds = _seconds(s.get("startTime"), s.get("completionTime"))
            if seconds is not None:
                durations.append((name, seconds))
        if phase not in FINISHED and s.get("phase") not in FINISHED and s.get("reason") in WAITING_REASONS:
            waiting.append(s["reason"])
    progress = None if phase in FINISHED else _number((new.get("progress") or {}).get("percent"))
    cost = {k: max(0.0, _number((new.get("cost") or {}).get(k)) or 0.0) for k in COSTS}
    return StatusChanges(phase, tuple(_stages(new)), attempts, failures, durations, tuple(sorted(waiting)),
                         progress, cost)


class Metrics:
    """The operator's series (prefix xwin_) in `registry`, and what it knows of each run."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.runs = Gauge("xwin_runs", "AlignmentRuns the operator sees, by status.phase", ["phase"], registry=r)
        self.stage_duration = Histogram(
            "xwin_stage_duration_seconds", "Stages that finished (Succeeded or Failed): startTime to completionTime",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_attempts = PromCounter("xwin_stage_attempts_total", "Attempts of stages started", ["stage"],
                                          registry=r)
        self.stage_failures = PromCounter("xwin_stage_failures_total", "Stages that failed, by the stage's reason",
                                          ["stage", "reason"], registry=r)
        self.stages_waiting = Gauge("xwin_stages_waiting", "Stages of unfinished runs waiting on something "
                                    "outside the run (Kueue quota, what keeps their pods from running)",
                                    ["reason"], registry=r)
        self.reconcile_duration = Histogram("xwin_reconcile_duration_seconds", "One reconcile pass of a run",
                                            registry=r)
        self.api_errors = PromCounter("xwin_api_errors_total", "Kubernetes API calls that failed, by HTTP verb and "
                                      "status (0: unreachable; login: no login)", ["verb", "status"], registry=r)
        self.judge_usd = PromCounter("xwin_judge_usd_total", "Judge spend of the runs (status.cost.judgeUSD)",
                                     ["namespace"], registry=r)
        self.gpu_hours = PromCounter("xwin_gpu_hours_total", "GPU-hours of the runs (status.cost.gpuHours)",
                                     ["namespace"], registry=r)
        self.run_progress = Gauge("xwin_run_progress_percent", "status.progress.percent of unfinished runs",
                                  ["namespace", "run"], registry=r)
        self._phase: dict[RunKey, str] = {}
        self._waiting: dict[RunKey, tuple[str, ...]] = {}
        self._counted: dict[RunKey, dict[str, float]] = {}   # cost totals counted per run
        self._phases: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        for phase in PHASES:
            self.runs.labels(phase).set(0)
        for reason in WAITING_REASONS:
            self.stages_waiting.labels(reason).set(0)

    # --- runs -----------------------------------------------------------------------------------
    def observe(self, key: RunKey, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
        """The reconciler wrote `new` over `old` for the run `key`."""
        changes = status_changes(old, new)
        for stage, n in changes.attempts.items():
            self.stage_attempts.labels(stage).inc(n)
        for stage, reason in changes.failures:
            self.stage_failures.labels(stage, reason).inc()
        for stage, seconds in changes.durations:
            self.stage_duration.labels(stage).observe(seconds)
        self._record(key, changes)

    def seen(self, key: RunKey, status: Mapping[str, Any]) -> None:
        """A run the watch shows: recorded the first time (a finished run, or every run after a
        restart, counting the cost it has); later statuses come through `observe`."""
        if key not in self._phase:
            self._record(key, status_changes(status, status))

    def forget(self, key: RunKey) -> None:
        """The run was deleted: it leaves the gauges (its counted cost stays counted)."""
        self._recount(self.runs, self._phases, (self._phase.pop(key, None),), ())
        self._recount(self.stages_waiting, self._reasons, self._waiting.pop(key, ()), ())
        self._counted.pop(key, None)
        self._drop_progress(key)

    def _record(self, key: RunKey, changes: StatusChanges) -> None:
        for stage in changes.stages:   # a series is born at 0, so its first increase shows in increase()
            self.stage_attempts.labels(stage)
            self.stage_duration.labels(stage)
        self._recount(self.runs, self._phases, (self._phase.get(key),), (changes.phase,))
        self._phase[key] = changes.phase
        self._recount(self.stages_waiting, self._reasons, self._waiting.get(key, ()), changes.waiting)
        self._waiting[key] = changes.waiting
        counted = self._counted.setdefault(key, dict.fromkeys(COSTS, 0.0))
        for name, counter in (("gpuHours", self.gpu_hours), ("judgeUSD", self.judge_usd)):
            counter.labels(key[0])
            more = changes.cost[name] - counted[name]
            if more > 0:
                counter.labels(key[0]).inc(more)
                counted[name] = changes.cost[name]
        if changes.progress is None:
            self._drop_progress(key)
        else:
            self.run_progress.labels(*key).set(changes.progress)

    @staticmethod
    def _recount(gauge: Gauge, counts: Counter[str], before: tuple, after: tuple) -> None:
        before, after = tuple(b for b in before if b), tuple(a for a in after if a)
        if before == after:
            return
        counts.subtract(before)
        counts.update(after)
        for label in set(before) | set(after):
            gauge.labels(label).set(max(0, counts[label]))

    def _drop_progress(self, key: RunKey) -> None:
        try:
            self.run_progress.remove(*key)
        except KeyError:
            pass

    # --- the API, the exposition ---------------------------------------------------------------
    def api_error(self, verb: str, status: int | str) -> None:
        """An API call failed (client.KubeApi's on_error): its HTTP verb and status."""
        self.api_errors.labels(verb.upper(), str(status)).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format `accept` asks for (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def series(self) -> set[str]:
        """Every series name this registry can expose (a counter's _total, a histogram's _bucket...)."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",)}
        return {f.name + s for f in self.registry.collect() for s in suffixes[f.type]}


def observe_status(metrics: Metrics, key: RunKey, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """`metrics.observe`: the reconciler wrote the run `key`'s status `new` over `old`."""
    metrics.observe(key, old, new)


async def serve(metrics: Metrics, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve GET /metrics on host:port in this event loop; `await runner.cleanup()` stops it."""

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
