"""Fail fast when a pod that asked for GPUs cannot use them (issue 23, item 2).

A training or scoring pod that requests `nvidia.com/gpu` gets `XWIN_GPUS_PER_NODE` (the count)
in its environment from its manifest (operator kube/manifests.py). Without it torch would run
on the CPU, silently, when the node's driver is older than the wheel's CUDA or the pod lacks
the NVIDIA runtimeClass: days of a 7B stage on CPU. `check_gpus` stops the step before it
touches the store or trains when torch sees fewer CUDA devices than the node's ranks, naming
what it saw. The error exits 1: a PyTorchJob (`restartPolicy: ExitCode`) does not restart a
pod for exit codes 1-127 and a Job's podFailurePolicy fails at once on 1, so the attempt fails
once, with this message, instead of crash-looping; a retry may land on a healthy node.
`xwin run` sets nothing, so local runs use what they find, as before.

torch is imported inside `cuda_facts` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

GPU_ENV = "XWIN_GPUS_PER_NODE"
DRIVER_FILE = Path("/proc/driver/nvidia/version")


class GpuUnavailableError(RuntimeError):
    """GPUs were requested for this pod but torch cannot see enough of them."""


def gpu_problem(requested: int, local_world: int, facts: Mapping[str, Any]) -> str | None:
    """The message for a pod that requested `requested` GPUs and runs `local_world` ranks when
    torch sees `facts["devices"]` CUDA devices, or None when there are enough. Pure."""
    if requested <= 0:
        return None
    need = max(1, local_world)
    seen = int(facts.get("devices") or 0)
    if seen >= need:
        return None
    return (f"this pod requested {requested} GPU(s) (resources.gpusPerNode, {GPU_ENV}) for "
            f"{need} local rank(s), but torch sees {seen} CUDA device(s): torch "
            f"{facts.get('torch')} built for CUDA {facts.get('cuda') or 'none (a CPU wheel)'}, "
            f"NVIDIA driver {facts.get('driver') or 'not found (' + str(DRIVER_FILE) + ' missing)'}, "
            f"CUDA_VISIBLE_DEVICES={facts.get('cuda_visible', 'unset')}, "
            f"NVIDIA_VISIBLE_DEVICES={facts.get('nvidia_visible', 'unset')}. "
            f"Stopping before training instead of training on the CPU: check that the node's driver "
            f"supports the image's CUDA and that the pod runs with the NVIDIA runtime (runtimeClassName)")


def cuda_facts(env: Mapping[str, str]) -> dict[str, Any]:
    """What this process sees of CUDA: torch's version and build, its device count, the
    driver version (from /proc), the visibility variables."""
    import torch

    driver = None
    try:
        first = DRIVER_FILE.read_text().splitlines()[0]
        driver = next((w for w in first.split() if w[:1].isdigit() and "." in w), first.strip())
    except (OSError, IndexError):
        pass
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "driver": driver, "cuda_visible": env.get("CUDA_VISIBLE_DEVICES", "unset"),
            "nvidia_visible": env.get("NVIDIA_VISIBLE_DEVICES", "unset")}


def check_gpus(env: Mapping[str, str] | None = None) -> None:
    """Raise GpuUnavailableError when this pod asked for GPUs and torch cannot see one per
    local rank (LOCAL_WORLD_SIZE, set by torchrun; 1 otherwise); nothing when it did not ask."""
    env = os.environ if env is None else env
    try:
        requested = int(env.get(GPU_ENV) or 0)
    except ValueError:
        raise GpuUnavailableError(f"{GPU_ENV}={env.get(GPU_ENV)!r} is not a GPU count") from None
    if requested <= 0:
        return
    problem = gpu_problem(requested, int(env.get("LOCAL_WORLD_SIZE") or 1), cuda_facts(env))
    if problem:
        raise GpuUnavailableError(problem)
