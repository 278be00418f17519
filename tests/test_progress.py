"""Live progress (issue 25): the record a step writes (xwin_jobs.progress), what a reader
trusts of it, and what status makes of it (core/progress.py, through the planner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xwin_jobs.progress import ProgressReader, ProgressWriter, epoch, parse_progress, progress_uri
from xwin_jobs.store import Store

from xwin_operator.core.progress import duration_text, run_progress, stage_cost, stage_progress
from xwin_operator.core.types import ChildState
from planner_helpers import make_run


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def stage_uri(tmp_path: Path) -> str:
    return f"file://{tmp_path}/runs/ns/demo/sft/"


def record_of(tmp_path: Path, step: str = "train") -> dict:
    return json.loads((tmp_path / "runs/ns/demo/sft/progress" / f"{step}.json").read_text())


def test_the_writer_writes_at_most_every_interval_and_always_the_last_step(tmp_path):
    clock = Clock()
    w = ProgressWriter(Store(), stage_uri(tmp_path), "sft", "train", "steps", 10, interval=5.0, clock=clock)
    w.update(0)
    assert record_of(tmp_path)["done"] == 0
    for step in range(1, 9):  # one step a second: written at 5 s only
        clock.t += 1
        w.update(step, loss=2.0 - step / 10, learningRate=1e-5)
        assert record_of(tmp_path)["done"] == (0 if step < 5 else 5)
    clock.t += 1
    w.update(10, loss=1.0)   # the last step is written at once
    body = record_of(tmp_path)
    assert (body["done"], body["total"], body["unit"], body["step"]) == (10, 10, "steps", "train")
    assert body["metrics"] == {"loss": 1.0, "learningRate": 1e-5}  # metrics kept until replaced
    assert body["rate"] == pytest.approx(10 / 9, rel=1e-3)
    p = parse_progress(json.dumps(body), clock.t, stage="sft", step="train")
    assert p is not None and p.fraction == 1.0 and p.eta_seconds(clock.t) == 0.0


def test_a_store_that_refuses_the_write_never_stops_the_step(tmp_path):
    (tmp_path / "runs").write_text("a file where the folder should be")
    warned: list[str] = []
    w = ProgressWriter(Store(), stage_uri(tmp_path), "sft", "train", "steps", 3, interval=0.0,
                       warn=warned.append)
    for step in range(4):
        w.update(step)
    w.finish()
    assert len(warned) == 1 and "cannot write" in warned[0] and "the step goes on" in warned[0]


GOOD = {"version": 1, "stage": "sft", "step": "train", "unit": "steps", "done": 4, "total": 10,
        "startedAt": "2027-01-15T08:00:00Z", "updatedAt": "2027-01-15T08:00:40Z",
        "movedAt": "2027-01-15T08:00:40Z", "metrics": {"loss": 0.5}}
NOW = epoch("2027-01-15T08:01:00Z")


@pytest.mark.parametrize("bad", [
    b"{\"version\": 1, \"stage\": \"sft\", \"ste",                    # partial (a torn write)
    b"\xff\xfe not text",                                               # unreadable
    json.dumps({**GOOD, "version": 2}),                                 # a newer writer
    json.dumps({k: v for k, v in GOOD.items() if k != "total"}),         # a field missing
    json.dumps({**GOOD, "done": 11}),                                   # more than the total
    json.dumps({**GOOD, "done": -1}),
    json.dumps({**GOOD, "done": True}),
    json.dumps({**GOOD, "unit": "bananas"}),
    json.dumps({**GOOD, "updatedAt": "2027-01-15T09:00:00Z", "movedAt": "2027-01-15T09:00:00Z"}),  # future-dated
    json.dumps({**GOOD, "updatedAt": "yesterday"}),
    json.dumps({**GOOD, "metrics": [1, 2]}),
    json.dumps([GOOD]),
])
def test_a_record_that_cannot_be_trusted_is_not_read(bad):
    assert parse_progress(json.dumps(GOOD), NOW) is not None
    assert parse_progress(bad, NOW) is None


def test_the_reader_keeps_the_last_good_record_and_forgets_what_is_not_asked(tmp_path):
    store, uri = Store(), progress_uri(stage_uri(tmp_path), "train")
    reader = ProgressReader(clock=lambda: NOW)
    assert reader.read(store, {"sft": uri}) == {}            # not written yet: nothing, no error
    store.write_json(uri, GOOD)
    assert reader.read(store, {"sft": uri})["sft"].done == 4
    store.write_bytes(uri, b"{\"version\": 1, \"do")          # torn, then future-dated
    assert reader.read(store, {"sft": uri})["sft"].done == 4
    store.write_json(uri, {**GOOD, "done": 9, "updatedAt": "2027-01-15T10:00:00Z"})
    assert reader.read(store, {"sft": uri})["sft"].done == 4
    store.write_json(uri, {**GOOD, "done": 6, "movedAt": "2027-01-15T08:00:40Z"})
    assert reader.read(store, {"sft": uri})["sft"].done == 6
    assert reader.read(store, {}) == {}                       # the stage ended: forgotten


def test_a_stage_s_progress_in_status_has_its_eta_and_says_when_it_stalled():
    p = parse_progress(json.dumps(GOOD), NOW)
    live = stage_progress(p, NOW, stall_seconds=900)
    # 4 steps in 40 s: 6 to go at 0.1/s is 60 s from the record, 40 s from now
    assert live == {"step": "train", "unit": "steps", "done": 4, "total": 10, "percent": 40.0,
                    "updatedAt": "2027-01-15T08:00:40Z", "etaSeconds": 40, "rate": 0.1,
                    "metrics": {"loss": 0.5}}
    assert stage_progress(p, NOW + 901, stall_seconds=900)["stalled"] is True


def child(name: str, step: str, created: str, finished: str | None = None, kind: str = "PyTorchJob") -> ChildState:
    return ChildState(kind, name, "sft", step, 1, "Succeeded" if finished else "Running",
                      created=created, finished=finished)


def test_gpu_hours_count_every_child_and_stay_counted_once_it_is_deleted():
    from xwin_operator.core.planner import stage_tasks
    from xwin_operator.core.config import OperatorConfig

    run = make_run()
    tasks = stage_tasks(run, OperatorConfig())
    res = tasks["sft"].params["resources"]
    gpus = res["nodes"] * res["gpusPerNode"]
    now = epoch("2027-01-15T10:00:00Z")
    first = child("demo-sft-1", "train", "2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z")
    cost = stage_cost(run, "sft", tasks["sft"], [first], None, now)
    assert cost["gpuHours"] == pytest.approx(gpus) and cost["children"] == {"demo-sft-1": pytest.approx(gpus)}
    second = child("demo-sft-2", "train", "2027-01-15T09:30:00Z")   # running for 30 min
    later = stage_cost(run, "sft", tasks["sft"], [second], cost, now)  # the first one is gone
    assert later["gpuHours"] == pytest.approx(1.5 * gpus)
    assert stage_cost(run, "sft", tasks["sft"], [], later, now)["gpuHours"] == pytest.approx(1.5 * gpus)


def test_the_run_s_percent_weighs_stages_and_its_summary_fits_kubectl():
    from xwin_operator.core.config import OperatorConfig
    from xwin_operator.core.planner import stage_tasks

    run = make_run()
    tasks = stage_tasks(run, OperatorConfig())
    stages = [{"name": s, "phase": "Pending"} for s in tasks]
    stages[0] = {"name": stages[0]["name"], "phase": "Running", "startTime": "2027-01-15T08:00:00Z",
                 "progress": {"step": "train", "percent": 50.0, "etaSeconds": 600}}
    out = run_progress(run, tasks, stages, "Running", stages[0]["name"], epoch("2027-01-15T09:00:00Z"))
    assert out["summary"] == f"{stages[0]['name']} 50%"
    assert 0 < out["percent"] < 50 and out["etaSeconds"] > 0 and out["eta"] == duration_text(out["etaSeconds"])
    waiting = dict(stages[0], progress={"step": "train", "percent": 50.0})  # no rate: no ETA
    assert "eta" not in run_progress(run, tasks, [waiting, *stages[1:]], "Running", stages[0]["name"],
                                     epoch("2027-01-15T09:00:00Z"))
    done = run_progress(run, tasks, [dict(s, phase="Succeeded") for s in stages], "Succeeded", None, 0)
    assert (done["percent"], done["summary"]) == (100.0, "100%")


@pytest.mark.parametrize("seconds, text", [(50, "50s"), (600, "10m"), (7980, "2h13m"), (3 * 86400 + 4 * 3600, "3d4h")])
def test_durations_read_like_kubectl_ages(seconds, text):
    assert duration_text(seconds) == text


def test_the_crd_shows_progress_eta_and_cost_columns():
    from xwin_operator.api.crd import crd

    columns = {c["name"]: c["jsonPath"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Stage", "Progress", "ETA", "Cost", "Age"]
    assert columns["Progress"] == ".status.progress.summary" and columns["Cost"] == ".status.cost.summary"


def test_the_planner_puts_a_running_step_s_record_in_status_and_drops_it_when_the_stage_ends():
    from xwin_operator.core.planner import decide
    from xwin_operator.core.types import Observed, PatchStatus
    from planner_helpers import child as planned_child

    run = make_run()
    record = parse_progress(json.dumps(GOOD), NOW)
    sft = planned_child("sft", created="2027-01-15T08:00:00Z")
    observed = Observed(children=[sft], markers={}, now="2027-01-15T08:01:00Z", progress={"sft": record})
    status = next(a.status for a in decide(run, observed, None, generation=1) if isinstance(a, PatchStatus))
    stage = next(s for s in status["stages"] if s["name"] == "sft")
    assert stage["progress"]["done"] == 4 and stage["progress"]["percent"] == 40.0
    assert status["progress"]["summary"] == "sft 40%" and "eta" in status["progress"]
    assert status["cost"]["summary"].startswith("$0.00, ") and stage["cost"]["gpuHours"] > 0
    # the same pass again, nothing new: the same status (no patch)
    again = decide(run, observed, status, generation=1)
    assert not [a for a in again if isinstance(a, PatchStatus)]


def test_a_stage_s_cost_is_each_step_s_time_times_the_gpus_its_pods_ask_for(tmp_path):
    """The marker's `cost` (xwin_jobs.cost): the sample step held its servers' 4 GPUs for an
    hour, the judge none; the stage's judge USD is its estimatedCostUSD metric. The GPUs are
    the same the operator requests (one definition: requested_gpus)."""
    from xwin_jobs.cost import requested_gpus, stage_cost, step_costs

    serving = {"serving": {"gpusPerReplica": 2, "replicas": 2}, "resources": {"gpusPerNode": 8, "nodes": 2}}
    assert requested_gpus(serving, "serving") == (2, 4) and requested_gpus(serving, "training") == (8, 16)
    assert requested_gpus(serving, "scoring") == (0, 0) and requested_gpus(serving, "none") == (0, 0)
    clock, uri = Clock(), f"file://{tmp_path}/runs/ns/demo/pairs/"
    sample = ProgressWriter(Store(), uri, "pairs", "sample", "prompts", 10, clock=clock,
                            gpus=requested_gpus(serving, "serving")[1])
    judge = ProgressWriter(Store(), uri, "pairs", "judge", "comparisons", 5, clock=clock)
    clock.t += 3600
    sample.finish()
    judge.finish()
    (tmp_path / "runs/ns/demo/pairs/progress/notes.txt").write_text("not a record")
    (tmp_path / "runs/ns/demo/pairs/progress/torn.json").write_text('{"version": 1, "unit"')
    steps = step_costs(Store(), uri, now=clock.t)
    assert steps == {"sample": {"seconds": 3600.0, "gpus": 4, "gpuHours": 4.0},
                     "judge": {"seconds": 3600.0, "gpus": 0, "gpuHours": 0.0}}
    cost = stage_cost(steps, {"estimatedCostUSD": 1.25, "judgeModel": "gpt-4"})
    assert cost["gpuHours"] == 4.0 and cost["judgeUSD"] == 1.25 and cost["steps"] == steps
    assert step_costs(Store(), f"file://{tmp_path}/runs/ns/demo/none/") == {}
    # a record written before records carried `gpus` reads as 0 GPUs
    old = json.loads((tmp_path / "runs/ns/demo/pairs/progress/sample.json").read_text())
    del old["gpus"]
    assert parse_progress(old, clock.t).gpus == 0


def test_the_cost_upstream_of_a_stage_walks_the_markers_it_read(tmp_path):
    """Evaluate's report sums every stage up the marker graph once (dpo read pairs and sft,
    pairs read sft too), follows no external input, and shows a stage whose marker predates
    `cost` with its judge USD and unknown GPU-hours."""
    from xwin_jobs.cost import totals, upstream_costs
    from xwin_jobs.store import write_marker

    store, root = Store(), f"file://{tmp_path}/runs/ns/demo"
    data = tmp_path / "prompts.jsonl"
    data.write_text("{}\n")

    def marker(stage: str, reads: list[str], cost: dict | None, usd: float = 0.0) -> None:
        body = {"stage": stage, "digest": stage, "metrics": {"estimatedCostUSD": usd},
                "inputDigests": {**{f"{root}/{r}/": r for r in reads}, f"file://{data}": "fp"}}
        write_marker(store, f"{root}/{stage}/", {**body, **({"cost": cost} if cost else {})})

    marker("sft", [], {"gpuHours": 2.0, "judgeUSD": 0.0, "steps": {}})
    marker("pairs", ["sft"], None, usd=3.5)
    marker("dpo", ["sft", "pairs"], {"gpuHours": 1.5, "judgeUSD": 0.0, "steps": {}})
    costs = upstream_costs(store, [f"{root}/dpo/", f"{root}/sft"])
    assert set(costs) == {"dpo", "pairs", "sft"}
    assert costs["pairs"]["gpuHours"] is None and costs["pairs"]["judgeUSD"] == 3.5
    assert totals(costs) == {"gpuHours": 3.5, "judgeUSD": 3.5}
    assert upstream_costs(store, [f"{root}/evaluate/"]) == {}   # no marker yet
