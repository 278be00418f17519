"""`xwin status` and `xwin run`'s progress display (status_view.py, run_display.py): a run's
table with and without live progress and cost, odd fields that must not crash it, the table of
a status.json a real `xwin run` wrote, a missing or unreadable file, an AlignmentRun read from
the API emulator with the operator's login, and the progress a running step shows on a
terminal (bars) and elsewhere (one plain line per step every 30 s)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from rich.console import Console

from kube.fixtures import NS, cluster, tiny_run  # noqa: F401
from kube.harness import RUNS
from xwin_operator.cli import main
from xwin_operator.local.executor import LocalContext, RunError, execute
from xwin_operator.run_display import RunDisplay
from xwin_operator.status_view import header, plain_line, progress_bars, run_table

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 12, 7, 10, 45, 0, tzinfo=timezone.utc)

TRAIN = {"step": "train", "unit": "steps", "done": 41, "total": 100, "percent": 41.0, "etaSeconds": 1234,
         "rate": 0.8, "updatedAt": "2026-12-07T10:41:10Z",
         "metrics": {"loss": 0.61, "learningRate": 2e-06, "tokensPerSecond": 5100.0}}
LIVE = {
    "phase": "Running", "stage": "dpo", "message": "stage dpo: step train (attempt 1)",
    "progress": {"percent": 57.3, "etaSeconds": 8000, "summary": "dpo 41%", "eta": "2h13m"},
    "cost": {"gpuHours": 12.3, "judgeUSD": 4.1, "summary": "$4.10, 12.3 GPU-h"},
    "stages": [
        {"name": "sft", "phase": "Succeeded", "attempts": 1, "startTime": "2026-12-07T08:00:00Z",
         "completionTime": "2026-12-07T09:02:05Z", "metrics": {"trainLoss": 0.93, "steps": 120},
         "cost": {"gpuHours": 8.0, "judgeUSD": 0.0}},
        {"name": "pairs", "phase": "Running", "attempts": 2, "startTime": "2026-12-07T09:02:05Z",
         "progress": {"step": "judge", "unit": "comparisons", "done": 300, "total": 500, "etaSeconds": 600,
                      "metrics": {"usd": 4.1, "requestsPerSecond": 2.5}, "stalled": True},
         "cost": {"gpuHours": 3.1, "judgeUSD": 4.1}},
        {"name": "dpo", "phase": "Running", "attempts": 1, "startTime": "2026-12-07T10:00:00Z",
         "progress": TRAIN, "cost": {"gpuHours": 1.2, "judgeUSD": 0.0}},
        {"name": "evaluate", "phase": "Pending"},
    ],
}


def text_of(renderable, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(renderable)
    return console.export_text()


def rows(table_text: str) -> dict[str, list[str]]:
    """stage -> its cells, from a rendered run_table."""
    out = {}
    for line in table_text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 8 and cells[0]:
            out[cells[0]] = cells[1:]
    return out


def test_table_and_header_of_a_status_with_progress_and_cost():
    assert header(LIVE, "demo/x") == "demo/x: Running, stage dpo, 57.3% (dpo 41%), ETA 2h13m, cost $4.10, 12.3 GPU-h"
    table = rows(text_of(run_table(LIVE, now=NOW)))
    assert table["sft"] == ["Succeeded", "", "", "trainLoss=0.93, steps=120", "8.0 GPU-h", "1", "1h02m"]
    assert table["pairs"] == ["Running", "judge 300/500 comparisons 60%", "stalled", "$4.10, 2.5 req/s",
                              "$4.10, 3.1 GPU-h", "2", "1h42m"]
    assert table["dpo"] == ["Running", "train 41/100 steps 41%", "20m34s", "loss 0.61, 5100 tok/s", "1.2 GPU-h",
                            "1", "45m00s"]
    assert table["evaluate"] == ["Pending", "", "", "", "", "", ""]


def test_table_of_a_status_without_progress_or_cost_and_with_odd_fields():
    old = {"phase": "Succeeded", "stages": [
        {"name": "sft", "phase": "Succeeded", "attempts": 1, "startTime": "2026-12-07T08:00:00Z",
         "completionTime": "2026-12-07T08:00:42Z", "metrics": {"trainLoss": 0.5}},
        {"name": "dpo", "phase": "Failed", "reason": "StageFailed", "attempts": 3}]}
    assert header(old) == "Succeeded"
    table = rows(text_of(run_table(old, now=NOW)))
    assert table["sft"] == ["Succeeded", "", "", "trainLoss=0.5", "", "1", "42s"]
    assert table["dpo"] == ["Failed (StageFailed)", "", "", "", "", "3", ""]

    odd = {"phase": 3, "progress": "57%", "cost": [1], "stages": [
        "not a stage",
        {"name": "a", "phase": "Running", "attempts": "two", "startTime": 5, "progress": {
            "unit": 7, "done": "x", "total": None, "percent": float("nan"), "etaSeconds": "soon",
            "metrics": ["loss"], "stalled": "yes"}, "cost": {"gpuHours": True}, "metrics": None},
        {"name": "b", "phase": "Running", "progress": {"done": 5, "total": 0, "rate": 2}}]}
    assert header(odd) == "3"
    table = rows(text_of(run_table(odd, now=NOW)))
    assert table["a"] == ["Running", "", "", "", "", "", ""]
    assert table["b"] == ["Running", "5", "", "2 units/s", "", "", ""]
    for status in ({}, None, [], {"stages": "x"}, {"stages": [{}]}):
        text_of(run_table(status))
        header(status)
        assert all(b.stage == "?" for b in progress_bars(status))


def test_progress_bars_and_plain_lines_of_running_steps():
    bars = {b.key: b for b in progress_bars(LIVE)}
    assert list(bars) == ["pairs/judge", "dpo/train"]
    assert plain_line(bars["dpo/train"]) == "  progress dpo/train: 41/100 steps 41%, ETA 20m34s, loss 0.61, 5100 tok/s"
    assert plain_line(bars["pairs/judge"]) == "  progress pairs/judge: 300/500 comparisons 60%, stalled, $4.10, 2.5 req/s"
    sampling = {"name": "bestOfN", "phase": "Running", "progress": {
        "step": "sample", "unit": "prompts", "done": 10, "total": 64, "etaSeconds": 45,
        "metrics": {"responsesPerSecond": 12.5}}}
    [bar] = progress_bars({"stages": [sampling, {"name": "sft", "phase": "Running"}]})[:1]
    assert plain_line(bar) == "  progress bestOfN/sample: 10/64 prompts 16%, ETA 45s, 12.5 resp/s"
    starting = progress_bars({"stages": [{"name": "sft", "phase": "Running"}]})[0]
    assert (starting.key, starting.done, starting.total, plain_line(starting)) == \
        ("sft", None, None, "  progress sft: no progress yet")


def with_dpo(done: int, **progress) -> dict:
    status = json.loads(json.dumps(LIVE))
    status["stages"][2]["progress"].update(done=done, percent=float(done), **progress)
    return status


def test_non_terminal_progress_line_for_a_running_step_at_most_every_30_seconds():
    out, clock = io.StringIO(), [100.0]
    console = Console(file=out, width=160)
    assert not console.is_terminal
    with RunDisplay(console, clock=lambda: clock[0]) as display:
        display.spin("dpo", "a log line with [brackets/] that is no markup")
        display.status(with_dpo(41))
        clock[0] += 10
        display.status(with_dpo(45))          # 10 s later: nothing
        clock[0] += 25
        display.status(with_dpo(50))          # 35 s after the first line: one more
        clock[0] += 40
        display.status(with_dpo(50))          # not moved: nothing
        display.status({**with_dpo(50), "stages": LIVE["stages"][:2]})  # dpo finished
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "dpo/" in line] == [
        "  progress dpo/train: 41/100 steps 41%, ETA 20m34s, loss 0.61, 5100 tok/s",
        "  progress dpo/train: 50/100 steps 50%, ETA 20m34s, loss 0.61, 5100 tok/s"]
    assert lines == ["  progress pairs/judge: 300/500 comparisons 60%, stalled, $4.10, 2.5 req/s", lines[1], lines[2]]

    from xwin_operator.cli import build_parser

    assert build_parser().parse_args(["run", "run.yaml", "--no-progress"]).no_progress
    out = io.StringIO()
    with RunDisplay(Console(file=out, width=160), bars=False) as display:   # --no-progress
        display.status(with_dpo(41))
    assert out.getvalue() == ""


def test_terminal_progress_bars_follow_the_running_steps():
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True)
    with RunDisplay(console) as display:
        display.status(with_dpo(41))
        tasks = {t.description: t for t in display._progress.tasks}
        assert set(tasks) == {"pairs judge", "dpo train"}
        assert (tasks["dpo train"].completed, tasks["dpo train"].total, tasks["dpo train"].fields["eta"]) == \
            (41, 100, "ETA 20m34s")
        display.status({**with_dpo(80), "stages": LIVE["stages"][:2] + [
            {"name": "dpo", "phase": "Running", "progress": {**TRAIN, "done": 80}}]})
        assert {t.description: t.completed for t in display._progress.tasks} == {"pairs judge": 300, "dpo train": 80}
        display.status({"phase": "Succeeded", "stages": [{"name": "dpo", "phase": "Succeeded"}]})
        assert display._progress.tasks == []
    assert "dpo train" in out.getvalue() and "80/100 steps" in out.getvalue()
    assert "run: Running, stage dpo, 57.3% (dpo 41%), ETA 2h13m, cost $4.10, 12.3 GPU-h" in out.getvalue()


def test_xwin_status_of_the_status_json_a_real_xwin_run_wrote(tmp_path, capsys):
    """`xwin run` of the tiny example without its data: every stage fails at once (its inputs
    are missing), status.json is written, and `xwin status` reads it back."""
    shutil.copy(ROOT / "examples/tiny/run-training.yaml", tmp_path / "run.yaml")
    res = subprocess.run([sys.executable, "-m", "xwin_operator.cli", "run", "run.yaml", "--backoff", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "progress " not in res.stdout and "Traceback" not in res.stderr
    log_dir = tmp_path / "xwin-logs/demo/tiny"
    assert main(["status", "--log-dir", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{log_dir}: Failed, stage sft")
    table = rows(out)
    assert table["sft"][0] == "Failed (InputNotFound)" and table["pairs"][0] == "Skipped"
    assert main(["status", str(log_dir / "status.json"), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((log_dir / "status.json").read_text())


def test_xwin_run_hands_the_status_of_every_pass_to_on_status(tmp_path, monkeypatch):
    from xwin_jobs.store import Store
    from xwin_operator.api.spec_io import load_run

    monkeypatch.chdir(tmp_path)   # the run's file://./ URIs: nothing there, so it fails at once
    statuses: list[dict] = []
    ctx = LocalContext(sys.executable, dict(os.environ), tmp_path / "logs", on_status=statuses.append)
    with pytest.raises(RunError):
        execute(load_run(ROOT / "examples/tiny/run-training.yaml"), store_uri=None, ctx=ctx, store=Store())
    assert statuses and statuses[-1] == json.loads((tmp_path / "logs/status.json").read_text())


def test_xwin_status_of_a_missing_or_unreadable_file(tmp_path, capsys):
    assert main(["status", "--log-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err == (f"xwin status: {tmp_path}/nowhere/status.json: no such file "
                   "(xwin run writes <log dir>/status.json after every pass)\n")
    (tmp_path / "status.json").write_text("{not json")
    assert main(["status", "--log-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"xwin status: {tmp_path}/status.json: not JSON") and err.count("\n") == 1
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["status", str(tmp_path / "list.json")]) == 1
    assert capsys.readouterr().err == f"xwin status: {tmp_path}/list.json: not a run's status (a JSON object)\n"


def test_xwin_status_reads_the_alignmentrun_from_the_cluster(cluster, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
    cluster.create(RUNS, tiny_run("x", storage={"uri": "file:///unused"}))
    cluster.patch(RUNS, NS, "x", {"status": LIVE}, subresource="status")

    assert main(["status", "x", "-n", NS]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"AlignmentRun {NS}/x: Running, stage dpo, 57.3% (dpo 41%), ETA 2h13m, "
                          "cost $4.10, 12.3 GPU-h\n  stage dpo: step train (attempt 1)\n")
    assert rows(out)["dpo"][:4] == ["Running", "train 41/100 steps 41%", "20m34s", "loss 0.61, 5100 tok/s"]
    assert main(["status", "x", "-o", "json"]) == 0    # the context's namespace
    assert json.loads(capsys.readouterr().out) == LIVE

    assert main(["status", "nope", "-n", NS]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"xwin status: AlignmentRun {NS}/nope not found (kubeconfig {tmp_path}/kubeconfig, context 'fake')\n"
    assert captured.out == ""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    assert main(["status", "x"]) == 1
    assert capsys.readouterr().err.startswith("xwin status: cannot log in to read AlignmentRun x: no kubeconfig found")


def test_plain_progress_lines_print_the_first_count_at_once_then_every_interval():
    """Off a terminal `xwin run` prints a step's line when it starts (0/N), its first real
    count at once (a short stage would otherwise show only 0/N), then at most every interval
    and only when the counts moved."""
    import io

    from rich.console import Console

    from xwin_operator.run_display import RunDisplay

    out, now = io.StringIO(), [0.0]
    display = RunDisplay(Console(file=out, force_terminal=False, width=200), interval=30.0,
                         clock=lambda: now[0])

    def seen(done: int, at: float) -> None:
        now[0] = at
        display.status({"phase": "Running", "stages": [{"name": "sft", "phase": "Running", "progress": {
            "step": "train", "unit": "steps", "done": done, "total": 40, "percent": 100 * done / 40}}]})

    for done, at in ((0, 0.0), (0, 1.0), (3, 2.0), (9, 10.0), (20, 32.5), (20, 70.0), (21, 71.0)):
        seen(done, at)
    counts = re.findall(r"progress sft/train: (\d+)/40 steps", out.getvalue())
    assert counts == ["0", "3", "20", "21"], out.getvalue()
