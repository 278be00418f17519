"""What the sampling steps of bestOfN, pairs and evaluate share.

Each of them samples n responses per prompt from a vLLM server into a folder of shards
(records `{"id", "prompt", "responses": [{"content", "finish_reason"}]}`), resumably:

- `prepare_folder` keeps a folder made for the same inputs (its `_PROGRESS.json` digest) and
  empties one made for other inputs; `folder_complete` says whether it is done;
- `sample_into_folder` samples the prompts not yet written, writing shards as answers arrive
  (a shard closes every few seconds, so a killed sampler loses at most the last few
  seconds), and marks the folder `complete: true` once every prompt is there;
- `tokenizer_source` fetches only a model's tokenizer and config files, never its weights.

Digests: `json_digest` of a stage's sampling inputs, with `model_stage_digest` naming the
upstream stage that made the sampled model (so a retrained model invalidates its samples).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..cost import requested_gpus
from ..progress import ProgressWriter, step_name
from ..records import ShardWriter, existing_ids
from ..store import Store, as_folder, join_uri
from ..task import StageTask, done_marker  # noqa: F401  (re-exported for the steps)
from . import StageError

log = logging.getLogger("xwin_jobs.stage.sampling")

PROGRESS = "_PROGRESS.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "config.json",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
SAMPLE_SHARD_RECORDS = 512


# ----------------------------------------------------------------------------- digests, progress


def json_digest(body: dict) -> str:
    """sha256 of `body` as canonical (key-sorted) JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def model_stage_digest(model_uri: str, upstream: Mapping[str, str]) -> dict[str, str]:
    """What `model_uri` is now: the upstream digest of the stage that made it, or the
    fingerprint of an outside model (upstream_digests has both)."""
    return {u: d for u, d in upstream.items() if model_uri == u or model_uri.startswith(as_folder(u))}


def input_states(upstream: Mapping[str, str], *uris: str | None) -> dict[str, str]:
    """The fingerprints in `upstream` of some external inputs (prompts, references): a
    sampled folder made from other contents of the same URI is started over."""
    return {u: upstream[u] for u in uris if u and u in upstream}


def progress_uri(folder: str) -> str:
    return join_uri(as_folder(folder), PROGRESS)


def read_progress(store: Store, folder: str) -> dict:
    """The folder's `_PROGRESS.json` ({} when there is none)."""
    uri = progress_uri(folder)
    return store.read_json(uri) if store.exists(uri) else {}


def prepare_folder(store: Store, folder: str, digest: str) -> dict:
    """Keep `folder` when it was made for `digest` (a resume), else empty it and start
    over. Returns its progress record."""
    progress = read_progress(store, folder)
    if progress.get("digest") == digest:
        return progress
    if store.list_files(folder):
        log.info("%s was made for other inputs: starting it over", folder)
        store.delete_prefix(as_folder(folder))
    progress = {"digest": digest, "complete": False}
    store.write_json(progress_uri(folder), progress)
    return progress


