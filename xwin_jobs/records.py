"""JSON Lines records of docs/design.md: conversation, prompt, pair, scored set.

Each kind is a pydantic v2 model (extra keys allowed and kept: users add metadata). Readers
take a single `.jsonl` / `.jsonl.gz` file or a folder of shards (every `*.jsonl[.gz]` under it,
sorted) from any store URI and yield validated records as plain dicts; a bad line raises a
`RecordError` naming file, line and field. `ShardWriter` writes `part-00000.jsonl`, ... each
shard becoming visible only once complete, and numbers new shards after existing ones so a
killed job can resume (skipping `existing_ids`).

Parquet files and Hugging Face dataset repos are read by xwin_jobs.datasets_in. pydantic is light.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import re
import zlib
from typing import Annotated, Any, Iterator, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from xwin_jobs.store import Store, StoreError, as_folder, join_uri

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz")


class RecordError(ValueError):
    """A bad record: `<file>:<line>: field '<dotted.path>': <problem>` (a table's rows:
    `<file> row <n>: ...`, `unit="row"`)."""

    def __init__(self, file: str, line: int | None, field: str | None, problem: str,
                 unit: str = "line"):
        self.file, self.line, self.field, self.problem = file, line, field, problem
        where = file if line is None else f"{file}:{line}" if unit == "line" else f"{file} {unit} {line}"
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}: {what}{problem}")


# ----------------------------------------------------------------------------- models

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _int_id_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# A record id: a non-empty string (integer ids are accepted and turned into strings).
RecordId = Annotated[str, BeforeValidator(_int_id_to_str), Field(min_length=1)]


class Message(_Open):
    role: Literal["system", "user", "assistant"]
    content: str


def _non_empty(messages: list[Message]) -> list[Message]:
    if not messages:
        raise ValueError("must not be empty")
    return messages


def _ends_with(messages: list[Message], role: str) -> list[Message]:
    _non_empty(messages)
    if messages[-1].role != role:
        article = "an" if role == "assistant" else "a"
        raise ValueError(f"must end with {article} {role} message (the last one is "
                         f"{messages[-1].role})")
    return messages


class Conversation(_Open):
    id: RecordId
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _has_assistant_turn(cls, v: list[Message]) -> list[Message]:
        _non_empty(v)
        if not any(m.role == "assistant" for m in v):
            raise ValueError("needs at least one assistant message")
        return v


class Prompt(_Open):
    id: RecordId
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[Message]) -> list[Message]:
        return _ends_with(v, "user")


class Pair(_Open):
    id: RecordId
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    chosen_score: float | None = None
    rejected_score: float | None = None
    judge: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_ends_with_user(cls, v: list[Message]) -> list[Message]:
        return _ends_with(v, "user")

    @field_validator("chosen", "rejected")
    @classmethod
    def _answer_ends_with_assistant(cls, v: list[Message]) -> list[Message]:
        return _ends_with(v, "assistant")


class ScoredResponse(_Open):
    content: str
    score: float | None = None


class ScoredSet(_Open):
    id: RecordId
    prompt: list[Message]
    responses: list[ScoredResponse]

    @field_validator("prompt")
    @classmethod
    def _prompt_ends_with_user(cls, v: list[Message]) -> list[Message]:
        return _ends_with(v, "user")

    @field_validator("responses")
    @classmethod
    def _some_responses(cls, v: list[ScoredResponse]) -> list[ScoredResponse]:
        if not v:
            raise ValueError("must not be empty")
        return v


KINDS: dict[str, type[BaseModel]] = {
    "conversation": Conversation,
    "prompt": Prompt,
    "pair": Pair,
    "scored": ScoredSet,
}


def model_for(kind: str) -> type[BaseModel]:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown record kind '{kind}' (one of {', '.join(KINDS)})") from None


# ----------------------------------------------------------------------------- validation (pure)

def _problem(err: dict) -> str:
    """One pydantic error in plain words."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}"
    if kind in ("string_type", "string_unicode"):
        return "must be a string"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return "must be a number or null"
    if kind == "list_type":
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be an object"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg", "")))
    return err.get("msg", kind)


def validate_record(obj: Any, kind: str, file: str = "<record>", line: int | None = None,
                    unit: str = "line") -> dict:
    """The record as a plain dict (extra keys kept), or a RecordError for its first problem."""
    if not isinstance(obj, dict):
        raise RecordError(file, line, "<record>",
                          f"must be a JSON object, not {type(obj).__name__}", unit)
    try:
        record = model_for(kind).model_validate(obj)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "<record>"
        raise RecordError(file, line, field, _problem(first), unit) from None
    return record.model_dump(mode="json")


