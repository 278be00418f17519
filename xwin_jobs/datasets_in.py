"""Stage inputs in the formats users have: JSON Lines, Parquet, Hugging Face dataset repos.

A data input URI is one of:

* JSON Lines: a `.jsonl` / `.jsonl.gz` file or a folder of them (xwin_jobs.records);
* Parquet: a `.parquet` file or a folder holding `*.parquet` files (file://, s3://, plain
  paths), read with pyarrow one file at a time;
* a Hugging Face dataset repo, `hf://datasets/ORG/NAME[@revision][/config][:split]` (split
  `train` unless named), read with `datasets.load_dataset`. With `XWIN_HF_DATASETS_DIR` set,
  `hf://datasets/ORG/NAME` is the folder `$XWIN_HF_DATASETS_DIR/ORG/NAME`, laid out as the
  Hub lays out a repo (what `hf download --repo-type dataset --local-dir` makes), and no
  network is used; otherwise the Hub (a revision pins it).

Columns are mapped to the record fields of docs/design.md where they follow TRL's dataset
formats (`from_columns`): conversational `messages`; `prompt` + `completion`; `prompt` /
`chosen` / `rejected` as message lists or plain strings (a string prompt is one user
message, a string answer one assistant message), with the prompt implicit in `chosen` /
`rejected` when there is no `prompt` column; `score_chosen` / `score_rejected`. Rows
without an `id` get their row number (zero-padded). Every row is then validated as a JSON
Lines record is; a bad one is a RecordError naming the file (or the repo URI), the row
(counted from 0, as `dataset[i]`) and the field; a file or repo without a needed column is
one naming the column before any row is read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

from .records import RecordError, iter_records, model_for, validate_record
from .store import Store, as_folder
from .store_uri import MIRROR_ENV, is_hf_dataset, mirror_folder, parse_hf_dataset

log = logging.getLogger(__name__)

PARQUET = ".parquet"
ID_WIDTH = 9  # synthesized ids sort as the rows do


# ----------------------------------------------------------------------------- columns (pure)

def _messages(value: Any, role: str) -> Any:
    """A plain string as one message of `role`; a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _keep(messages: Any) -> Any:
    """Messages reduced to role and content (Parquet structs carry every key of every row,
    null where a row has none)."""
    if not isinstance(messages, list):
        return messages
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
            for m in messages]


REQUIRED = {  # kind -> the column sets one of which must be there
    "conversation": (("messages",), ("prompt", "completion")),
    "prompt": (("messages",), ("prompt",)),
    "pair": (("chosen", "rejected"),),
    "scored": (("prompt", "responses"),),
}


def check_columns(columns: list[str], kind: str, where: str) -> None:
    """RecordError naming the first missing column unless `columns` can make `kind` records."""
    model_for(kind)
    options = REQUIRED[kind]
    if any(all(c in columns for c in option) for option in options):
        return
    missing = next(c for c in options[0] if c not in columns)
    accepted = " or ".join("+".join(o) for o in options)
    raise RecordError(where, None, None, f"no column '{missing}' (columns: {', '.join(columns)});"
                      f" {kind} records need {accepted}")


def from_columns(row: dict[str, Any], kind: str, index: int) -> dict[str, Any]:
    """One row of a table -> a record of `kind` (not yet validated); see the module docstring."""
    rid = row.get("id")
    record: dict[str, Any] = {"id": f"{index:0{ID_WIDTH}d}" if rid is None else rid}
    if kind in ("conversation", "prompt") and "messages" in row:
        record["messages"] = _keep(row["messages"])
    elif kind == "conversation":
        record["messages"] = _keep(_messages(row.get("prompt"), "user")) + \
            _keep(_messages(row.get("completion"), "assistant"))
    elif kind == "prompt":
        record["messages"] = _keep(_messages(row.get("prompt"), "user"))
    elif kind == "pair":
        chosen = _keep(_messages(row.get("chosen"), "assistant"))
        rejected = _keep(_messages(row.get("rejected"), "assistant"))
        prompt = row.get("prompt")
        if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
            # TRL's implicit prompt: the messages chosen and rejected start with
            n = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        record.update(prompt=_keep(_messages(prompt, "user")), chosen=chosen, rejected=rejected)
        for ours, theirs in (("chosen_score", "score_chosen"), ("rejected_score", "score_rejected")):
            value = row.get(ours, row.get(theirs))
            if value is not None:
                record[ours] = value
    else:
        record.update({k: v for k, v in row.items() if k != "id"})
    return record


# ----------------------------------------------------------------------------- reading

def input_format(store: Store, uri: str) -> str:
    """`hf`, `parquet` or `jsonl`: how the input at `uri` is read."""
    if is_hf_dataset(uri):
        return "hf"
    if uri.endswith(PARQUET):
        return "parquet"
    if uri.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "parquet" if parquet_files(store, uri) else "jsonl"


