"""torchrun's process group as one small object: rank, world size, barrier, collectives.

`Distributed.from_env()` joins torchrun's group when WORLD_SIZE > 1 (nccl on CUDA, gloo on
CPU) and binds the process to the GPU named by LOCAL_RANK; a single process gets the same
object with no process group (every collective a no-op), so that path stays exactly the
single-process one. The engines (xwin_jobs.training.engine, .zero) and the stage shell use it.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Mapping

log = logging.getLogger(__name__)

# How long a rank waits in a collective before failing, unless the stage's
# `training.collectiveTimeoutMinutes` says otherwise (training.config.collective_timeout): a
# rank that hangs (a dead NIC, a stuck kernel) then stops the job after this instead of holding
# every GPU for hours. No collective waits for an upload: the final model is uploaded after the
# group is closed (xwin_jobs.stages), checkpoints by every rank before they gather.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


class Distributed:
    """torchrun's process group (rank, world size, collectives), or the single-process
    stand-in (`Distributed()`: rank 0 of 1, no torch import, every collective a no-op)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device=None,
                 local_world_size: int = 1):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.local_world_size = local_world_size  # ranks on this node (they share its memory)
        self.device = device  # this rank's device; None for a single process (engine picks)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 timeout: datetime.timedelta | None = None) -> "Distributed":
        """Join torchrun's group when WORLD_SIZE > 1 (RANK, LOCAL_RANK, MASTER_ADDR/PORT set
        by torchrun), its collectives failing after `timeout` (default PROCESS_GROUP_TIMEOUT);
        otherwise the single-process stand-in."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", 1))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as tdist

        rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend, timeout=timeout or PROCESS_GROUP_TIMEOUT)
        log.info("rank %d of %d (%s, %s, collectives time out after %s)", rank, world, backend,
                 device, timeout or PROCESS_GROUP_TIMEOUT)
        return cls(rank, world, local, device, int(env.get("LOCAL_WORLD_SIZE", world)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as tdist

            if self.device is not None and self.device.type == "cuda":
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable)."""
        if not self.active:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key sum over ranks (every rank must pass the same keys)."""
        if not self.active:
            return values
        import torch
        import torch.distributed as tdist

        keys = sorted(values)
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                              device=self.device)
        tdist.all_reduce(packed, op=tdist.ReduceOp.SUM)
        summed = dict(zip(keys, packed.cpu().tolist()))
        return {k: summed[k] for k in values}

    def any_true(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (the same answer on every rank)."""
        if not self.active:
            return bool(flag)
        return self.all_reduce_sum({"flag": 1.0 if flag else 0.0})["flag"] > 0

    def close(self) -> None:
        """Wait for every rank, then destroy the process group (idempotent). For the
        success path only: after a failure a rank should just exit (torchrun then stops
        the others) instead of waiting at a barrier the others may never reach."""
        if self.active:
            import gc

            import torch.distributed as tdist

            if tdist.is_initialized():
                # A finished stage's DDP wrapper is garbage by now, but reference cycles keep its
                # reducer (and through it the gloo process group and its threads) alive until the
                # interpreter's own teardown, where gloo's threads abort the process ("terminate
                # called without an active exception", 1 run in 8): collect it first.
                gc.collect()
                self.barrier()  # no rank tears down while another is still in a collective
                tdist.destroy_process_group()


def available_host_bytes() -> int:
    """MemAvailable of this node (Linux), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
