"""Live progress of a running step, through the store: the step's process writes a small JSON
record under its stage folder at most every few seconds, and the planners read it (the
operator on each pass of a run, `xwin run` while it waits). No endpoint to secure.

    <stage>/progress/<step>.json     (progress_uri; `step` is XWIN_STEP: train, sample, judge, ...)
    {"version": 1, "stage": "dpo", "step": "train", "unit": "steps", "done": 41, "total": 100,
     "startedAt": "2026-12-07T10:00:00Z", "updatedAt": "2026-12-07T10:41:10Z",
     "movedAt": "2026-12-07T10:41:10Z", "rate": 0.017, "gpus": 8,
     "metrics": {"loss": 0.61, "learningRate": 2e-06, "tokensPerSecond": 5100.0}}

`unit` is what `done` and `total` count: steps (training), prompts (sampling, scoring: under
torchrun rank 0 counts its share times the ranks), comparisons (judging). `rate` is units per
second since `startedAt`; `movedAt` is when `done` last changed; `gpus` is what the step's pods
ask for (xwin_jobs.cost; 0 when absent). `metrics` holds numbers only: training's loss,
learningRate and tokensPerSecond; sampling's responsesPerSecond; judging's usd (spent so far)
and requestsPerSecond.

A reader never trusts a record: `parse_progress` returns None for one that is not JSON, is
partial, names another stage or step, counts backwards or is dated in the future, and the
reader keeps the last good one. Pure but for `ProgressWriter`, a thin shell over the Store.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

VERSION = 1
UNITS = ("steps", "prompts", "comparisons")
WRITE_INTERVAL = 5.0     # seconds between two writes of a step's record (XWIN_PROGRESS_INTERVAL)
CLOCK_SKEW = 60.0        # a record dated further than this in the future is ignored


def progress_uri(stage_uri: str, step: str) -> str:
    """Where the record of `step` of the stage whose folder is `stage_uri` lives."""
    return stage_uri.rstrip("/") + f"/progress/{step}.json"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(text: str) -> float:
    """Seconds since the epoch of an ISO time ("Z" or an offset); ValueError when it is not one."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return when.timestamp()


@dataclass(frozen=True)
class Progress:
    """One step's progress as read back (see the module docstring for the fields)."""

    stage: str
    step: str
    unit: str
    done: int
    total: int
    started_at: float            # seconds since the epoch
    updated_at: float
    moved_at: float
    metrics: dict[str, float] = field(default_factory=dict)
    gpus: int = 0                # GPUs the step's pods ask for (its GPU-hours: xwin_jobs.cost)

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    @property
    def rate(self) -> float:
        """Units per second since the step started (0 before the first unit)."""
        elapsed = self.updated_at - self.started_at
        return self.done / elapsed if elapsed > 0 and self.done > 0 else 0.0

    def eta_seconds(self, now: float) -> float | None:
        """Seconds until `total` at the step's rate so far, counted from `now` (None: no rate yet)."""
        rate = self.rate
        if rate <= 0:
            return None
        return max((self.total - self.done) / rate - max(now - self.updated_at, 0.0), 0.0)

    def to_record(self) -> dict[str, Any]:
        return {"version": VERSION, "stage": self.stage, "step": self.step, "unit": self.unit,
                "done": self.done, "total": self.total, "startedAt": iso(self.started_at),
                "updatedAt": iso(self.updated_at), "movedAt": iso(self.moved_at),
                "rate": round(self.rate, 6), "gpus": self.gpus, "metrics": dict(self.metrics)}


