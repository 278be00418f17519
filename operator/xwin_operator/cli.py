"""The `xwin` command: run, status, validate, crd, plan."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .api.spec_io import SpecError, load_run


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and CI: wide enough for the summary table
        console = Console(highlight=False, width=160)
    return console


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        try:
            run = load_run(f, for_kubectl=True)  # the file is what `kubectl apply` will read
        except SpecError as e:
            print(e, file=sys.stderr)
            bad += 1
            continue
        print(f"{f}: ok (AlignmentRun {run.metadata.namespace}/{run.metadata.name}, "
              f"stages: {', '.join(run.spec.stages.present())})")
        from .kube.plan_print import judge_estimates

        _, warning = judge_estimates(run, args.count)
        if warning:  # a warning, not an error: the budget stops the run safely
            print(f"{f}: warning: {warning}", file=sys.stderr)
    return 1 if bad else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from .api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.file)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    from .kube.plan_print import print_plan

    return print_plan(run, args)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from xwin_jobs.store import Store

    from .status_view import metrics_text

    from .local.executor import (Interrupted, LocalContext, RunError, StageOutcome, default_log_dir,
                                 default_nproc_per_node, describe_root, execute, job_env,
                                 local_config, python_for_jobs)
    from .run_display import RunDisplay

    console = _console()
    try:
        run = load_run(args.file)
    except SpecError as e:
        console.print(str(e), markup=False)
        return 1
    store_uri = args.store
    log_dir = Path(args.logs) if args.logs else default_log_dir(run)
    env = job_env(run)
    store = Store(endpoint_url=env.get("AWS_ENDPOINT_URL"))
    config = local_config(store_uri, env, args.backoff)
    console.print(f"[bold]AlignmentRun {run.metadata.namespace}/{run.metadata.name}[/] → "
                  f"{describe_root(run, store_uri)}  (logs: {log_dir}, status: {log_dir}/status.json)")
    # the spinner line, and (unless --no-progress) a bar per running step on a terminal, or a
    # plain progress line per running step every 30 s elsewhere (run_display.py)
    display = RunDisplay(console, bars=not args.no_progress)
    started: dict[str, float] = {}

    def on_line(stage: str, line: str) -> None:
        display.spin(stage, f"{time.monotonic() - started.get(stage, time.monotonic()):.0f}s  {line[-100:]}")
        if args.verbose:
            console.print(f"  [dim]{stage}[/] {line}", markup=True, highlight=False)

    def on_event(reason: str, message: str, type_: str) -> None:
        """The planner's Events: warnings (a failed attempt, a retry) always, the rest with -v."""
        if reason == "ChildCreated":
            if args.verbose:
                console.print(f"  [dim]· create {message}[/]", highlight=False)
        elif type_ == "Warning" and reason not in ("StageFailed", "RunFailed"):
            console.print(f"  [yellow]! {reason}:[/] {message}", highlight=False, markup=True)
        elif args.verbose:
            console.print(f"  [dim]· {reason}: {message}[/]", highlight=False)

    def on_stage(event: "StageOutcome | str") -> None:
        if isinstance(event, str):
            started[event] = time.monotonic()
            display.spin(event, "starting")
            return
        style = {"ran": "green", "skipped": "cyan", "reused": "cyan", "failed": "red"}[event.outcome]
        console.print(f"[{style}]{event.outcome:>7}[/] {event.stage}"
                      + (f" ({event.seconds:.1f}s)" if event.seconds else "")
                      + (f"  {event.message}" if event.message and event.outcome == "failed" else ""),
                      highlight=False)

    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        console.print(f"--nproc-per-node: must be >= 1, got {args.nproc_per_node}", markup=False)
        return 2
    if args.dry_run:
        return dry_run(run, store, config)
    nproc = args.nproc_per_node or default_nproc_per_node()
    last: dict = {}   # the status of the last pass (its cost goes under the summary)

    def on_status(status: dict) -> None:
        last.update(status)
        display.status(status)

    ctx = LocalContext(python=python_for_jobs(), env=env, log_dir=log_dir, on_line=on_line,
                       on_event=on_event, on_status=on_status, nproc_per_node=nproc)
    code, results = 0, []
    with display:
        try:
            results = execute(run, store_uri=store_uri, ctx=ctx, store=store, on_stage=on_stage,
                              config=config)
        except RunError as e:
            results, code = getattr(e, "results", []), 130 if isinstance(e, Interrupted) else 1
            failure = str(e)
    table = Table(title="summary", expand=False)
    for col in ("stage", "result", "seconds", "metrics", "artifact"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r.stage, r.outcome, f"{r.seconds:.1f}" if r.seconds else "", metrics_text(r.metrics),
                      r.artifact or "")
    console.print(table)
    if (last.get("cost") or {}).get("summary"):
        console.print(f"cost: {last['cost']['summary']}", highlight=False, markup=False)
    if code:
        console.print(f"[red]failed:[/] {failure}", highlight=False)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    """`xwin status`: a run's table, from a local run's status.json or the cluster's AlignmentRun.
    A file, run or login that cannot be read is one line on stderr and exit code 1."""
    import json

    from .status_view import header, run_table

    def fail(message: str) -> int:
        print(f"xwin status: {message}", file=sys.stderr)
        return 1

    local = args.log_dir or (args.name if args.name and "/" in args.name else None)  # no k8s name has a '/'
    if local:
        path = Path(local)
        if path.is_dir() or (not path.exists() and path.suffix != ".json"):
            path = path / "status.json"
        try:
            status = json.loads(path.read_text())
        except FileNotFoundError:
            return fail(f"{path}: no such file (xwin run writes <log dir>/status.json after every pass)")
        except OSError as e:
            return fail(f"{path}: cannot be read: {e.strerror or e}")
        except ValueError as e:
            return fail(f"{path}: not JSON ({e})")
        title = str(path.parent) if path.name == "status.json" else str(path)
        if not isinstance(status, dict):
            return fail(f"{path}: not a run's status (a JSON object)")
    elif args.name:
        from .kube.run_get import RunReadError, get_run

        try:
            obj, namespace = get_run(args.name, args.namespace, context=args.context)
        except RunReadError as e:
            return fail(str(e))
        status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
        title = f"AlignmentRun {namespace}/{args.name}"
    else:
        print("xwin status: give a run's NAME (an AlignmentRun on the cluster) or --log-dir DIR "
              "(a local run's log folder or its status.json)", file=sys.stderr)
        return 2
    if args.output == "json":
        sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
        return 0
    console = _console()
    console.print(header(status, title), markup=False, highlight=False)
    if isinstance(status.get("message"), str) and status["message"]:
        console.print(f"  {status['message']}", markup=False, highlight=False)
    console.print(run_table(status))
    return 0


