"""Device, precision, optimizer and scheduler: the one place that knows about them.

A stage builds its model, hands it to `Engine`, and from then on only calls
`engine.to_device(batch)`, `with engine.autocast():`, `engine.backward(loss)`, `engine.step()`
and `engine.unwrap()` (for saving). DeepSpeed ZeRO and torchrun (multi-process) will be a
second implementation of this same surface; until then `zeroStage` is accepted and ignored
with a log line.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any

from .config import TrainingConfig

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


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D parameters), as usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """Wraps a model for single-process training: device, autocast, AdamW, LR schedule."""

    def __init__(self, model, config: TrainingConfig, total_steps: int, device: str | None = None):
        import torch
        from transformers import get_scheduler

        if config.zero_stage:
            log.info("zeroStage %d: ignored by the single-process engine", config.zero_stage)
        self.config = config
        self.device = pick_device(device)
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            # transformers >= 5 renamed it; forward passes use_cache=False
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        self.model.train()
        # fp32 master weights; bf16 autocast where the hardware has it.
        self.amp_dtype = (torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                          else None)
        self.optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay),
                                           lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)
        warmup = int(round(config.warmup_ratio * total_steps))
        self.scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                       num_warmup_steps=warmup, num_training_steps=max(1, total_steps))

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

        params = [p for p in self.model.parameters() if p.grad is not None]
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
        """The plain transformers model, for saving."""
        return self.model

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
