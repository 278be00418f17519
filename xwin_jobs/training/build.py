"""The engine a stage's `zeroStage` names, with the model loaded the way that engine needs.

`build_engine(loader, config, total_steps, dist)`: zeroStage 0 -> `engine.Engine` (single
process, or DDP under torchrun) on the model `loader()` returns; 1-3 -> `zero.ZeroEngine`,
which runs `loader()` inside its loading context (partitioned creation under ZeRO-3).
DeepSpeed is imported only on the ZeRO path.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import TrainingConfig
from .distributed import Distributed


def build_engine(loader: Callable[[], Any], config: TrainingConfig, total_steps: int,
                 dist: Distributed | None = None):
    if config.zero_stage:
        from .zero import ZeroEngine

        return ZeroEngine.load(loader, config, total_steps, dist)
    from .engine import Engine

    return Engine(loader(), config, total_steps=total_steps, dist=dist)


def check_settings(config: TrainingConfig, world_size: int) -> None:
    """Refuse settings the engine cannot run (naming the field) before anything is read or
    written: a DeepSpeed config the settings cannot produce."""
    if config.zero_stage:
        from .zero_config import deepspeed_config

        deepspeed_config(config, world_size, bf16=False)
