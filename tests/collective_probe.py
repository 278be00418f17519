"""Run by tests/test_collective_timeout.py: what timeout the stage's process groups get.

`python tests/collective_probe.py torch MINUTES` under torchrun (2 gloo ranks): joins the group
as a training stage does (Distributed.from_env with the stage's collective_timeout), prints the
group's timeout; rank 1 then stays out of a barrier and rank 0 reports how long it waited.
`python tests/collective_probe.py deepspeed MINUTES`: one process builds a ZeroEngine (its
one-rank group and DeepSpeed's init_distributed) and prints the group's timeout.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as tdist

from xwin_jobs.training.config import TrainingConfig, collective_timeout


def group_timeout_s() -> float:
    backend = tdist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


def main(mode: str, minutes: float) -> None:
    training = {"collectiveTimeoutMinutes": minutes, "zeroStage": 2, "globalBatchSize": 1}
    if mode == "torch":
        from xwin_jobs.training.distributed import Distributed

        dist = Distributed.from_env(timeout=collective_timeout(training))
        out = {"rank": dist.rank, "timeout_s": group_timeout_s()}
        if dist.rank == 1:
            time.sleep(3 * minutes * 60)  # never enters the barrier
        else:
            started = time.monotonic()
            try:
                dist.barrier()
                out["barrier"] = "passed"
            except Exception as e:  # noqa: BLE001 - the timeout is what is measured
                out["barrier"] = f"{type(e).__name__}"
            out["waited_s"] = time.monotonic() - started
        print(json.dumps(out), flush=True)
        os._exit(0)
    from xwin_jobs.training.zero import ZeroEngine

    ZeroEngine(TrainingConfig.from_params(training))
    import deepspeed.comm as dscomm

    print(json.dumps({"timeout_s": group_timeout_s(), "deepspeed": dscomm.is_initialized()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
