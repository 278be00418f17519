"""The operator's Prometheus metrics (kube/metrics.py).

* the pure transition of two statuses of a run: a stage's attempts, failure (once, with its
  reason) and duration counted once per transition, never per pass; cost counters by the
  increase of a run's totals only (a run first seen counts what it has); exact gauges (runs by
  phase, waiting stages, progress) that a deleted or finished run leaves;
* API errors as KubeApi sees them against the API emulator (409 on create, 404 on delete: no error);
* /metrics scraped over HTTP from a real operator process after a one-stage run, parsed with
  prometheus_client's own parser;
* every PromQL expression of the chart's Grafana dashboard names only series the operator exports.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helm_chart import CHART
from kube import Cluster
from kube.fixtures import NS, cluster, kubelet_factory, operator_factory, tiny_run  # noqa: F401
from kube.harness import RUNS, complete_with_marker, wait_phase
from kube.pods import free_port
from xwin_operator.kube.client import ApiError, KubeApi
from xwin_operator.kube.kubeconfig import MemFiles, login_from_dict
from xwin_operator.kube.metrics import Metrics, observe_status, status_changes

KEY = (NS, "r")


def stage(name: str = "sft", phase: str = "Running", attempts: int = 1, **more) -> dict:
    return {"name": name, "phase": phase, "attempts": attempts, "startTime": "2024-01-01T00:00:00Z", **more}


def status(*stages: dict, phase: str = "Running", **more) -> dict:
    return {"phase": phase, "observedGeneration": 1, "stages": list(stages), **more}


def counters(m: Metrics) -> dict:
    """Every counter and histogram sample (not the gauges), by (name, labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in m.registry.collect()
            if f.type in ("counter", "histogram") for s in f.samples if not s.name.endswith("_created")}


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


# --- the pure transition -------------------------------------------------------------------------

def test_status_changes_reads_a_stage_that_failed_and_one_that_started():
    old = status(stage("sft", "Succeeded", completionTime="2024-01-01T01:00:00Z"), stage("dpo", "Pending", 0))
    new = status(stage("sft", "Succeeded", completionTime="2024-01-01T01:00:00Z"),
                 stage("dpo", "Failed", 2, reason="PodFailurePolicy", startTime="2024-01-01T01:00:00Z",
                       completionTime="2024-01-01T01:30:00.5+00:00"), phase="Failed")
    ch = status_changes(old, new)
    assert ch.phase == "Failed" and ch.attempts == {"dpo": 2}
    assert ch.failures == [("dpo", "PodFailurePolicy")] and ch.durations == [("dpo", 1800.5)]
    assert ch.progress is None and ch.waiting == ()
    unchanged = status_changes(new, new)
    assert (unchanged.attempts, unchanged.failures, unchanged.durations) == ({}, [], [])


def test_a_stage_that_fails_counts_one_failure_with_its_reason_and_its_duration_once():
    m = Metrics()
    running = status(stage())
    failed = status(stage(phase="Failed", reason="StageFailed", completionTime="2024-01-01T02:00:00Z"), phase="Failed")
    observe_status(m, KEY, None, running)
    for _ in range(3):   # the transition, then passes that write nothing new
        observe_status(m, KEY, running, failed)
        running = failed
    assert value(m, "xwin_stage_failures_total", stage="sft", reason="StageFailed") == 1
    assert value(m, "xwin_stage_attempts_total", stage="sft") == 1
    assert value(m, "xwin_stage_duration_seconds_count", stage="sft") == 1
    assert value(m, "xwin_stage_duration_seconds_sum", stage="sft") == 7200
    assert value(m, "xwin_stage_duration_seconds_bucket", stage="sft", le="3600.0") == 0
    assert value(m, "xwin_stage_duration_seconds_bucket", stage="sft", le="7200.0") == 1


def test_a_pass_that_changes_nothing_changes_no_counter():
    m = Metrics()
    s = status(stage("sft", "Succeeded", completionTime="2024-01-01T00:10:00Z"), stage("bestOfN", reason="Unschedulable"),
               cost={"gpuHours": 1.5, "judgeUSD": 0.25}, progress={"percent": 40.0})
    observe_status(m, KEY, None, s)
    before = counters(m)
    assert before[("xwin_stage_attempts_total", (("stage", "bestOfN"),))] == 1
    for _ in range(3):
        observe_status(m, KEY, s, json.loads(json.dumps(s)))
    assert counters(m) == before


def test_a_retry_counts_one_more_attempt_and_no_failure():
    m = Metrics()
    first, second = status(stage()), status(stage(attempts=2))
    observe_status(m, KEY, None, first)
    observe_status(m, KEY, first, second)
    observe_status(m, KEY, second, second)
    assert value(m, "xwin_stage_attempts_total", stage="sft") == 2
    assert value(m, "xwin_stage_failures_total", stage="sft", reason="StageFailed") is None


