"""`xwin plan FILE.yaml`: every child manifest the operator would create for a run, stage by
stage, as one YAML stream (`# stage: X` comments between documents) that reads well and pipes
into `kubectl apply --dry-run=server -f -`.

The manifests are those of the first attempt of every step: the planner's planned children,
rendered by the operator's own manifests. The owner reference carries a placeholder uid (the
real one exists only once the AlignmentRun is created); `XWIN_PLAN_UID` replaces it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import yaml

from ..api.spec import AlignmentRun
from ..core.children import planned_children
from ..core.config import OperatorConfig
from ..api.graph import stages_of
from ..core.descriptors import steps_of
from ..core.tasks import stage_task
from .manifests import render

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def planned_manifests(run: AlignmentRun, uid: str = PLACEHOLDER_UID,
                      config: OperatorConfig | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(stage, step, manifest) for every child of every stage, in pipeline order."""
    config = config or OperatorConfig()
    for stage in stages_of(run.spec):
        if getattr(run.spec.stages, stage).reused:
            continue
        task = stage_task(run, stage, config.store or None)
        for step in steps_of(run.spec, stage):
            for child in planned_children(run, stage, step, 1, task):
                yield stage, step.name, render(run, child, uid, config)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def write_plan(run: AlignmentRun, out: TextIO, uid: str = PLACEHOLDER_UID,
               config: OperatorConfig | None = None) -> int:
    """Write the YAML stream; returns the number of manifests."""
    meta = run.metadata
    out.write(f"# xwin plan: the children of AlignmentRun {meta.namespace}/{meta.name} "
              f"(first attempt of every step; owner uid {uid})\n")
    count, last_stage = 0, None
    for stage in stages_of(run.spec):
        st = getattr(run.spec.stages, stage)
        if st.reused:
            out.write(f"# stage: {stage}: reused from {st.from_}; nothing to create\n")
    for stage, step, manifest in planned_manifests(run, uid, config):
        out.write("---\n")
        if stage != last_stage:
            out.write(f"# stage: {stage}\n")
            last_stage = stage
        out.write(f"# step: {step}: {manifest['kind']}/{manifest['metadata']['name']}\n")
        out.write(yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100))
        count += 1
    return count


def count_records(uri: str) -> int | None:
    """Records (non-empty lines) in a local JSON Lines file or folder of shards (.gz too);
    None for what cannot be read here (s3://, hf://, a missing path)."""
    import gzip

    from xwin_jobs.store import Store

    try:
        path = Store().local_path(uri) if "://" in uri else None
    except Exception:  # noqa: BLE001 - an unreadable URI is an unknown count
        return None
    path = path or (Path(uri) if uri.startswith("/") else None)
    if path is None or not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = 0
    for f in files:
        if f.name.startswith(("_", ".")):
            continue
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def judge_estimates(run: AlignmentRun, counts: dict[str, int] | None = None):
    """(the judge stages' estimates, the budget warning or None); record counts from
    `counts` (URI -> N, `--count`), else from the files when they are readable here."""
    from ..core.judge_estimate import budget_warning, estimate_judging, judge_inputs

    given = dict(counts or {})
    known = {uri: given[uri] if uri in given else count_records(uri) for uri in judge_inputs(run.spec)}
    estimates = estimate_judging(run.spec, known)
    return estimates, budget_warning(run.spec, estimates)


def write_judge_estimate(run: AlignmentRun, out: TextIO, counts: dict[str, int] | None = None) -> None:
    """The run's judging cost, as YAML comments (the stream still pipes into kubectl)."""
    from ..core.judge_estimate import summary_lines

    estimates, warning = judge_estimates(run, counts)
    if not estimates:
        return
    out.write("---\n# judge estimate (before the run; judge.budgetUSD caps the run as a whole):\n")
    for line in summary_lines(estimates, run.spec.judge.budgetUSD):
        out.write(f"#   {line}\n")
    if warning:
        out.write(f"# warning: {warning}\n")


def print_plan(run: AlignmentRun, args: Any = None) -> int:
    """Entry point of `xwin plan` (cli.cmd_plan); exit status."""
    uid = getattr(args, "uid", None) or os.environ.get("XWIN_PLAN_UID") or PLACEHOLDER_UID
    try:
        write_plan(run, sys.stdout, uid, OperatorConfig.from_env())
        write_judge_estimate(run, sys.stdout, getattr(args, "count", None))
        sys.stdout.flush()
    except BrokenPipeError:  # `xwin plan run.yaml | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