def parquet_files(store: Store, uri: str) -> list[str]:
    """The Parquet files behind `uri`: the file itself, or every `*.parquet` under the folder."""
    if uri.endswith(PARQUET):
        return [uri]
    return [u for u in store.list_files(as_folder(uri))
            if u.endswith(PARQUET) and not u.rsplit("/", 1)[-1].startswith((".", "_"))]


def iter_input_records(store: Store, uri: str, kind: str,
                       workdir: str | Path | None = None) -> Iterator[dict]:
    """Validated records of `kind` from a JSON Lines, Parquet or dataset-repo input. `workdir`:
    where remote Parquet files and the datasets cache go (a temporary folder otherwise)."""
    fmt = input_format(store, uri)
    if fmt == "jsonl":
        yield from iter_records(store, uri, kind)
        return
    import importlib.util
    import tempfile

    for module in ("pyarrow", "datasets") if fmt == "hf" else ("pyarrow",):
        if importlib.util.find_spec(module) is None:
            raise RecordError(uri, None, None, f"reading {'a dataset repo' if fmt == 'hf' else 'Parquet'} "
                              f"needs {module}, which this environment lacks (the trainer image has it; "
                              "give JSON Lines here)")
    with tempfile.TemporaryDirectory(prefix="xwin-input-", dir=workdir) as tmp:
        rows = _hf_rows(uri, kind, Path(tmp)) if fmt == "hf" else _parquet_rows(store, uri, kind, Path(tmp))
        count = 0
        for where, row, index, offset in rows:
            yield validate_record(from_columns(row, kind, offset + index), kind, where, index, "row")
            count += 1
    if count == 0:
        raise RecordError(uri, None, None, "no records: the input is empty")


def _parquet_rows(store: Store, uri: str, kind: str, tmp: Path):
    """(file, row, index in file, rows before the file) of every row of every Parquet file."""
    import pyarrow.parquet as pq

    files = parquet_files(store, uri)
    if not files:
        raise RecordError(uri, None, None, "no records: no *.parquet files there")
    offset = 0
    for n, file in enumerate(files):
        local = store.local_path(file)
        if local is None:
            local = store.download_file(file, tmp / f"{n:05d}{PARQUET}")
        try:
            table = pq.ParquetFile(local)
        except (OSError, ValueError) as e:
            raise RecordError(file, None, None, f"not a readable Parquet file ({e})") from None
        check_columns(table.schema_arrow.names, kind, file)
        index = 0
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield file, row, index, offset
                index += 1
        offset += index


def load_hf_dataset(uri: str, cache_dir: Path):
    """The split an hf://datasets URI names, as a `datasets.Dataset` (from the mirror under
    XWIN_HF_DATASETS_DIR, else the Hub). One that cannot be loaded (no network, no such repo,
    config or split) is a RecordError naming the URI."""
    import datasets

    ref = parse_hf_dataset(uri)
    mirror = mirror_folder(uri)
    if mirror is not None and not mirror.is_dir():
        raise RecordError(ref.where(), None, None, f"no local copy at {mirror} ({MIRROR_ENV} is "
                          "set: dataset repos are read from there, not from the Hub)")
    try:
        return datasets.load_dataset(str(mirror) if mirror else ref.repo, ref.config,
                                     split=ref.split, revision=None if mirror else ref.revision,
                                     cache_dir=str(cache_dir))
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, unknown split
        source = f"the local copy {mirror}" if mirror else "the Hugging Face Hub"
        raise RecordError(ref.where(), None, None, f"cannot load this dataset from {source}: "
                          f"{type(e).__name__}: {e}") from None


def _hf_rows(uri: str, kind: str, tmp: Path):
    ds = load_hf_dataset(uri, tmp / "datasets")
    where = parse_hf_dataset(uri).where()
    check_columns(ds.column_names, kind, where)
    for index, row in enumerate(ds):
        yield where, row, index, 0


def hub_commit(uri: str) -> str | None:
    """The commit the Hub serves for an hf://datasets URI without a pinned revision and without
    a local mirror (its fingerprint names no content then); None otherwise, or when the Hub
    cannot be asked (loading then says why)."""
    if not is_hf_dataset(uri) or mirror_folder(uri) is not None:
        return None
    ref = parse_hf_dataset(uri)
    if ref.revision and len(ref.revision) == 40:
        return None  # a commit: content already
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(ref.repo, revision=ref.revision).sha
    except Exception as e:  # noqa: BLE001 - offline, no such repo: load_hf_dataset names it
        log.info("%s: no commit from the Hub (%s)", uri, e)
        return None
