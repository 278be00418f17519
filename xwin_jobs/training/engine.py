"""Device, precision, optimizer, scheduler and torchrun ranks: the one place that knows them.

A stage hands the engine its model (`build.build_engine` loads and wraps it), and from then on
only calls `engine.to_device(batch)`, `with engine.autocast():`, `with engine.no_sync():`,
`engine.backward(loss)`, `engine.step()`, `engine.unwrap()` (forward passes outside the
training step: evaluation, reference log-probabilities), `engine.save_state/load_state`
(checkpoints) and `engine.save_pretrained` (the final model).

`DdpEngine` is zeroStage 0: a single process is plain torch; under torchrun (WORLD_SIZE > 1) the
model is wrapped in DistributedDataParallel: every rank holds the whole model and the
optimizer state, gradients are averaged by DDP. zeroStage 1-3 is `zero.ZeroEngine`
(DeepSpeed), with the same methods. The ranks are `distributed.Distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any

from .config import TrainingConfig
from .distributed import Distributed
from .zero_config import ADAM_BETAS, ADAM_EPS

log = logging.getLogger(__name__)

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


def enable_checkpointing(model, non_reentrant: bool) -> None:
    """Gradient (activation) checkpointing; forward passes use_cache=False. Under DDP the
    non-reentrant variant: reentrant checkpointing and DDP's gradient hooks do not mix."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable(**({"activation_checkpointing_kwargs": {"use_reentrant": False}} if non_reentrant else {}))
    elif non_reentrant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable()


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D parameters), as usual for transformers
    (a ZeRO-3 partitioned parameter keeps its real shape in `ds_shape`). With no weight decay
    one group: the groups would only differ by name, and DeepSpeed ZeRO runs its gradient-norm
    all-reduce and its post-step parameter all-gather once per group (benchmarks/RESULTS.md
    "ZeRO memory": collectives, not bytes, are a small model's step time)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": trainable, "weight_decay": 0.0}]
    decay, no_decay = [], []
    for p in trainable:
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(config: TrainingConfig, optimizer, total_steps: int):
    """The transformers LR schedule (warm-up, then cosine | linear | constant) of `config`."""
    from transformers import get_scheduler

    warmup = int(round(config.warmup_ratio * total_steps))
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=max(1, total_steps))


class EngineBase:
    """What every engine shares: the ranks, batches to the device, eval mode."""

    config: TrainingConfig
    dist: Distributed
    device: Any
    model: Any

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

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in batch.items()}

    def autocast(self):
        return contextlib.nullcontext()

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


class DdpEngine(EngineBase):
    """zeroStage 0: device, autocast, AdamW, LR schedule, and under torchrun
    DistributedDataParallel (see the module docstring)."""

    STATE_FILE = "torch_state.pt"  # model, optimizer and scheduler state dicts (checkpoints)

    def __init__(self, model, config: TrainingConfig, total_steps: int, device: str | None = None,
                 dist: Distributed | None = None):
        import torch

        self.config = config
        self.dist = dist or Distributed()
        self.device = pick_device(device) if device or not self.dist.active else self.dist.device
        self.module = model.to(self.device)
        if config.gradient_checkpointing:
            enable_checkpointing(model, non_reentrant=self.dist.active)
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
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay),
                                           lr=config.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS)
        self.scheduler = make_scheduler(config, self.optimizer, total_steps)

    def no_sync(self):
        """Context manager for the micro-batches of a step before its last: DDP keeps their
        gradients local (the last backward all-reduces the accumulated sum)."""
        if self.dist.active:
            return self.model.no_sync()
        return contextlib.nullcontext()

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

    # -- checkpoints and the final model (see xwin_jobs.training.checkpoints)
    def save_state(self, folder: Path) -> None:
        """Model, optimizer and scheduler state dicts into `folder` (rank 0 writes them: under
        DDP every rank holds the same state). Every rank calls it."""
        import torch

        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / self.STATE_FILE)

    @staticmethod
    def state_files_for(names: list[str], rank: int) -> list[str]:
        """The stored state files a rank reads to resume: all of them (one file)."""
        return list(names)

    def load_state(self, folder: Path) -> None:
        import torch

        state = torch.load(folder / self.STATE_FILE, map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, tokenizer, out_dir: Path) -> Path | None:
        """The Hugging Face folder of the model (rank 0; None on the other ranks)."""
        from ..modeling import save_model

        return save_model(self.module, tokenizer, out_dir) if self.is_main else None
