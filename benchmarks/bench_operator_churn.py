"""Operator benchmark, the load a cluster has: N runs at once whose children keep changing.

    python benchmarks/bench_operator_churn.py [--runs 200] [--churn 2] [--rounds 2]
        [--before DIR --before-label TEXT] [--no-results]

N AlignmentRuns (two training stages each: sft, then rewardModel; pairs reused) are created
over `--spread` seconds against a fresh fake API server (tests/kube); the test kubelet keeps
each child running for a random 20-60 s (seeded), and while it runs patches the child's status
every `--churn` seconds with what a real controller writes that changes nothing the planner
reads (replicaStatuses counts, a heartbeat condition), then completes it, writing the stage's
marker first. Measured, per operator round (alternating with --before):
  * latency: from the kubelet's write of a child's Succeeded to the operator's status patch of
    the run that shows that stage Succeeded (p50 / p99), timed by the API server;
  * operator CPU per child event (every create, status patch and churn patch of a child, and
    every Pod write, counted by the API server), and per run; peak RSS (VmHWM);
  * runs Succeeded, children created twice.
Goals (issue 21): p99 <= 1 s, peak RSS <= 250 MiB. With no --no-results the
`## Operator under churn` section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))

from bench_operator import percentile  # noqa: E402
from kube import Cluster, Kubelet  # noqa: E402
from kube.harness import RUNS, OperatorProcess, write_marker_for  # noqa: E402
from kube.kubelet import Outcome  # noqa: E402
from kube.paths import resource_path  # noqa: E402

SECTION = "## Operator under churn"
NS = "churn"
CHILD_PLURALS = ("pytorchjobs", "jobs", "deployments", "services", "pods")


class Recorder:
    """Server-side times: each child's Succeeded write, each run status patch per stage."""

    def __init__(self) -> None:
        self.child_done: dict[tuple[str, str], float] = {}     # (run, stage) -> kubelet wrote Succeeded
        self.stage_done: dict[tuple[str, str], float] = {}     # (run, stage) -> operator wrote it Succeeded
        self.child_events = 0
        self.creates: dict[str, int] = {}
        self.labels: dict[str, tuple[str, str]] = {}            # child name -> (run, stage)
        self.succeeded: set[str] = set()

    def on_write(self, request, t: float) -> None:
        plural = request.resource.plural
        data = request.data if isinstance(request.data, dict) else {}
        action = str(getattr(request.action, "value", request.action)).lower()
        if plural in CHILD_PLURALS:
            self.child_events += 1
            if action == "create" and plural != "pods":
                labels = (data.get("metadata") or {}).get("labels") or {}
                name = data["metadata"]["name"]
                self.labels[name] = (labels.get("xwin.ai/run", ""), labels.get("xwin.ai/stage", ""))
                self.creates[name] = self.creates.get(name, 0) + 1
            conds = (data.get("status") or {}).get("conditions") or []
            if plural == "pytorchjobs" and any(c.get("type") == "Succeeded" and c.get("status") == "True" for c in conds):
                key = self.labels.get(request.name)
                if key:
                    self.child_done.setdefault(key, t)
        elif plural == "alignmentruns" and action == "update":
            status = data.get("status") or {}
            for stage in status.get("stages") or []:
                if stage.get("phase") == "Succeeded":
                    self.stage_done.setdefault((request.name, stage["name"]), t)
            if status.get("phase") == "Succeeded":
                self.succeeded.add(request.name)


def run_manifest(name: str, store: Path, inputs: Path) -> dict:
    return {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": f"file://{inputs}", "storage": {"uri": f"file://{store}"},
                     "defaults": {"resources": {"nodes": 1, "gpusPerNode": 0}},
                     "stages": {"sft": {"data": f"file://{inputs}/sft.jsonl"},
                                "pairs": {"from": f"file://{inputs}/pairs.jsonl"},
                                "rewardModel": {"init": "sft"}}}}


