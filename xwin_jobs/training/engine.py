"""Device, precision, optimizer, scheduler and torchrun ranks: the one place that knows them.

A stage builds its model, hands it to `Engine`, and from then on only calls
`engine.to_device(batch)`, `with engine.autocast():`, `with engine.no_sync():`,
`engine.backward(loss)`, `engine.step()` and `engine.unwrap()` (for saving and for forward
passes that must not synchronise ranks: evaluation, reference log-probabilities).

Multi-process: under torchrun (WORLD_SIZE > 1) `Distributed.from_env()` initialises
torch.distributed (nccl on CUDA, gloo on CPU), binds the process to the GPU named by
LOCAL_RANK, and the engine wraps the model in DistributedDataParallel: plain data
parallelism, every rank holds the whole model and the optimizer state, gradients are
averaged by DDP. `Distributed` carries rank / world_size / is_main, a barrier and the few
collectives the loop and the stages need; a single process gets the same object with no
process group (every method a no-op), so that path is exactly the single-process one.

DeepSpeed is out of scope: `zeroStage` is accepted, logged and ignored (plain DDP
replicates the optimizer state on every rank).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from typing import Any, Mapping

from .config import TrainingConfig

log = logging.getLogger(__name__)

# Long enough for rank 0 to upload a large model while the other ranks wait at the final
# barrier; a crashed rank does not leave the others waiting this long: torchrun stops the
# whole group when one worker fails.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=4)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(preferred: str | None = None):
    """`preferred` ('cpu', 'cuda', 'cuda:1') wins; otherwise CUDA when present, else CPU."""
    import torch

    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Distributed:
    """torchrun's process group (rank, world size, collectives), or the single-process
    stand-in (`Distributed()`: rank 0 of 1, no torch import, every collective a no-op)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # this rank's device; None for a single process (engine picks)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Distributed":
        """Join torchrun's group when WORLD_SIZE > 1 (RANK, LOCAL_RANK, MASTER_ADDR/PORT set
        by torchrun); otherwise the single-process stand-in."""
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
            tdist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        log.info("rank %d of %d (%s, %s)", rank, world, backend, device)
        return cls(rank, world, local, device)

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

    def close(self) -> None:
        """Wait for every rank, then destroy the process group (idempotent). For the
        success path only: after a failure a rank should just exit (torchrun then stops
        the others) instead of waiting at a barrier the others may never reach."""
        if self.active:
            import torch.distributed as tdist

            if tdist.is_initialized():
                self.barrier()  # no rank tears down while another is still in a collective
                tdist.destroy_process_group()


def _enable_checkpointing(model, non_reentrant: bool) -> None:
    """Gradient (activation) checkpointing; forward passes use_cache=False. Under DDP the
    non-reentrant variant: reentrant checkpointing and DDP's gradient hooks do not mix."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable(**({"activation_checkpointing_kwargs": {"use_reentrant": False}} if non_reentrant else {}))
    elif non_reentrant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable()


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D parameters), as usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """Wraps a model for training: device, autocast, AdamW, LR schedule, and under torchrun
    DistributedDataParallel (see the module docstring)."""

    def __init__(self, model, config: TrainingConfig, total_steps: int, device: str | None = None,
                 dist: Distributed | None = None):
        import torch
        from transformers import get_scheduler

        if config.zero_stage:
            log.info("zeroStage %d: ignored (DeepSpeed is not used; plain %s)", config.zero_stage,
                     "DDP" if dist is not None and dist.active else "single-process training")
        self.config = config
        self.dist = dist or Distributed()
        self.device = pick_device(device) if device or not self.dist.active else self.dist.device
        self.module = model.to(self.device)
        if config.gradient_checkpointing:
            _enable_checkpointing(model, non_reentrant=self.dist.active)
        self.module.train()
        self.model = self.module
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            # No buffer broadcast: the models trained here have no buffers that training
            # changes, and a broadcast would turn every forward into a collective.
            import inspect

            no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13's name
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})
            self.model = DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_buffer_sync)
        # fp32 master weights; bf16 autocast where the hardware has it.
        self.amp_dtype = (torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                          else None)
        self.optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay),
                                           lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)
        warmup = int(round(config.warmup_ratio * total_steps))
        self.scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                       num_warmup_steps=warmup, num_training_steps=max(1, total_steps))

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def barrier(self) -> None:
        self.dist.barrier()

    def no_sync(self):
        """Context manager for the micro-batches of a step before its last: DDP keeps their
        gradients local (the last backward all-reduces the accumulated sum)."""
        if self.dist.active:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in batch.items()}

    def autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, optimizer step, scheduler step, zero grads. Returns the pre-clip grad norm."""
        import torch

        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.config.max_grad_norm > 0 and params:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def unwrap(self):
        """The plain transformers model: for saving, and for forward passes outside the
        training step (no DDP synchronisation)."""
        return self.module

    def eval_mode(self):
        """Context manager: eval mode and no grad, restoring train mode after."""
        import torch

        engine = self

        @contextlib.contextmanager
        def _ctx():
            engine.model.eval()
            try:
                with torch.no_grad(), engine.autocast():
                    yield
            finally:
                engine.model.train()

        return _ctx()
