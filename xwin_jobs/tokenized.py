"""Tokenized once, shared by every rank: a training stage's examples as Arrow files.

A training stage's examples are a function of its records (the input's fingerprint, and for
derived records the selection that made them), the tokenizer's files, the chat template and
maxLength: `tokenized_key` of those. `tokenize_once` makes them once and keeps them under the
stage's output, `<stage>/tokenized/<key>/` (`datasets.Dataset.save_to_disk`: Arrow files
plus `_TOKENIZED.json`, written last, with the encoding's counts and a digest of the tokens):

* every rank of a node takes a node-local file lock in turn (`filelock`, on the scratch
  volume: no collective, so a long tokenization is not bounded by
  `training.collectiveTimeoutMinutes`); the first finds no copy and tokenizes, with
  `datasets.map` over `num_proc` processes (the CPUs the pod may use), the others wait, then
  find the copy; every rank memory-maps the same files (`load_from_disk`), so the node holds
  the tokens once in its page cache, however many ranks read them;
* on a remote store the node's copy lives in the scratch volume (`XWIN_WORKDIR/tokenized`,
  else the system's temporary folder) and rank 0 uploads it; a restarted attempt on a fresh
  node downloads it instead of tokenizing, a file:// store is read in place;
* `also`: other folders holding the same key (a sibling stage of the run that read the same
  records with the same tokenizer) are looked in before tokenizing;
* other keys under the stage's `tokenized/` (made for inputs it no longer has) are deleted.

`Tokenized.metrics()`: `tokenizedReused` (no rank tokenized in this attempt) and
`tokenizedRanks` (how many did: one per node that had no copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .node_scratch import copy_name, node_root
from .store import Store, as_folder, join_uri
from .training.data import EncodeStats, TokenRows, encode_rows, token_features

log = logging.getLogger(__name__)

MANIFEST = "_TOKENIZED.json"
FORMAT = 1  # bump when encode_rows' output changes for the same inputs
TOKENIZED = "tokenized/"
ROWS_PER_PROCESS = 2000  # fewer rows per process than this: fewer processes
TOKEN_COLUMNS = {"sft": ("input_ids", "labels"),
                 "pairs": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}


# ----------------------------------------------------------------------------- keys (pure)

def tokenized_key(body: dict[str, Any]) -> str:
    """The key of a stage's examples: a hash of what they are a function of (`body`: the
    records' identity, tokenizer, chat template, maxLength, layout) and the encoding's FORMAT."""
    text = json.dumps({"format": FORMAT, **body}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tokenizer_fingerprint(source: str, files: Sequence[str]) -> str:
    """The tokenizer's `files` in the model folder `source`, hashed; a Hub id names itself."""
    folder = Path(source)
    if not folder.is_dir():
        return f"hub:{source}"
    h = hashlib.sha256()
    for name in sorted(files):
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def usable_cpus(env: dict[str, str] | None = None, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup's CPU quota (a pod's limit) where there is one,
    else the CPUs it may run on. XWIN_TOKENIZE_PROCS overrides."""
    env = os.environ if env is None else env
    if env.get("XWIN_TOKENIZE_PROCS"):
        return max(1, int(env["XWIN_TOKENIZE_PROCS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def processes_for(rows: int, cpus: int) -> int:
    """How many processes `map` uses for `rows` records: every CPU, but not for a few rows."""
    return max(1, min(cpus, rows // ROWS_PER_PROCESS))


def record_columns(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """What `encode_rows` reads of a validated record (messages as role and content: extra
    keys would make the Arrow schema differ from row to row)."""
    def plain(messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    if kind == "sft":
        return {"id": record["id"], "messages": plain(record["messages"])}
    return {"id": record["id"], **{k: plain(record[k]) for k in ("prompt", "chosen", "rejected")}}


# ----------------------------------------------------------------------------- the result

@dataclass
class Tokenized:
    rows: TokenRows
    manifest: dict[str, Any]
    ranks: int  # ranks that tokenized in this attempt (0: every rank reused a copy)
    folder: str

    @property
    def reused(self) -> bool:
        return self.ranks == 0

    def stats(self) -> EncodeStats:
        s = self.manifest["stats"]
        return EncodeStats(records=s["records"], examples=s["examples"], truncated=s["truncated"],
                           skipped=s["skipped"], labelled_tokens=s["labelledTokens"])

    @property
    def counts(self) -> dict[str, Any]:
        """What the stage counted while making the records (kept for a reuse)."""
        return dict(self.manifest.get("counts") or {})

    def metrics(self) -> dict[str, Any]:
        return {"tokenizedReused": self.reused, "tokenizedRanks": self.ranks}


# ----------------------------------------------------------------------------- the shell

def scratch_root(env: dict[str, str] | None = None) -> Path:
    """Where a node keeps its copies (node_scratch: XWIN_WORKDIR/tokenized, else xwin-tokenized)."""
    return node_root("tokenized", env)


def _complete(path: Path, key: str) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _places(store: Store, folder: str, root: Path) -> list[Path]:
    """Where a copy of the folder may be on this node: in place (a file:// store), then the
    node's own copy in the scratch volume."""
    path = store.local_path(folder)
    return ([path] if path is not None else []) + [root / copy_name(folder)]


def _find(store: Store, folders: Sequence[str], key: str, root: Path) -> tuple[Path, str] | None:
    """(a complete local copy, the folder it is of) of the first folder holding `key`,
    downloaded into the node's copy when the store is remote."""
    for folder in folders:
        for local in _places(store, folder, root):
            if _complete(local, key):
                return local, folder
        marker = join_uri(folder, MANIFEST)
        if store.local_path(folder) is None and store.exists(marker) and \
                store.read_json(marker).get("key") == key:
            local = root / copy_name(folder)
            partial = root / f"{local.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            store.download_dir(folder, partial)
            shutil.rmtree(local, ignore_errors=True)
            partial.rename(local)
            log.info("tokenized examples: downloaded %s", folder)
            return local, folder
    return None


def _content_digest(dataset: Any, kind: str) -> str:
    """sha256 of every token column, in order: the examples themselves."""
    import pyarrow.compute as pc

    h = hashlib.sha256()
    for name in TOKEN_COLUMNS[kind]:
        for chunk in dataset.data.column(name).chunks:
            h.update(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(chunk).to_numpy(zero_copy_only=False).tobytes())
    return "sha256:" + h.hexdigest()


def _build(records: list[dict], kind: str, encode: dict[str, Any], key: str, work: Path) -> dict:
    """Tokenize `records` into `work/data` (save_to_disk); returns the manifest's body."""
    import datasets

    table = datasets.Dataset.from_list([record_columns(r, kind) for r in records])
    n = processes_for(len(records), usable_cpus())
    encoded = table.map(encode_rows, batched=True, batch_size=256, fn_kwargs={"kind": kind, **encode},
                        num_proc=n if n > 1 else None, remove_columns=table.column_names,
                        features=token_features(kind), new_fingerprint=key,
                        cache_file_name=str(work / "encoded.arrow"), desc="tokenizing")
    flags = encoded.with_format("arrow")[:]
    keep = flags.column("keep").to_pylist()
    stats = {"records": len(keep), "examples": sum(keep), "skipped": len(keep) - sum(keep),
             "truncated": sum(flags.column("truncated").to_pylist()),
             "labelledTokens": sum(v for v, k in zip(flags.column("labelled").to_pylist(), keep) if k)}
    ids = flags.column("id").to_pylist()
    kept = encoded.select(sorted((i for i, k in enumerate(keep) if k), key=ids.__getitem__))  # by_id
    kept.save_to_disk(str(work / "data"))
    saved = datasets.load_from_disk(str(work / "data"))
    log.info("tokenized %d record(s) with %d process(es): %d example(s)", len(keep), n,
             stats["examples"])
    return {"key": key, "kind": kind, "stats": stats, "tokens": _content_digest(saved, kind)}


def _publish(store: Store, local: Path, folder: str) -> None:
    """Upload a complete copy, its manifest last."""
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST):
        store.upload_file(path, join_uri(folder, path.relative_to(local).as_posix()))
    store.upload_file(local / MANIFEST, join_uri(folder, MANIFEST))
    log.info("tokenized examples: stored in %s", folder)