def test_cost_counters_add_the_increase_of_a_runs_totals_only():
    m = Metrics()
    cost = lambda gpu, usd: status(stage(), cost={"gpuHours": gpu, "judgeUSD": usd, "summary": "..."})  # noqa: E731
    observe_status(m, KEY, None, cost(2.0, 1.0))            # first seen: what it has
    observe_status(m, KEY, cost(2.0, 1.0), cost(3.5, 1.5))  # the increase
    observe_status(m, KEY, cost(3.5, 1.5), cost(3.5, 1.5))  # none
    observe_status(m, KEY, cost(3.5, 1.5), cost(3.0, 1.5))  # a stale total never decreases a counter
    observe_status(m, KEY, cost(3.0, 1.5), cost(3.6, 1.5))  # nor is counted twice
    assert value(m, "xwin_gpu_hours_total", namespace=NS) == pytest.approx(3.6)
    assert value(m, "xwin_judge_usd_total", namespace=NS) == pytest.approx(1.5)
    observe_status(m, (NS, "other"), None, cost(1.0, 0.5))  # another run of the namespace adds its own
    observe_status(m, ("team-b", "r"), None, cost(4.0, 0.0))
    assert value(m, "xwin_gpu_hours_total", namespace=NS) == pytest.approx(4.6)
    assert value(m, "xwin_gpu_hours_total", namespace="team-b") == pytest.approx(4.0)


def test_a_run_first_seen_after_a_restart_counts_its_cost_but_no_past_transition():
    """A new process: the watch shows a run with cost and a finished stage; its next status
    write (over that one) counts only what changed since."""
    m = Metrics()
    was = status(stage("sft", "Succeeded", completionTime="2024-01-01T00:10:00Z"), stage("dpo"),
                 cost={"gpuHours": 5.0, "judgeUSD": 2.0})
    m.seen(KEY, was)
    m.seen(KEY, was)   # its echoes count nothing
    now = json.loads(json.dumps(was))
    now["stages"][1] = stage("dpo", "Succeeded", completionTime="2024-01-01T00:05:00Z")
    now.update(phase="Succeeded", cost={"gpuHours": 6.0, "judgeUSD": 2.0})
    observe_status(m, KEY, was, now)
    assert value(m, "xwin_gpu_hours_total", namespace=NS) == 6.0 and value(m, "xwin_judge_usd_total", namespace=NS) == 2.0
    assert value(m, "xwin_stage_duration_seconds_count", stage="sft") == 0   # born at 0: increase() sees the next
    assert value(m, "xwin_stage_duration_seconds_count", stage="dpo") == 1
    assert value(m, "xwin_stage_attempts_total", stage="dpo") == 0   # started before this process


def test_gauges_are_exact_and_a_deleted_or_finished_run_leaves_them():
    m = Metrics()
    m.seen((NS, "done"), status(phase="Succeeded"))
    m.seen((NS, "new"), {})
    observe_status(m, (NS, "a"), None, status(stage(reason="WaitingForQuota"), progress={"percent": 12.5}))
    observe_status(m, (NS, "b"), None, status(stage(reason="Unschedulable"), progress={"percent": 50}))
    phases = lambda: {p: value(m, "xwin_runs", phase=p) for p in ("Pending", "Running", "Succeeded", "Failed", "Suspended")}  # noqa: E731
    assert phases() == {"Pending": 1, "Running": 2, "Succeeded": 1, "Failed": 0, "Suspended": 0}
    assert value(m, "xwin_stages_waiting", reason="WaitingForQuota") == 1
    assert value(m, "xwin_stages_waiting", reason="Unschedulable") == 1
    assert value(m, "xwin_stages_waiting", reason="ImagePullBackOff") == 0
    assert value(m, "xwin_run_progress_percent", namespace=NS, run="a") == 12.5

    observe_status(m, (NS, "a"), None, status(stage(), progress={"percent": 60}))   # admitted
    assert value(m, "xwin_stages_waiting", reason="WaitingForQuota") == 0
    observe_status(m, (NS, "b"), None, status(stage(phase="Failed", reason="StageFailed"), phase="Failed",
                                              progress={"percent": 50}))
    assert value(m, "xwin_run_progress_percent", namespace=NS, run="b") is None   # finished
    assert value(m, "xwin_stages_waiting", reason="Unschedulable") == 0
    m.forget((NS, "a"))
    m.forget((NS, "done"))
    m.forget((NS, "never-seen"))
    assert value(m, "xwin_run_progress_percent", namespace=NS, run="a") is None
    assert phases() == {"Pending": 1, "Running": 0, "Succeeded": 0, "Failed": 1, "Suspended": 0}


def test_each_metrics_owns_its_registry():
    a, b = Metrics(), Metrics()
    a.api_error("get", 500)
    assert value(a, "xwin_api_errors_total", verb="GET", status="500") == 1
    assert value(b, "xwin_api_errors_total", verb="GET", status="500") is None
    assert {"xwin_runs", "xwin_stage_attempts_total", "xwin_stage_duration_seconds_bucket",
            "xwin_run_progress_percent"} <= a.series()


