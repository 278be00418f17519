"""`training.compile`: the model's forward through `torch.compile`, with eager as the fallback.

`compile_forward(module, zero_stage)` replaces `module.forward` (an attribute of the instance, so
the module, its state dict and its checkpoints stay what they were) with `CompiledForward`:
the compiled forward while it works; on the first error torch.compile raises (dynamo or the
backend: no C++ compiler or Triton, an op it cannot lower) one warning line, and from then on
the module's own eager forward. The failing call is rerun eagerly, which gives the same
result: a compile error is raised before the graph runs, so nothing (no gradient, no
collective) has happened for it. The backward graph is lowered at the first forward too
(`force_non_lazy_backward_lowering`), so a backward that cannot compile fails there, where
the rerun is exact, and not halfway through a step's gradients.

Not applied under zeroStage 3 (one log line): DeepSpeed gathers and frees each layer's
partitioned parameters in hooks around every submodule's forward, which a graph of the whole
forward would trace through. Off by default: on CPU it made no step faster (design.md 8).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

log = logging.getLogger("xwin_jobs.train")


def _lower_backward_at_forward():
    """Lower the backward graph when the forward is compiled (where the rerun is exact)."""
    from torch._functorch import config as functorch_config

    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


class CompiledForward:
    """`eager` compiled with torch.compile(dynamic=True), falling back to `eager` for good on
    the first compile error. `failed` holds that error's one-line description."""

    def __init__(self, eager: Callable[..., Any]):
        import torch

        functools.update_wrapper(self, eager)  # inspect.signature(module.forward) stays the model's
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=True)
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            from torch._dynamo.exc import TorchDynamoException  # what a failing trace or compile raises

            try:
                with _lower_backward_at_forward():
                    return self.compiled(*args, **kwargs)
            except TorchDynamoException as e:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self.failed = f"{type(e).__name__}: {first}"
                log.warning("training.compile: torch.compile failed (%s); training eager", self.failed)
        return self.eager(*args, **kwargs)


def compile_forward(module, zero_stage: int) -> bool:
    """Compile `module`'s forward in place (see the module docstring); whether it was."""
    if zero_stage == 3:
        log.warning("training.compile: not applied under zeroStage 3 (DeepSpeed's parameter "
                    "hooks); training eager")
        return False
    try:
        module.forward = CompiledForward(module.forward)
    except Exception as e:  # noqa: BLE001 - torch.compile unavailable on this platform
        log.warning("training.compile: torch.compile unavailable (%s: %s); training eager",
                    type(e).__name__, e)
        return False
    log.info("training.compile: the model's forward runs through torch.compile (dynamic shapes)")
    return True
