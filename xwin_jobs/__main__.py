"""`python -m xwin_jobs <stage> --task FILE|JSON [--store-endpoint URL]`: one stage step.

Exit status: 0 done (or already done), 1 the stage failed (one line on stderr naming the
cause, e.g. a pod that requested GPUs torch cannot see: xwin_jobs/gpu_check.py; a full
traceback only for an unexpected error, i.e. a bug), 2 bad usage: unknown
stage or a task that cannot be read, 128 + signal: a training stage stopped by SIGTERM after
writing a checkpoint (a restart resumes from it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures with a clear message of their own: printed as one line, no traceback."""
    from .chat import ChatFormatError
    from .gpu_check import GpuUnavailableError
    from .modeling import ModelLoadError
    from .records import RecordError
    from .stages import StageError
    from .store import StoreError
    from .training.config import TrainingConfigError
    from .training.data import ExampleError

    return (StoreError, RecordError, StageError, ModelLoadError, ChatFormatError,
            TrainingConfigError, ExampleError, GpuUnavailableError)


def build_parser(stage_names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xwin_jobs",
        description="Run one stage step of an AlignmentRun (as a pod does).")
    parser.add_argument("stage", help=f"one of: {', '.join(stage_names)}")
    parser.add_argument("--task", required=True,
                        help="the StageTask: a JSON file path or inline JSON ('{...}')")
    parser.add_argument("--store-endpoint", default=None,
                        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--log-level", default=os.environ.get("XWIN_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    from .stages import STAGES, STEPS, step_for
    from .task import StageTask

    args = build_parser([*STAGES, *STEPS]).parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    short_steps = {name.split("-", 1)[1] for name in STEPS}  # the operator's job names
    if args.stage not in STAGES and args.stage not in STEPS and args.stage not in short_steps:
        print(f"error: unknown stage {args.stage!r}; known stages: {', '.join([*STAGES, *STEPS])}", file=sys.stderr)
        return 2
    try:
        task = StageTask.load(args.task)
    except (ValueError, TypeError) as e:
        print(f"error: bad task: {e}", file=sys.stderr)
        return 2
    step = step_for(args.stage, task.stage)  # a step of a multi-process stage (bestOfN-sample)
    if step is None and task.stage != args.stage:
        print(f"error: the task is for stage {task.stage!r}, not {args.stage!r}", file=sys.stderr)
        return 2

    from .stages import run_stage, run_step
    from .store import Store

    from .training.preempt import Preempted

    expected = _expected_errors()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # log lines, not bars, in pods
    try:
        from .gpu_check import check_gpus

        check_gpus()  # a pod given GPUs it cannot see stops here, before the store or training
        store = Store(endpoint_url=args.store_endpoint)
        marker = run_step(step, task, store) if step else run_stage(task, store)
    except expected as e:
        print(f"error: stage {task.stage} failed: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"error: stage {task.stage} preempted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"error: stage {task.stage} interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: show where
        traceback.print_exc()
        print(f"error: stage {task.stage} crashed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    state = "already done" if marker.get("skipped") else "done"
    logging.getLogger("xwin_jobs").info("stage %s %s: %s", task.stage, state, marker.get("metrics", {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
