"""zeroStage 1-3: the engine on DeepSpeed ZeRO, with the methods of `engine.DdpEngine`.

* Config: `zero_config.deepspeed_config` (the one pure function), on this world size; once the
  model is loaded its communication buckets are sized from the model's hidden size.
* Loading (`ZeroEngine.loading`): under ZeRO-3 a `transformers.integrations.HfDeepSpeedConfig`
  is alive while `from_pretrained` runs, so transformers creates the model inside
  `deepspeed.zero.Init`: every parameter is partitioned as it is made and no rank ever holds
  the whole model.
* Training: `deepspeed.initialize` with the config's AdamW and the transformers LR schedule;
  `backward` is DeepSpeed's (no scaling by accumulation steps: the loop already weighs each
  micro-batch), `no_sync()` marks micro-batches before the accumulation boundary, `step()` is
  DeepSpeed's optimizer step (clipping, scheduler) and returns its pre-clip gradient norm.
* Forward passes outside training use the DeepSpeed module: under ZeRO-3 every forward
  gathers parameters collectively, so callers run the same number of forwards on every rank
  (objectives._gathered_batches does).
* Checkpoints: DeepSpeed's own sharded `save_checkpoint` / `load_checkpoint` (every rank
  writes and reads its shard files); `state_files_for` names a rank's share.
* The final model: the parameters gathered a group at a time (`GatheredParameters`) into one
  16-bit-or-fp32 (the training dtype) state dict on rank 0, saved as safetensors.

Single process (world size 1): a one-rank process group is created for DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from .config import TrainingConfig
from .distributed import Distributed, available_host_bytes
from .engine import EngineBase, enable_checkpointing, make_scheduler, param_groups, pick_device
from .zero_config import check_offload_memory, deepspeed_config

log = logging.getLogger(__name__)

TAG = "state"  # the DeepSpeed checkpoint tag (its sub-folder)
GATHER_BYTES = 512 * 2**20  # parameters gathered at once when saving the consolidated model
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def _import_deepspeed():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's JIT-built ops are cached per Python environment: a cache shared by several
    # environments is rebuilt (and locked) each time another one builds into it.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import deepspeed

    return deepspeed


def _one_rank_group(device, timeout) -> None:
    """DeepSpeed needs a process group (and torchrun's LOCAL_RANK) even for one process: a
    one-rank group on loopback."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    for key in ("LOCAL_RANK", "RANK"):
        os.environ.setdefault(key, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                             init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                             timeout=timeout)


class ZeroEngine(EngineBase):
    """DeepSpeed ZeRO of `config.zero_stage` (see the module docstring). Build it with
    `ZeroEngine.load(loader, config, total_steps, dist)`."""

    def __init__(self, config: TrainingConfig, dist: Distributed | None = None):
        import torch

        self.config = config
        self.dist = dist or Distributed()
        self.device = self.dist.device if self.dist.active else pick_device()
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        # raises, naming the field, before anything is loaded or written
        self.ds_config = deepspeed_config(config, self.dist.world_size, bf16=bf16)
        self.deepspeed = _import_deepspeed()
        # DeepSpeed's own group (it reuses torchrun's when that exists) with the same timeout
        _one_rank_group(self.device, config.collective_timeout)
        self.deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                        timeout=config.collective_timeout)
        self._hf_config = None
        self.model = self.module = None

    @classmethod
    def load(cls, loader: Callable[[], Any], config: TrainingConfig, total_steps: int,
             dist: Distributed | None = None) -> "ZeroEngine":
        engine = cls(config, dist)
        with engine.loading():
            model = loader()
        engine.wrap(model, total_steps)
        return engine

    @contextlib.contextmanager
    def loading(self):
        """Model creation inside it is partitioned under ZeRO-3 (HfDeepSpeedConfig)."""
        if self.config.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # transformers keeps a weak reference: the engine holds it for its lifetime
            self._hf_config = HfDeepSpeedConfig(self.ds_config)
        yield

    def wrap(self, model, total_steps: int) -> None:
        config = self.config
        if config.offload_optimizer:
            numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            check_offload_memory(numel, self.world_size, self.dist.local_world_size,
                                 available_host_bytes())
        if self.device.type == "cuda":
            model = model.to(self.device) if config.zero_stage < 3 else model
        if config.gradient_checkpointing:
            enable_checkpointing(model, non_reentrant=True)
        # communication buckets sized for this model (zero_config.bucket_sizes)
        self.ds_config = deepspeed_config(config, self.dist.world_size,
                                          bf16=self.ds_config["bf16"]["enabled"],
                                          hidden_size=getattr(getattr(model, "config", None),
                                                              "hidden_size", None))
        model.train()
        self.ds, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=model, model_parameters=param_groups(model, config.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda optimizer: make_scheduler(config, optimizer, total_steps))
        self.ds.set_gradient_accumulation_boundary(True)
        self.model = self.ds
        self.module = self.ds.module
        basic = getattr(self.optimizer, "optimizer", self.optimizer)  # inside ZeRO's wrapper
        log.info("DeepSpeed ZeRO-%d on %d rank(s)%s, %s, micro batch %d, %d accumulation steps, "
                 "optimizer %s", config.zero_stage, self.world_size,
                 ", optimizer state offloaded to CPU" if config.offload_optimizer else "",
                 "bf16" if self.ds_config["bf16"]["enabled"] else "fp32",
                 self.ds_config["train_micro_batch_size_per_gpu"],
                 self.ds_config["gradient_accumulation_steps"], type(basic).__name__)

    # -- the training step
    def no_sync(self):
        """Micro-batches before the step's last: not the accumulation boundary."""
        ds = self.ds

        @contextlib.contextmanager
        def _ctx():
            ds.set_gradient_accumulation_boundary(False)
            try:
                yield
            finally:
                ds.set_gradient_accumulation_boundary(True)

        return _ctx()

    def backward(self, loss) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """DeepSpeed's optimizer step (clip, AdamW, scheduler, zero grads); the pre-clip norm."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def unwrap(self):
        """The transformers module (under ZeRO-3 its forward gathers parameters: collective)."""
        return self.module

    # -- checkpoints and the final model
    def save_state(self, folder: Path) -> None:
        """DeepSpeed's sharded checkpoint (model, optimizer, scheduler) under folder/state/;
        every rank writes its own shard files."""
        folder.mkdir(parents=True, exist_ok=True)
        self.ds.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    @staticmethod
    def state_files_for(names: list[str], rank: int) -> list[str]:
        """A rank's share of the stored state: its own shard files and the shared ones."""
        out = []
        for name in names:
            match = _RANK_FILE.search(name)
            if match is None or int(match.group(1)) == rank:
                out.append(name)
        return out

    def load_state(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{folder / TAG}: DeepSpeed found no checkpoint to load")

    def save_pretrained(self, tokenizer, out_dir: Path) -> Path | None:
        """The consolidated Hugging Face folder on rank 0 (None elsewhere); every rank calls
        it. Under ZeRO-3 the parameters are gathered GATHER_BYTES at a time and copied to CPU
        in the training dtype."""
        from ..modeling import save_model

        module = self.module
        if self.config.zero_stage < 3:
            return save_model(module, tokenizer, out_dir) if self.is_main else None
        state: dict[str, Any] = {}
        named = list(module.named_parameters(remove_duplicate=False))
        for group in _groups_by_bytes(named, GATHER_BYTES):
            with self.deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
                if self.is_main:
                    for name, p in group:
                        state[name] = p.detach().to("cpu", copy=True)
        if not self.is_main:
            return None
        persistent = module.state_dict().keys()  # names only: the tensors are partitioned
        state.update({name: b.detach().cpu() for name, b in module.named_buffers()
                      if name in persistent and name not in state})
        return save_model(module, tokenizer, out_dir, state_dict=state)


CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def prebuild_cpu_ops(names: tuple[str, ...] = CPU_OPS) -> None:
    """Compile (once, into torch's extension cache, with the system C++ compiler) the ops
    DeepSpeed builds on a CPU-only machine at first use, so the first ZeRO run does not spend
    minutes compiling: `ShareMemCommBuilder`, the shared-memory collective of its first process
    group (`make setup`), and `CPUAdamBuilder`, DeepSpeedCPUAdam for offloadOptimizer (`make
    cpu-adam`, which the slow tests need)."""
    import torch

    if torch.cuda.is_available():
        return
    _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load()


def _groups_by_bytes(named: list[tuple[str, Any]], limit: int) -> list[list[tuple[str, Any]]]:
    """Consecutive (name, parameter) groups of at most `limit` bytes (at least one each)."""
    groups: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, p in named:
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, p))
        size += nbytes
    return [g for g in groups if g]
