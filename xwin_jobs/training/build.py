"""The engine a stage's `zeroStage` names, with the model loaded the way that engine needs.

`build_engine(loader, config, total_steps, dist)`: zeroStage 0 -> `engine.DdpEngine` (single
process, or DDP under torchrun) on the model `loader()` returns; 1-3 -> `zero.ZeroEngine`,
which runs `loader()` inside its loading context (partitioned creation under ZeRO-3).
DeepSpeed is imported only on the ZeRO path. `training.compile`: the model's forward then
goes through torch.compile, with eager as the fallback (`compiled.compile_forward`).

`map_large_host_allocations()` (both engines, before loading): glibc's malloc serves a freed
block's size from its heap next time (its mmap threshold rises to 32 MiB after the first large
free) and keeps freed heap memory resident. ZeRO-3 gathers each layer's weights and the full
gradients in every forward and backward and frees them again, so on a CPU rank that retained
heap was ~0.5 GiB, as much as the rank's share of the weights. A fixed 1 MiB threshold gives
every tensor of 1 MiB or more its own mapping, returned to the system when freed (measured in
benchmarks/RESULTS.md "ZeRO memory"; DDP's peak is unchanged by it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any, Callable

from .compiled import compile_forward
from .config import TrainingConfig
from .distributed import Distributed


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_host_allocations() -> bool:
    """Host allocations of MMAP_THRESHOLD_BYTES or more mapped on their own (glibc only; see
    the module docstring); whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def build_engine(loader: Callable[[], Any], config: TrainingConfig, total_steps: int,
                 dist: Distributed | None = None):
    map_large_host_allocations()
    if config.zero_stage:
        from .zero import ZeroEngine

        engine = ZeroEngine.load(loader, config, total_steps, dist)
    else:
        from .engine import DdpEngine

        engine = DdpEngine(loader(), config, total_steps=total_steps, dist=dist)
    if config.compile:
        compile_forward(engine.module, config.zero_stage)
    return engine


def model_parameters(config_json: dict) -> int:
    """The parameter count of a causal LM with this config.json, counted on the meta device
    (nothing allocated, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config_json)
    model_config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())