def parse_progress(data: bytes | str | dict, now: float, *, stage: str | None = None,
                   step: str | None = None) -> Progress | None:
    """The record `data` as a Progress, or None when it cannot be trusted: not JSON, not a
    version this code reads, a field missing or of the wrong type, `done` outside 0..total,
    another `stage`/`step` than asked, or `updatedAt` more than CLOCK_SKEW in the future."""
    try:
        body = data if isinstance(data, dict) else json.loads(data)
        if not isinstance(body, dict) or body.get("version") != VERSION:
            return None
        unit, done, total = body["unit"], body["done"], body["total"]
        if unit not in UNITS or not _count(done) or not _count(total) or done > total:
            return None
        if (stage is not None and body["stage"] != stage) or (step is not None and body["step"] != step):
            return None
        started, updated, moved = (epoch(body[k]) for k in ("startedAt", "updatedAt", "movedAt"))
        if updated > now + CLOCK_SKEW or not started <= moved <= updated:
            return None
        metrics = body.get("metrics") or {}
        if not isinstance(metrics, dict):
            return None
        numbers = {str(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        gpus = body.get("gpus", 0)
        return Progress(str(body["stage"]), str(body["step"]), unit, done, total, started,
                        updated, moved, numbers, gpus if _count(gpus) else 0)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def step_name(default: str, env: Any = None) -> str:
    """The step this process runs: XWIN_STEP, which the planners set; `default` when a stage
    is run by hand."""
    return (os.environ if env is None else env).get("XWIN_STEP") or default


def write_interval() -> float:
    raw = os.environ.get("XWIN_PROGRESS_INTERVAL", "")
    try:
        return max(float(raw), 0.0) if raw else WRITE_INTERVAL
    except ValueError:
        return WRITE_INTERVAL


class ProgressWriter:
    """Writes one step's record: `update(done, **metrics)` at most every `interval` seconds
    (and always when `done` reaches `total`), `finish()` once the step's work is done. A
    store error is reported to `warn` and never stops the step: progress is for people."""

    def __init__(self, store: Any, stage_uri: str, stage: str, step: str, unit: str, total: int, *,
                 gpus: int = 0, interval: float | None = None,
                 clock: Callable[[], float] = time.time,
                 warn: Callable[[str], None] | None = None) -> None:
        if unit not in UNITS:
            raise ValueError(f"progress unit {unit!r}: must be one of {', '.join(UNITS)}")
        self.uri = progress_uri(stage_uri, step)
        self._store, self._clock, self._warn = store, clock, warn
        self._interval = write_interval() if interval is None else interval
        now = clock()
        self._state = Progress(stage, step, unit, 0, max(int(total), 0), now, now, now,
                               gpus=max(int(gpus), 0))
        self._written_at: float | None = None
        self._failed = False

    @property
    def state(self) -> Progress:
        return self._state

    def update(self, done: int, total: int | None = None, **metrics: float) -> None:
        now, s = self._clock(), self._state
        total = s.total if total is None else max(int(total), 0)
        done = min(max(int(done), 0), total)
        kept = {**s.metrics, **{k: float(v) for k, v in metrics.items() if v is not None}}
        self._state = Progress(s.stage, s.step, s.unit, done, total, s.started_at, now,
                               now if done != s.done else s.moved_at, kept, s.gpus)
        due = self._written_at is None or now - self._written_at >= self._interval
        if due or (done == total and s.done != total):
            self._write(now)

    def finish(self, **metrics: float) -> None:
        self.update(self._state.total, **metrics)
        if self._written_at != self._state.updated_at:
            self._write(self._state.updated_at)

    def _write(self, now: float) -> None:
        self._written_at = now
        try:
            self._store.write_json(self.uri, self._state.to_record())
        except Exception as e:  # noqa: BLE001 - a progress write never fails the step
            if not self._failed and self._warn is not None:
                self._warn(f"progress: cannot write {self.uri}: {e} (the step goes on)")
            self._failed = True


class ProgressReader:
    """The planners' side: `read(store, {key: uri})` gives each key's record as a Progress,
    the last good one where the record is missing now, unreadable or untrustworthy (an
    error is never raised: progress never fails a reconcile). Keys no longer asked for are
    forgotten."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._last: dict[str, tuple[str, Progress]] = {}
        self._clock = clock

    def read(self, store: Any, uris: dict[str, str]) -> dict[str, Progress]:
        now = self._clock()
        self._last = {k: v for k, v in self._last.items() if uris.get(k) == v[0]}
        for key, uri in uris.items():
            try:
                found = parse_progress(store.read_bytes(uri), now)
            except Exception:  # noqa: BLE001 - not written yet, or the store failed: keep the last
                found = None
            if found is not None:
                self._last[key] = (uri, found)
        return {k: p for k, (_, p) in self._last.items()}