def churning(cluster: Cluster, churn: float, seed: int):
    """The kubelet's outcome: run 20-60 s, a non-decisive status patch every `churn` s, then
    the marker and success."""
    rng = random.Random(seed)

    async def outcome(child: dict) -> Outcome:
        meta = child["metadata"]
        path = resource_path("kubeflow.org/v1/pytorchjobs", meta["namespace"], meta["name"], "status")
        end = time.monotonic() + rng.uniform(20, 60)
        beat = 0
        while time.monotonic() < end:
            await asyncio.sleep(min(churn, max(0.0, end - time.monotonic())))
            beat += 1
            await cluster._request("patch", path, {"status": {
                "replicaStatuses": {"Master": {"active": 1, "selector": f"beat={beat}"}},
                "lastReconcileTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
        await asyncio.to_thread(write_marker_for, child)
        return Outcome()
    return outcome


def measure(kind: str, args: argparse.Namespace, work: Path, seed: int) -> dict:
    from xwin_operator.api.crd import crd

    inputs, store = work / "inputs", work / "store"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "config.json").write_text("{}")
    (inputs / "sft.jsonl").write_text('{"id": "c0", "messages": []}\n')
    (inputs / "pairs.jsonl").write_text('{"id": "p0"}\n')
    rec = Recorder()
    with Cluster(namespaces=(NS,), crds=(crd(),), keep_history=False) as cluster:
        cluster.api.on_write = rec.on_write
        kubelet = Kubelet(cluster, work=work / "node", namespace=NS, instant=churning(cluster, args.churn, seed)).start()
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [args.before, os.environ.get("PYTHONPATH")]))} \
            if kind == "before" else {}
        op = OperatorProcess(cluster, work / "operator", namespace=NS, interval=args.interval,
                             argv=[sys.executable, "-m", "xwin_operator", "--quiet", "-n", NS], env=env).start()
        names = [f"run-{i:04d}" for i in range(args.runs)]
        try:
            time.sleep(2.0)
            cpu0, events0, started = op.cpu_seconds(), rec.child_events, time.monotonic()
            for i, name in enumerate(names):   # spread over --spread seconds
                cluster.create(RUNS, run_manifest(name, store, inputs))
                time.sleep(max(0.0, started + args.spread * (i + 1) / args.runs - time.monotonic()))
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline and len(rec.succeeded & set(names)) < len(names):
                if not op.alive:
                    raise RuntimeError(f"{kind} operator exited:\n{op.output()[-3000:]}")
                time.sleep(0.5)
            cpu, events, rss = op.cpu_seconds() - cpu0, rec.child_events - events0, op.peak_rss_mb()
        finally:
            op.stop()
            kubelet.stop()
    lags = [rec.stage_done[k] - t for k, t in rec.child_done.items() if k in rec.stage_done]
    return {"kind": kind, "runs": len(names), "succeeded": len(rec.succeeded & set(names)),
            "lag_p50": percentile(lags, 0.5), "lag_p99": percentile(lags, 0.99), "lag_max": max(lags, default=float("nan")),
            "samples": len(lags), "child_events": events, "cpu_s": cpu,
            "cpu_ms_per_event": 1000 * cpu / max(events, 1), "cpu_ms_per_run": 1000 * cpu / len(names),
            "rss_mb": rss, "duplicates": sum(1 for n in rec.creates.values() if n > 1), "load": os.getloadavg()[0]}


def row(r: dict, label: str) -> str:
    return (f"| {label} | {r['lag_p50']:.2f} / {r['lag_p99']:.2f} (max {r['lag_max']:.2f}) | {r['samples']} | "
            f"{r['cpu_ms_per_event']:.2f} | {r['cpu_ms_per_run']:.0f} | {r['child_events']} | {r['rss_mb']:.0f} | "
            f"{r['succeeded']}/{r['runs']} | {r['duplicates']} | {r['load']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--churn", type=float, default=2.0, help="seconds between a running child's status patches")
    parser.add_argument("--spread", type=float, default=20.0, help="seconds over which the runs are created")
    parser.add_argument("--interval", type=float, default=3.0, help="the operator's reconcile interval (s)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", metavar="DIR", help="also measure an older operator: DIR first on PYTHONPATH")
    parser.add_argument("--before-label", default="before")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    kinds = ("xwin", "before") if args.before else ("xwin",)
    rows: list[tuple[str, dict]] = []
    for round_ in range(args.rounds):
        for kind in (kinds if round_ % 2 == 0 else kinds[::-1]):
            with tempfile.TemporaryDirectory(prefix="bench-churn-") as tmp:
                r = measure(kind, args, Path(tmp), seed=round_)
            label = "xwin_operator" if kind == "xwin" else f"xwin_operator before ({args.before_label})"
            rows.append((f"{label}, round {round_ + 1}", r))
            print(f"round {round_ + 1} {kind}: {r}", flush=True)
    text = "\n".join([
        "| operator | child Succeeded -> run status p50 / p99 (s) | samples | operator CPU per child event (ms) | "
        "operator CPU per run (ms) | child events | peak RSS (MiB) | runs Succeeded | children created twice | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(row(r, label) for label, r in rows)])
    print(text)
    if not args.no_results:
        from results_md import replace_section

        cmd = (f"python benchmarks/bench_operator_churn.py --runs {args.runs} --churn {args.churn} --spread {args.spread} "
               f"--rounds {args.rounds}" + (f" --before {args.before}" if args.before else ""))
        replace_section(SECTION, f"{SECTION}\n\n`{cmd}` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
                        + " ".join(__doc__.split("\n\n")[2].split()) + "\n\n" + text + "\n", ROOT / "RESULTS.md")
    ok = all(r["succeeded"] == r["runs"] and r["duplicates"] == 0 for _, r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
