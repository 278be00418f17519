"""SIGTERM (what Kubernetes sends before preemption or eviction) as a request to stop cleanly.

`stop_requests()` installs a handler that only records the signal; the training loop checks
it after every optimizer step (all ranks agree through one all-reduce), writes a checkpoint
and raises `Preempted`, whose exit code (128 + signal) tells the PyTorchJob to restart the
pod (`restartPolicy: ExitCode`). The previous handler is restored on exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; `exit_code` = 128 + signal."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after optimizer step {step} "
                         f"(checkpoint written; a restart resumes from it)")


class StopRequest:
    """The first signal received (None: none)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_requests(signals=(signal.SIGTERM,)):
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        if request.signum is None:
            request.signum = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