def folder_complete(store: Store, folder: str, digest: str) -> bool:
    progress = read_progress(store, folder)
    return bool(progress.get("complete")) and progress.get("digest") == digest


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder for a step, under XWIN_WORKDIR when that is set (created if missing:
    in a pod it names a folder of a fresh, empty scratch volume)."""
    workdir = os.environ.get("XWIN_WORKDIR") or None
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=workdir)


# ----------------------------------------------------------------------------- inputs


def required_input(task: StageTask, name: str) -> str:
    if not task.inputs.get(name):
        have = ", ".join(sorted(task.inputs)) or "none"
        raise StageError(f"stage {task.stage}: task.inputs.{name} is required (inputs given: {have})")
    return task.inputs[name]


def load_prompts(store: Store, uri: str) -> list[dict]:
    """Prompt records with unique ids (answers are matched back by id), from JSON Lines,
    Parquet or a dataset repo (xwin_jobs.datasets_in)."""
    from ..datasets_in import iter_input_records

    prompts = []
    seen: set[str] = set()
    for record in iter_input_records(store, uri, "prompt"):
        if record["id"] in seen:
            raise StageError(f"{uri}: prompt id {record['id']!r} appears more than once "
                             "(ids must be unique: results are matched to prompts by id)")
        seen.add(record["id"])
        prompts.append(record)
    return prompts


def tokenizer_source(store: Store, uri: str, workdir: Path) -> str:
    """A folder (or Hub id) holding the model's tokenizer; for a remote model only the
    tokenizer and config files are downloaded, never the weights."""
    from ..modeling import HF_SCHEME, resolve_model_source
    from ..store import check_model_folder

    if uri.startswith(HF_SCHEME) or store.local_path(uri) is not None:
        return resolve_model_source(store, uri, workdir)
    folder = as_folder(uri)
    files = check_model_folder(store, uri)
    dest = workdir / "tokenizer"
    for f in files:
        rel = f[len(folder):]
        if "/" not in rel and rel in TOKENIZER_FILES:
            store.download_file(f, dest / rel)
    return str(dest)


# ----------------------------------------------------------------------------- sampling


def sample_into_folder(task: StageTask, store: Store, folder: str, prompts: list[dict], n: int,
                       digest: str, model_input: str, workdir: Path,
                       connect: Callable[[dict[str, str]], Any],
                       env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """n responses for every prompt not yet in `folder`; marks the folder complete and
    returns its progress record.

    `connect(env)` gives the sampler's `ClientConfig` (it may raise StageError or
    SamplerError); it and the tokenizer of `task.inputs[model_input]` are only asked for when
    some prompt is still to be sampled."""
    from ..chat import chat_format
    from ..sampler import SampleStats, SamplerError, SamplingParams

    env = dict(os.environ if env is None else env)
    prepare_folder(store, folder, digest)
    done = existing_ids(store, folder)
    todo = [p for p in prompts if p["id"] not in done]
    log.info("sampling n=%d for %d prompt(s) (%d already in %s)", n, len(todo),
             len(prompts) - len(todo), folder)
    stats = SampleStats()
    if todo:
        try:
            sampling = SamplingParams.from_params(task.params.get("sampling"))
            client = connect(env)
        except SamplerError as e:
            raise StageError(str(e)) from None
        from ..modeling import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_source(store, required_input(task, model_input),
                                                    workdir))
        fmt = chat_format(task.chat_template, tokenizer)
        flush_s = float(env.get("XWIN_SAMPLER_FLUSH_SECONDS") or 5)
        progress = ProgressWriter(store, task.output, task.stage, step_name("sample", env),
                                  "prompts", len(prompts), warn=log.warning,
                                  gpus=requested_gpus(task.params, "serving")[1])
        progress.update(len(prompts) - len(todo))
        try:
            asyncio.run(write_samples(store, folder, todo, n, sampling, client, fmt, stats,
                                      flush_s, progress))
        except SamplerError as e:
            raise StageError(f"{e} ({stats.prompts} prompt(s) sampled in this attempt are kept "
                             f"in {folder}; re-run to continue)") from None
        progress.finish()
    written = existing_ids(store, folder)
    missing = [p["id"] for p in prompts if p["id"] not in written]
    if missing:
        raise StageError(f"{folder}: {len(missing)} prompt(s) have no samples after sampling "
                         f"(first: {missing[0]!r})")
    progress = {"digest": digest, "complete": True, "prompts": len(prompts), "n": n,
                "lastAttempt": stats.as_counts()}
    store.write_json(progress_uri(folder), progress)
    return progress


async def write_samples(store: Store, folder: str, todo: list[dict], n: int, sampling, client,
                        fmt, stats, flush_s: float, progress: ProgressWriter | None = None) -> None:
    """Sample `todo` and write shards as answers arrive: a shard closes every `flush_s`
    seconds or SAMPLE_SHARD_RECORDS records, and what arrived is kept when sampling fails.
    `progress` (the step's live record) counts the prompts whose samples arrived."""
    from ..sampler import sample_with_reasons

    total = len(todo)
    writer = ShardWriter(store, folder, prefix="part", max_records=10**9)
    unflushed, last_flush, last_log = 0, time.monotonic(), time.monotonic()
    started, already = last_flush, progress.state.done if progress is not None else 0
    encode, to_content = fmt
    failed = True
    try:
        async for record, texts, reasons in sample_with_reasons(todo, n, sampling, client,
                                                                encode, stats, to_content):
            writer.write({"id": record["id"], "prompt": record["messages"],
                          "responses": [{"content": t, "finish_reason": r}
                                        for t, r in zip(texts, reasons)]})
            unflushed += 1
            now = time.monotonic()
            if progress is not None:
                progress.update(already + stats.prompts,
                                responsesPerSecond=stats.responses / max(now - started, 1e-9))
            if unflushed >= SAMPLE_SHARD_RECORDS or now - last_flush >= flush_s:
                await asyncio.to_thread(writer.flush)
                unflushed, last_flush = 0, now
            if now - last_log >= 10:
                log.info(stats.line(total))
                last_log = now
        failed = False
    finally:
        try:
            writer.flush()  # what arrived is complete and valid: keep it for the re-run
        except Exception:  # noqa: BLE001 - never hide the error that stopped sampling
            if not failed:
                raise
    log.info(stats.line(total))