def test_api_errors_are_what_the_client_sees_fail_not_the_answers_it_expects():
    m = Metrics()
    with Cluster(namespaces=(NS,)) as c:
        api = KubeApi(lambda: login_from_dict(c.kubeconfig_doc(), MemFiles()), on_error=m.api_error)
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": NS},
               "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}

        async def scenario() -> None:
            assert await api.create(job) and not await api.create(job)   # 409: already there
            assert await api.delete("Job", NS, "j") and not await api.delete("Job", NS, "j")   # 404: already gone
            assert not await api.secret_exists(NS, "nope")
            with pytest.raises(ApiError):
                await api.patch_status(NS, "missing", {"phase": "Running"})
            await api.close()

        c.call(scenario)
    assert [(s.labels, s.value) for f in m.registry.collect() if f.name == "xwin_api_errors"
            for s in f.samples if s.name.endswith("_total")] == [({"verb": "PATCH", "status": "404"}, 1.0)]


# --- a real operator, scraped -------------------------------------------------------------------

def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict, family: str, name: str, **labels) -> float | None:
    return next((s.value for s in families[family].samples if s.name == name and s.labels == labels), None)


def test_metrics_scraped_from_a_running_operator_after_a_run(cluster, kubelet_factory, operator_factory, tmp_path):
    """A one-stage run (its child completed at once with its marker) through the real operator
    process, then GET /metrics: every series, and the run's phase, attempt and duration in them."""
    port = free_port()
    kubelet_factory(instant=complete_with_marker())
    op = operator_factory(interval=0.3, env={"XWIN_METRICS_PORT": str(port)})
    run = tiny_run("m", storage={"uri": f"file://{tmp_path}/runs"})
    run["spec"]["stages"] = {"sft": run["spec"]["stages"]["sft"]}
    cluster.create(RUNS, run)
    wait_phase(cluster, NS, "m", timeout=30, operator=op)

    deadline = time.monotonic() + 10
    while True:   # the operator records the status it wrote as it writes it
        try:
            families = scrape(port)
            if sample(families, "xwin_runs", "xwin_runs", phase="Succeeded") == 1:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, op.output()[-3000:]
        time.sleep(0.2)
    exported = {s.name for f in families.values() for s in f.samples}
    assert {"xwin_runs", "xwin_stages_waiting", "xwin_reconcile_duration_seconds_count",
            "xwin_stage_attempts_total", "xwin_stage_duration_seconds_bucket"} <= exported
    assert {"xwin_stage_failures", "xwin_api_errors", "xwin_judge_usd", "xwin_gpu_hours",
            "xwin_run_progress_percent"} <= set(families)   # declared (TYPE, HELP), samples once fed
    assert sample(families, "xwin_stage_attempts", "xwin_stage_attempts_total", stage="sft") == 1
    assert sample(families, "xwin_stage_duration_seconds", "xwin_stage_duration_seconds_count", stage="sft") == 1
    assert sample(families, "xwin_runs", "xwin_runs", phase="Running") == 0
    assert sample(families, "xwin_reconcile_duration_seconds", "xwin_reconcile_duration_seconds_count") >= 1
    assert not [s for s in families["xwin_run_progress_percent"].samples if s.labels.get("run") == "m"]
    for family in ("xwin_gpu_hours", "xwin_judge_usd"):   # the run's status.cost (a CPU run: 0 GPU-hours)
        assert sample(families, family, f"{family}_total", namespace=NS) >= 0

    cluster.delete(RUNS, NS, "m")
    deadline = time.monotonic() + 10
    while sample(scrape(port), "xwin_runs", "xwin_runs", phase="Succeeded") != 0:
        assert time.monotonic() < deadline, "the deleted run is still counted"
        time.sleep(0.2)
    assert "Traceback" not in op.output() and "cannot serve metrics" not in op.output()


def test_a_liveness_endpoint_on_the_metrics_port_is_refused(monkeypatch, capsys):
    from xwin_operator.__main__ import main

    monkeypatch.delenv("XWIN_METRICS_PORT", raising=False)
    assert main(["-n", NS, "--liveness", "http://0.0.0.0:8080/healthz"]) == 2
    assert "metrics port 8080" in capsys.readouterr().err


# --- the Grafana dashboard -----------------------------------------------------------------------

def _exprs(node) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: targets' `expr`, query variables' `query`."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        if node.get("type") == "query" and isinstance(node.get("query"), (str, dict)):
            q = node["query"]
            found.append(q if isinstance(q, str) else q.get("query", ""))
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_every_promql_expression_of_the_dashboard_names_only_series_the_operator_exports():
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = _exprs(dashboard)
    assert len(exprs) >= 6
    named = {n for e in exprs for n in re.findall(r"\b(xwin_[A-Za-z0-9_:]+)", e)}
    exported = Metrics().series()
    assert named and named <= exported, f"not exported by the operator: {sorted(named - exported)}"
    panels = " ".join(p.get("title", "") for p in dashboard["panels"]).lower()
    for topic in ("phase", "stage", "progress", "usd", "gpu"):
        assert topic in panels, topic
    # each kind of series the operator exports for users is on the dashboard
    for name in ("xwin_runs", "xwin_stage_duration_seconds", "xwin_run_progress_percent", "xwin_judge_usd_total",
                 "xwin_gpu_hours_total", "xwin_stages_waiting"):
        assert any(n.startswith(name) for n in named), name
