"""`python -m xwin_jobs.launch ARGS`: torchrun, exiting 128 + signal when it is stopped by one.

torchrun forwards SIGTERM to its workers (which checkpoint and exit 143) and then re-raises
it as an exception, which Python turns into exit code 1: a PyTorchJob with
`restartPolicy: ExitCode` would take that for a bug and not restart the pod. This wrapper
keeps torchrun's arguments and environment (PET_*) and gives the signal's exit code instead;
likewise when workers died of a signal (or exited >= 128 themselves) and none failed otherwise.
The time torchrun gives its workers to stop is TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run.main(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        print(f"torchrun stopped by signal {int(e.sigval)}", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return worker_exit_code([f.exitcode for f in e.failures.values()])
    return 0


def worker_exit_code(codes: list[int]) -> int:
    """The launcher's exit code for failed workers' codes (negative: killed by that signal):
    128 + signal when every failure was a signal or a preemption exit, else 1. Pure."""
    mapped = [128 - c if c < 0 else c for c in codes]
    return max(mapped) if mapped and all(c >= 128 for c in mapped) else 1


if __name__ == "__main__":
    raise SystemExit(main())
