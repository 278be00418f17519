"""What `xwin run` shows while it runs, from the status after each pass of the local loop
(local.executor.LocalContext.on_status), as status_view words it:

  * on a terminal: one live area (rich `Live`, cleared when the run ends) holding the spinner
    line (the stage and its last log line), the run's progress, ETA and cost when the status
    has them (status_view.header), and a progress bar per running stage's step
    (training steps, sampled prompts, scored responses, judged comparisons), each with its
    counts, ETA and the figure of its unit (loss, responses/s, spend);
  * elsewhere (a log file, CI, a pipe): no live area, and at most one plain line per running
    step every `interval` seconds (`  progress dpo/train: 41/100 steps 41%, ETA 20m34s, ...`),
    printed only when its counts moved, so the other lines of the output stay as they are
    (a step's first count after its "0/N" line is printed at once).

`bars=False` (`xwin run --no-progress`) keeps only the spinner line. A rendering error turns
the progress display off with one line; it never stops the run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.spinner import Spinner
from rich.text import Text

from .status_view import Bar, header, plain_line, progress_bars

PLAIN_INTERVAL = 30.0   # seconds between two plain lines of one step


class RunDisplay:
    def __init__(self, console: Console, *, bars: bool = True, interval: float = PLAIN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.console, self.bars, self.interval, self.clock = console, bars, interval, clock
        self.live_area = console.is_terminal
        self._spinner = Spinner("dots", Text("starting"))
        self._progress = Progress(TextColumn("  [bold]{task.description}"), BarColumn(bar_width=30),
                                  TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[pct]}"),
                                  TextColumn("{task.fields[eta]}"), TextColumn("[dim]{task.fields[detail]}"),
                                  console=console, auto_refresh=False)
        self._tasks: dict[str, TaskID] = {}
        self._printed: dict[str, tuple[float, tuple]] = {}   # step key -> (when, what) of its last line
        self._summary = Text("", style="dim")
        self._live = Live(self._area(), console=console, transient=True,
                          refresh_per_second=8) if self.live_area else None

    def _area(self) -> Group:
        return Group(self._spinner, *([self._summary] if self._summary.plain else []), self._progress)

    def __enter__(self) -> "RunDisplay":
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()

    def spin(self, stage: str, rest: str = "") -> None:
        """The spinner line: `stage` in bold, then `rest` as it is (a log line is no markup)."""
        self._spinner.update(text=Text.assemble((stage, "bold"), f" {rest}" if rest else ""))

    def status(self, status: dict) -> None:
        """The run's status after a pass: bars (terminal) or plain lines (elsewhere)."""
        if not self.bars:
            return
        try:
            bars = progress_bars(status)
            if self.live_area:
                run = status if isinstance(status, dict) else {}
                if isinstance(run.get("progress"), dict) or isinstance(run.get("cost"), dict):
                    self._summary.plain = "  run: " + header(status)
                    if self._live is not None:
                        self._live.update(self._area())
                self._update_bars(bars)
            else:
                self._print_lines(bars)
        except Exception as e:  # noqa: BLE001 - a display, never a reason to stop the run
            self.bars = False
            for task in self._tasks.values():
                self._progress.remove_task(task)
            self.console.print(f"  progress display off: {type(e).__name__}: {e}", markup=False,
                               highlight=False)

    def _update_bars(self, bars: list[Bar]) -> None:
        keys = {b.key for b in bars}
        for key in [k for k in self._tasks if k not in keys]:   # a finished stage, an earlier step
            self._progress.remove_task(self._tasks.pop(key))
        for bar in bars:
            fields = dict(counts=bar.counts, pct=f"{bar.percent:.0f}%" if bar.percent is not None else "",
                          eta=(bar.eta if bar.stalled else f"ETA {bar.eta}") if bar.eta else "",
                          detail=bar.detail)
            description = f"{bar.stage} {bar.step}".strip()
            if bar.key not in self._tasks:
                self._tasks[bar.key] = self._progress.add_task(description, total=bar.total,
                                                               completed=bar.done or 0, **fields)
            else:
                self._progress.update(self._tasks[bar.key], description=description, total=bar.total,
                                      completed=bar.done or 0, **fields)
        if self._live is not None:
            self._live.refresh()

    def _print_lines(self, bars: list[Bar]) -> None:
        now = self.clock()
        for bar in bars:
            if bar.done is None:
                continue  # nothing counted yet
            what = (bar.done, bar.total, bar.stalled)
            last = self._printed.get(bar.key)
            # a step's "0/N" line (it started) does not hold back its first real count
            if last is not None and (last[1] == what or last[1][0] and now - last[0] < self.interval):
                continue
            self._printed[bar.key] = (now, what)
            self.console.print(plain_line(bar), markup=False, highlight=False)