def parse_line(text: str | bytes, kind: str, file: str, line: int) -> dict:
    """One JSON Lines line -> a validated record dict."""
    try:
        obj = json.loads(text)
    except UnicodeDecodeError as e:
        raise RecordError(file, line, "<json>", f"not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise RecordError(file, line, "<json>", f"invalid JSON: {e.msg} (column {e.colno})") \
            from None
    return validate_record(obj, kind, file, line)


# ----------------------------------------------------------------------------- reading

def is_shard(uri: str) -> bool:
    name = uri.rsplit("/", 1)[-1]
    return name.endswith(SHARD_SUFFIXES) and not name.startswith((".", "_"))


def shard_uris(store: Store, uri: str) -> list[str]:
    """The shards behind `uri`: the file itself, or every shard under the folder, sorted."""
    if uri.endswith(SHARD_SUFFIXES):
        return [uri]
    return [u for u in store.list_files(uri) if is_shard(u)]


def open_lines(store: Store, uri: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of one shard, gunzipped when it ends in .gz; blank lines
    skipped."""
    local = store.local_path(uri)
    if local is not None:
        if not local.is_file():
            raise StoreError(f"{uri}: no such file")
        raw: io.BufferedIOBase = open(local, "rb")
    else:
        raw = io.BytesIO(store.read_bytes(uri))
    with raw:
        stream = gzip_module.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        number = 0
        try:
            for number, text in enumerate(stream, start=1):
                if text.strip():
                    yield number, text
        except (OSError, EOFError, zlib.error) as e:
            raise RecordError(uri, number + 1 if number else None, None,
                              f"not a readable gzip file ({e})") from None


def iter_records(store: Store, uri: str, kind: str) -> Iterator[dict]:
    """Validated records of `kind` from a shard file or a folder of shards."""
    model_for(kind)
    shards = shard_uris(store, uri)
    if not shards:
        raise RecordError(uri, None, None, "no records: no *.jsonl or *.jsonl.gz files there")
    count = 0
    for shard in shards:
        for number, text in open_lines(store, shard):
            yield parse_line(text, kind, shard, number)
            count += 1
    if count == 0:
        raise RecordError(uri, None, None, "no records: the input is empty")


def read_records(store: Store, uri: str, kind: str) -> list[dict]:
    return list(iter_records(store, uri, kind))


def existing_ids(store: Store, data_uri: str) -> set[str]:
    """Ids already written under a data folder (empty when there is none), so a resumed job
    can skip them."""
    ids: set[str] = set()
    for shard in shard_uris(store, data_uri):
        for number, text in open_lines(store, shard):
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RecordError(shard, number, "<json>", f"invalid JSON: {e}") from None
            if not isinstance(obj, dict) or "id" not in obj:
                raise RecordError(shard, number, "id", "is required")
            ids.add(str(obj["id"]))
    return ids


def next_shard_index(store: Store, data_uri: str, prefix: str = "part") -> int:
    """One more than the highest `<prefix>-NNNNN.jsonl[.gz]` index under `data_uri`."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.jsonl(\.gz)?$")
    found = [int(m.group(1)) for u in store.list_files(data_uri)
             if (m := pattern.match(u.rsplit("/", 1)[-1]))]
    return max(found) + 1 if found else 0


# ----------------------------------------------------------------------------- writing

class ShardWriter:
    """Writes records as `<prefix>-00000.jsonl` (or `.jsonl.gz`) shards under `data_uri`.

    A shard is closed after `max_records` records or `max_bytes` uncompressed bytes, on
    `flush()` and on leaving the `with` block, and only then written, in one atomic write
    (file: temporary + rename; S3: one put): no reader ever sees half a shard. Numbering
    starts after the shards already there (`start_index` overrides), so a resumed job never
    overwrites earlier output. With `kind`, each record is validated before it is written.
    """

    def __init__(self, store: Store, data_uri: str, prefix: str = "part", *,
                 max_records: int = 1000, max_bytes: int = 64 * 1024 * 1024,
                 gzip: bool = False, kind: str | None = None, start_index: int | None = None):
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if kind is not None:
            model_for(kind)
        self.store, self.data_uri, self.prefix = store, as_folder(data_uri), prefix
        self.max_records, self.max_bytes, self.gzip, self.kind = max_records, max_bytes, gzip, kind
        self.next_index = (next_shard_index(store, data_uri, prefix)
                           if start_index is None else start_index)
        self.shards: list[str] = []  # URIs written by this writer
        self.count = 0  # records written (in closed shards and the open one)
        self._lines: list[bytes] = []
        self._size = 0

    def _shard_uri(self, index: int) -> str:
        return join_uri(self.data_uri, f"{self.prefix}-{index:05d}.jsonl"
                        + (".gz" if self.gzip else ""))

    def write(self, record: dict) -> None:
        if self.kind is not None:
            record = validate_record(record, self.kind, self._shard_uri(self.next_index),
                                     len(self._lines) + 1)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._lines.append(line)
        self._size += len(line)
        self.count += 1
        if len(self._lines) >= self.max_records or self._size >= self.max_bytes:
            self.flush()

    def write_all(self, records) -> None:
        for record in records:
            self.write(record)

    def flush(self) -> str | None:
        """Close the open shard (if it has records); returns its URI."""
        if not self._lines:
            return None
        data = b"".join(self._lines)
        if self.gzip:
            data = gzip_module.compress(data, mtime=0)
        uri = self._shard_uri(self.next_index)
        self.store.write_bytes(uri, data)
        self.shards.append(uri)
        self.next_index += 1
        self._lines, self._size = [], 0
        return uri

    close = flush

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
            return
        # On an error, keep what was produced (complete, valid records) for a resume, but
        # never let a failing flush hide the original error.
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            pass


def write_records(store: Store, data_uri: str, records, kind: str | None = None,
                  **writer_options) -> list[str]:
    """Write all records as shards; returns the shard URIs."""
    with ShardWriter(store, data_uri, kind=kind, **writer_options) as writer:
        writer.write_all(records)
    return writer.shards