def dry_run(run, store, config) -> int:
    """`xwin run --dry-run`: each stage's decision, as core.explain words it."""
    from .core.explain import explain
    from .core.loop import observe_sync
    from .core.planner import stage_tasks
    from .local.children import LocalChildren
    from .local.executor import LocalObserver, RunError

    observer = LocalObserver(LocalChildren(None), store)
    try:
        observed = observe_sync(run, observer, stage_tasks(run, config))
    except RunError as e:
        print(f"failed: {e}")
        return 1
    for stage, why in explain(run, observed, config).items():
        print(f"{stage}: {why}")
    return 0


def _count(text: str) -> tuple[str, int]:
    uri, sep, n = text.rpartition("=")
    if not sep or not uri or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected URI=N (a record count), got {text!r}")
    return uri, int(n)


class _Counts(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        counts = dict(getattr(namespace, self.dest) or {})
        counts[values[0]] = values[1]
        setattr(namespace, self.dest, counts)


COUNT_OPTION = dict(type=_count, action=_Counts, default={}, metavar="URI=N",
                    help="the number of records of a judge stage's input that cannot be read here "
                         "(an s3:// prompt file), for the judge cost estimate; repeatable")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xwin", description="Xwin-LM alignment runs: validate, plan, run, status.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check AlignmentRun files against the spec")
    v.add_argument("files", nargs="+")
    v.add_argument("--count", **COUNT_OPTION)
    v.set_defaults(func=cmd_validate)
    c = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the spec")
    c.set_defaults(func=cmd_crd)
    pl = sub.add_parser("plan", help="print every child manifest the operator would create")
    pl.add_argument("file")
    pl.add_argument("--count", **COUNT_OPTION)
    pl.set_defaults(func=cmd_plan)
    # `xwin operator ...` hands every argument to `python -m xwin_operator` (see main())
    sub.add_parser("operator", help="run the operator (kopf) against the current cluster")
    r = sub.add_parser("run", help="run an AlignmentRun on this machine with the operator's planner, "
                                   "one process at a time")
    r.add_argument("file")
    r.add_argument("--store", default=None,
                   help="artifact root replacing spec.storage.uri (default: the spec's storage.uri; "
                        "a relative file://./x resolves against the working directory)")
    r.add_argument("--logs", default=None, help="folder for stage logs (default ./xwin-logs/<ns>/<name>)")
    r.add_argument("--backoff", type=float, default=None, metavar="SECONDS",
                   help="wait before retrying a failed stage (attempt 2; doubles per attempt up to "
                        "XWIN_BACKOFF_MAX_SECONDS); default XWIN_BACKOFF_SECONDS or 10, as the operator")
    r.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="ranks of every training stage: torchrun with N processes, as a PyTorchJob "
                        "replica runs it (default: the visible GPUs, else 1)")
    r.add_argument("--dry-run", action="store_true",
                   help="say which stages would run and why (a missing marker, an input whose "
                        "content changed, a stage they read), and run nothing")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print every line the stages log, every child created and every Event")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bars (on a terminal) nor plain progress lines (elsewhere, at "
                        "most one per running step every 30 s)")
    r.set_defaults(func=cmd_run)
    st = sub.add_parser("status", help="print a run's stages, progress, ETA and cost: a local run's "
                                       "status.json or an AlignmentRun on the cluster")
    st.add_argument("name", nargs="?", default=None,
                    help="the AlignmentRun's name on the cluster (a path with a '/' reads that file)")
    st.add_argument("-n", "--namespace", default=None,
                    help="its namespace (default: the kubeconfig context's, else default)")
    st.add_argument("--context", default=None, help="the kubeconfig context (default: the current one)")
    st.add_argument("--log-dir", default=None, metavar="DIR",
                    help="a local run: its log folder (xwin-logs/<ns>/<name>) or its status.json")
    st.add_argument("-o", "--output", choices=("table", "json"), default="table",
                    help="json: the status as it is")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        from .__main__ import main as operator_main

        return operator_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
