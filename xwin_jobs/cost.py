"""What a stage cost, as its own records show it, and what the run upstream of a report cost.

    SIZING / requested_gpus(params, kind)   # GPUs a step's pods ask for (the one definition)
    step_costs(store, stage_uri)           # each step's GPU-hours, from its progress record
    stage_cost(steps, metrics)             # the `cost` a stage's _SUCCESS.json carries
    upstream_costs(store, folders)         # every stage folder's cost up the marker graph

A step's GPU-hours are the time from its progress record's `startedAt` to its last
`updatedAt` (the attempt that finished; a resumed attempt counts from its own start) times the
GPUs its pods ask for (`gpus` in the record, written by the step from its task's settings). A
stage's judge USD is its `estimatedCostUSD` metric. The run's status counts more: every
attempt, and pods waiting for nodes (the operator's core/progress.py). Pure but for the reads.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

from .progress import parse_progress

# kind of step -> (the task params that size its pods, their GPUs-per-pod field, their pods field)
SIZING = {"training": ("resources", "gpusPerNode", "nodes"),
          "scoring": ("scoringResources", "gpusPerNode", "nodes"),
          "serving": ("serving", "gpusPerReplica", "replicas")}


def requested_gpus(params: Mapping[str, Any], kind: str) -> tuple[int, int]:
    """(GPUs one pod asks for, GPUs all the step's pods ask for) for a step of `kind`
    (training | scoring | serving; anything else asks for none)."""
    if kind not in SIZING:
        return 0, 0
    key, per_pod, pods = SIZING[kind]
    settings = params.get(key) or {}
    gpus = int(settings.get(per_pod) or 0)
    return gpus, gpus * int(settings.get(pods) or 1)


def step_costs(store: Any, stage_uri: str, now: float | None = None) -> dict[str, dict[str, float]]:
    """{step: {seconds, gpus, gpuHours}} from the progress records under `stage_uri`; a record
    that cannot be read or trusted is left out."""
    now = time.time() if now is None else now
    folder = stage_uri.rstrip("/") + "/progress/"
    out: dict[str, dict[str, float]] = {}
    try:
        uris = store.list_files(folder)
    except Exception:  # noqa: BLE001 - no records (a stage run before they existed)
        return out
    for uri in sorted(uris):
        if not uri.endswith(".json"):
            continue
        try:
            record = parse_progress(store.read_bytes(uri), now)
        except Exception:  # noqa: BLE001 - unreadable: left out, as a planner would
            record = None
        if record is None:
            continue
        seconds = max(record.updated_at - record.started_at, 0.0)
        out[record.step] = {"seconds": round(seconds, 1), "gpus": record.gpus,
                            "gpuHours": round(seconds * record.gpus / 3600, 4)}
    return out


def stage_cost(steps: Mapping[str, Mapping[str, float]], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The `cost` of a stage's marker: its steps' GPU-hours, their sum, and its judge USD."""
    usd = metrics.get("estimatedCostUSD")
    usd = float(usd) if isinstance(usd, (int, float)) and not isinstance(usd, bool) else 0.0
    return {"gpuHours": round(sum(float(s.get("gpuHours") or 0) for s in steps.values()), 4),
            "judgeUSD": round(usd, 6), "steps": {k: dict(v) for k, v in steps.items()}}


def upstream_costs(store: Any, folders: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{stage: cost} for the stages whose folders are given and every stage their markers read
    (the markers' `inputDigests`), each once. A stage without a marker, or whose marker has no
    `cost` (written before markers carried one), counts its judge USD only, with gpuHours None."""
    from .store import as_folder, read_marker

    out: dict[str, dict[str, Any]] = {}
    queue, seen = [as_folder(f) for f in folders], set()
    while queue:
        folder = queue.pop(0)
        if folder in seen:
            continue
        seen.add(folder)
        try:
            marker = read_marker(store, folder)
        except Exception:  # noqa: BLE001 - an external input (a file, hf://): no marker
            marker = None
        if not marker:
            continue
        name = str(marker.get("stage") or folder.rstrip("/").rpartition("/")[2])
        if name in out:
            name = folder
        cost = marker.get("cost")
        out[name] = dict(cost) if isinstance(cost, dict) else \
            {**stage_cost({}, marker.get("metrics") or {}), "gpuHours": None}
        queue += [k for k in (marker.get("inputDigests") or {}) if k.endswith("/")]
    return out


def totals(costs: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The sum over stages (a stage whose GPU-hours are unknown adds none)."""
    return {"gpuHours": round(sum(float(c.get("gpuHours") or 0) for c in costs.values()), 4),
            "judgeUSD": round(sum(float(c.get("judgeUSD") or 0) for c in costs.values()), 6)}