def _build_copy(make_records: Callable[[], tuple[list[dict], dict]], kind: str,
                encode: dict[str, Any], key: str, dest: Path, extra: dict[str, Any] | None) -> Path:
    """Tokenize into `dest` (the node's copy), its manifest written last; returns `dest`."""
    work = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
    try:
        records, counts = make_records()
        manifest = {**_build(records, kind, encode, key, work), "counts": counts, **(extra or {})}
        del records
        data = work / "data"
        (data / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        shutil.rmtree(dest, ignore_errors=True)
        data.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _prune(store: Store, folder: str) -> None:
    """Delete the other keys beside `folder` (examples of this stage's earlier inputs)."""
    parent = folder.rstrip("/").rsplit("/", 1)[0] + "/"
    stale = {u[len(parent):].split("/", 1)[0] for u in store.list_files(parent)} - {folder[len(parent):-1]}
    for name in sorted(stale):
        store.delete_prefix(join_uri(parent, name + "/"))
        log.info("tokenized examples: deleted %s%s/ (other inputs)", parent, name)


def tokenize_once(store: Store, folder: str, key: str, kind: str,
                  make_records: Callable[[], tuple[list[dict], dict]], encode: dict[str, Any],
                  dist: Any = None, also: Sequence[str] = (), root: Path | None = None,
                  extra: dict[str, Any] | None = None) -> Tokenized:
    """The examples under `folder` (`<stage>/tokenized/<key>/`), made at most once per node
    (module docstring). `make_records()` -> (validated records, counts), called only when no
    copy exists; `encode`: template, tokenizer and max_length for `encode_rows`; `dist`: the
    stage's Distributed (None: one process); `extra`: more manifest fields."""
    import datasets
    from filelock import FileLock

    from .training.distributed import Distributed

    dist = dist or Distributed()
    root = root or scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = as_folder(folder)
    built = False
    with FileLock(str(root / f"{copy_name(folder)}.lock")):
        found = _find(store, [folder, *map(as_folder, also)], key, root)
        if found is None:
            built = True
            found = _build_copy(make_records, kind, encode, key, root / copy_name(folder), extra), folder
        path, origin = found
        if dist.is_main and origin == folder and not store.exists(join_uri(folder, MANIFEST)):
            _publish(store, path, folder)  # made here (or the store lost its copy)
            in_place = store.local_path(folder)
            if built and in_place is not None and _complete(in_place, key):
                shutil.rmtree(path, ignore_errors=True)  # a file:// store: one copy is enough
                path = in_place
    dataset = datasets.load_from_disk(str(path))  # memory-mapped, shared by the node's ranks
    if dist.is_main:
        _prune(store, folder)
    manifest = json.loads((path / MANIFEST).read_text())
    ranks = int(dist.all_reduce_sum({"built": float(built)})["built"])
    log.info("tokenized examples %s: %s (%d example(s))", key,
             "reused" if ranks == 0 else f"tokenized by {ranks} rank(s)", len(dataset))
    return Tokenized(TokenRows(dataset, kind), manifest, ranks, folder)
