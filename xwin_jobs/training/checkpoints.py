"""Exact-resume checkpoints of a training stage: `<stage>/checkpoints/step-N/`.

A checkpoint holds everything needed to continue bit for bit:

    state/...            the engine's state: torch state dicts (zeroStage 0) or DeepSpeed's
                         sharded checkpoint (every rank uploads its own shard files)
    rng/rank-R.pt        python, numpy, torch (and CUDA) RNG states of every rank
    trainer_state.json   optimizer step, loss/metric history, input digest, ranks, zeroStage
    _CHECKPOINT.json     the completion marker, written LAST by rank 0 once every rank has
                         uploaded: step, digest, and the sha256 and size of every file

The data position is the step: the batch plan is a pure function of the seed.

`Checkpoints.resume()` (every rank) looks for complete checkpoints (with a marker) made for
the same input digest, ranks and zeroStage, newest first; anything else is ignored and said
so in the log. Each rank downloads only its share of the files and checks them against the
marker's digests before loading anything, so a corrupt checkpoint is a clear error naming the
file and the stage falls back to the previous complete one with its state untouched.
Checkpoints are never deleted when a stage starts; `prune` (after `_SUCCESS.json`) keeps the
newest `keepCheckpoints`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import Store, StoreError, as_folder, join_uri

log = logging.getLogger("xwin_jobs.train")

MARKER = "_CHECKPOINT.json"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)/")


class CheckpointCorrupt(Exception):
    """A checkpoint file that does not match its marker or cannot be loaded; names the file."""


@dataclass
class Resumed:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)


def step_folders(relative_files: list[str]) -> dict[int, set[str]]:
    """step -> the file names under `step-N/`, from paths relative to checkpoints/. Pure."""
    out: dict[int, set[str]] = {}
    for rel in relative_files:
        match = _STEP.match(rel)
        if match:
            out.setdefault(int(match.group(1)), set()).add(rel[match.end():])
    return out


def usable(marker: dict[str, Any], digest: str, world_size: int, zero_stage: int) -> str | None:
    """Why a complete checkpoint cannot be resumed here (None: it can). Pure."""
    if marker.get("digest") != digest:
        return "it was made for other inputs"
    if marker.get("worldSize") != world_size or marker.get("zeroStage") != zero_stage:
        return (f"it was made by {marker.get('worldSize')} rank(s) at zeroStage "
                f"{marker.get('zeroStage')}, this run has {world_size} at zeroStage {zero_stage}")
    return None


def capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Checkpoints:
    """The checkpoints of one training stage run by `engine` (every rank holds one)."""

    def __init__(self, store: Store, folder_uri: str, workdir: Path, engine, digest: str):
        self.store, self.root, self.workdir = store, as_folder(folder_uri), Path(workdir)
        self.engine, self.digest = engine, digest

    def uri(self, step: int, *parts: str) -> str:
        return join_uri(self.root, f"step-{step}/", *parts)

    # -- saving
    def save(self, step: int, history: list[dict[str, float]]) -> None:
        """Every rank: write and upload its files; rank 0 writes the state and marker last."""
        import torch

        engine = self.engine
        local = self.workdir / f"checkpoint-{step}"
        shutil.rmtree(local, ignore_errors=True)
        engine.save_state(local / "state")
        (local / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(), local / "rng" / f"rank-{engine.rank}.pt")
        mine = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
        for rel, path in mine.items():
            self.store.upload_file(path, self.uri(step, rel))
        files = {rel: {"sha256": _sha256(p), "bytes": p.stat().st_size} for rel, p in mine.items()}
        shutil.rmtree(local, ignore_errors=True)
        every = engine.dist.all_gather_object(files)  # also: every rank has uploaded
        if engine.is_main:
            self.store.write_json(self.uri(step, TRAINER_STATE), {
                "step": step, "history": history, "digest": self.digest})
            marker = {"step": step, "digest": self.digest, "worldSize": engine.world_size,
                      "zeroStage": engine.config.zero_stage,
                      "files": {k: v for share in every for k, v in share.items()}}
            self.store.write_json(self.uri(step, MARKER), marker)
            log.info("checkpoint step %d -> %s", step, self.uri(step))
        engine.barrier()

    # -- resuming
    def _candidates(self) -> list[dict[str, Any]]:
        """Markers of the resumable checkpoints, newest first (rank 0 reads, logs the rest)."""
        engine = self.engine
        files = self.store.list_files(self.root)
        found = step_folders([f[len(self.root):] for f in files])
        out = []
        for step in sorted(found, reverse=True):
            where = self.uri(step)
            if MARKER not in found[step]:
                log.warning("checkpoint %s: ignored, it is incomplete (no %s: the upload was "
                            "interrupted)", where, MARKER)
                continue
            try:
                marker = self.store.read_json(self.uri(step, MARKER))
            except StoreError as e:
                log.error("checkpoint %s: ignored: %s", where, e)
                continue
            why = usable(marker, self.digest, engine.world_size, engine.config.zero_stage)
            if why:
                log.warning("checkpoint %s: ignored, %s", where, why)
                continue
            out.append(marker)
        return out

    def resume(self) -> Resumed | None:
        """Load the newest usable checkpoint into the engine and this rank's RNG; None when
        there is none (train from step 0). Every rank calls it."""
        engine = self.engine
        candidates = engine.dist.broadcast_object(self._candidates() if engine.is_main else None)
        for marker in candidates:
            step = marker["step"]
            local = self.workdir / f"resume-{step}"
            try:
                error = None
                self._download_verified(marker, local)
            except CheckpointCorrupt as e:
                error = str(e)
            if engine.dist.any_true(error is not None):
                log.error("checkpoint %s: cannot be resumed: %s; falling back to the previous "
                          "complete checkpoint", self.uri(step), error or "another rank's files are corrupt")
                shutil.rmtree(local, ignore_errors=True)
                continue
            engine.load_state(local / "state")
            import torch

            restore_rng(torch.load(local / "rng" / f"rank-{engine.rank}.pt", weights_only=False))
            state = json.loads((local / TRAINER_STATE).read_text())
            shutil.rmtree(local, ignore_errors=True)
            log.info("resuming from checkpoint %s (step %d)", self.uri(step), step)
            return Resumed(step=step, history=state.get("history", []))
        return None

    def _download_verified(self, marker: dict[str, Any], local: Path) -> None:
        files: dict[str, dict] = marker.get("files", {})
        state = sorted(k[len("state/"):] for k in files if k.startswith("state/"))
        needed = [f"state/{n}" for n in self.engine.state_files_for(state, self.engine.rank)]
        needed += [f"rng/rank-{self.engine.rank}.pt"]
        shutil.rmtree(local, ignore_errors=True)
        for rel in needed:
            uri = self.uri(marker["step"], rel)
            if rel not in files:
                raise CheckpointCorrupt(f"{uri}: missing from the checkpoint's {MARKER}")
            try:
                path = self.store.download_file(uri, local / rel)
            except StoreError as e:
                raise CheckpointCorrupt(str(e)) from None
            if path.stat().st_size != files[rel]["bytes"] or _sha256(path) != files[rel]["sha256"]:
                raise CheckpointCorrupt(f"{uri}: corrupt (its size or sha256 differs from the "
                                        f"checkpoint's {MARKER})")
        self.store.download_file(self.uri(marker["step"], TRAINER_STATE), local / TRAINER_STATE)


def prune(store: Store, folder_uri: str, keep: int, digest: str) -> list[int]:
    """After the stage's marker: delete every checkpoint but the newest `keep` complete ones
    for `digest`. Returns the steps deleted."""
    root = as_folder(folder_uri)
    found = step_folders([f[len(root):] for f in store.list_files(root)])
    kept = []
    for step in sorted(found, reverse=True):
        if len(kept) >= keep or MARKER not in found[step]:
            continue
        try:
            if store.read_json(join_uri(root, f"step-{step}/", MARKER)).get("digest") == digest:
                kept.append(step)
        except StoreError:
            continue
    deleted = [s for s in sorted(found) if s not in kept]
    for step in deleted:
        store.delete_prefix(join_uri(root, f"step-{step}/"))
    return deleted
