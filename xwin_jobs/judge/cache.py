"""Judgments kept in the artifact store, keyed by what was asked, written as they arrive.

Key: sha256 of (judge model, template version, request messages). A judgment found under its
key is never asked again, whichever run asked it first, so a killed or restarted stage only
pays for what it had not received.

Layout under the cache folder (e.g. `<stage>/judge/cache/`):
- on a local file system, `journal/<run>.jsonl`: one line per judgment, appended with one
  `write()` the moment it arrives, before the event loop does anything else (a killed process
  loses no completed write; a torn last line, possible only on a machine crash, is ignored);
- on S3, `items/<k[:2]>/<key>.json`: one object per judgment (one PUT as it arrives);
- so a kill loses at most the replies still in flight;
- `shards/<name>.jsonl`: many judgments in one object: a whole batch's results, or singles
  compacted by `compact()` (shard first, then the singles are deleted; a kill in between
  leaves duplicates with the same content, which is harmless).

A judgment is a JSON object: key, model, template, kind, status (`ok` | `unparseable` |
`refused`), verdict, reply (last text), problem, asks, usage {prompt_tokens,
completion_tokens}, costUSD, mode (`online` | `batch`), rev (bumped on every write of the key:
the highest wins when a key is stored more than once).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from typing import Any, Iterable, Sequence

from ..store import Store, StoreError, as_folder, join_uri

STATUSES = ("ok", "unparseable", "refused")


def judgment_key(model: str, template: str, messages: Sequence[dict[str, Any]]) -> str:
    body = json.dumps({"model": model, "template": template,
                       "messages": [{"role": m["role"], "content": m["content"]} for m in messages]},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class JudgmentCache:
    """The judgments under one cache folder, loaded once and appended to as they arrive."""

    def __init__(self, store: Store, folder_uri: str):
        self.store = store
        self.folder = as_folder(folder_uri)
        self.entries: dict[str, dict[str, Any]] = {}
        self._singles: set[str] = set()   # keys stored as single objects or journal lines
        self._journals: list[str] = []    # journal files read or written (folded by compact)
        self.local_folder = store.local_path(self.folder)
        self._journal = None               # this process's open journal file
        self.loaded = False

    def _item_uri(self, key: str) -> str:
        return join_uri(self.folder, "items", key[:2], f"{key}.json")

    def load(self) -> "JudgmentCache":
        """Read every judgment stored so far (shards first, then singles)."""
        files = self.store.list_files(self.folder)
        shards = [f for f in files if f.endswith(".jsonl") and "/shards/" in f]
        journals = [f for f in files if f.endswith(".jsonl") and "/journal/" in f]
        singles = [f for f in files if f.endswith(".json") and "/items/" in f]
        for uri in shards:
            for number, line in enumerate(self.store.read_text(uri).splitlines(), start=1):
                if line.strip():
                    self._add(_parse(line, uri, number), single=False)
        for uri in journals:
            lines = self.store.read_text(uri).split("\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    entry = _parse(line, uri, number)
                except StoreError:
                    if number == len(lines):
                        continue   # a torn last line: that judgment was never complete
                    raise
                self._add(entry, single=True)
            self._journals.append(uri)
        for uri in singles:
            self._add(_parse(self.store.read_text(uri), uri, None), single=True)
        self.loaded = True
        return self

    def _add(self, entry: dict[str, Any], single: bool) -> None:
        """Keep the newest version of a key: the one with the highest `rev`."""
        old = self.entries.get(entry["key"])
        if old is not None and int(old.get("rev", 0)) > int(entry.get("rev", 0)):
            return
        self.entries[entry["key"]] = entry
        if single:
            self._singles.add(entry["key"])

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _next_rev(self, entry: dict[str, Any]) -> None:
        old = self.entries.get(entry["key"])
        entry["rev"] = max(int(entry.get("rev", 0)), int(old.get("rev", 0)) if old else 0) + 1

    def put(self, entry: dict[str, Any]) -> None:
        """Store one judgment now (blocking)."""
        _check(entry)
        self._next_rev(entry)
        line = json.dumps(entry, sort_keys=True, ensure_ascii=False)
        if self.local_folder is not None:
            self._append(line)
        else:
            self.store.write_text(self._item_uri(entry["key"]), line)
        self._add(entry, single=True)

    def _append(self, line: str) -> None:
        if self._journal is None:
            folder = self.local_folder / "journal"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._journal = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._journals.append(join_uri(self.folder, "journal", name))
        data = (line + "\n").encode("utf-8")
        written = os.write(self._journal, data)
        if written != len(data):
            raise StoreError(f"{self.folder}journal: short write ({written} of {len(data)} bytes)")

    def close(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    async def aput(self, entry: dict[str, Any]) -> None:
        """`put` from async code: a local journal line is appended right away (no await
        between a reply's arrival and its storing); an S3 PUT runs in a thread."""
        if self.local_folder is not None:
            self.put(entry)
        else:
            await asyncio.to_thread(self.put, entry)

    def put_many(self, entries: Iterable[dict[str, Any]], name: str) -> str | None:
        """Store many judgments as one shard `shards/<name>.jsonl`; returns its URI."""
        entries = list(entries)
        if not entries:
            return None
        for e in entries:
            _check(e)
            self._next_rev(e)
        uri = join_uri(self.folder, "shards", f"{name}.jsonl")
        self.store.write_text(uri, "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n"
                                           for e in entries))
        for e in entries:
            self._add(e, single=False)
        return uri

    def compact(self) -> int:
        """Fold the single-object judgments into one shard; returns how many were folded."""
        keys = sorted(self._singles)
        if not keys:
            return 0
        name = "online-" + hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        self.put_many([self.entries[k] for k in keys], name)
        self.close()
        for uri in self._journals:
            self.store.delete_prefix(uri)
        self._journals.clear()
        if self.local_folder is None:
            for k in keys:
                self.store.delete_prefix(self._item_uri(k))
        else:
            self.store.delete_prefix(join_uri(self.folder, "items/"))
        self._singles.clear()
        return len(keys)

    def spent_usd(self, keys: Iterable[str] | None = None) -> float:
        """Sum of the estimated cost of stored judgments (all, or those of `keys`)."""
        chosen = self.entries.values() if keys is None else \
            (self.entries[k] for k in keys if k in self.entries)
        return sum(float(e.get("costUSD") or 0.0) for e in chosen)


def _check(entry: dict[str, Any]) -> None:
    if not isinstance(entry.get("key"), str) or entry.get("status") not in STATUSES:
        raise ValueError(f"not a judgment: key and status ({', '.join(STATUSES)}) are required")


def _parse(text: str, uri: str, line: int | None) -> dict[str, Any]:
    where = f"{uri}:{line}" if line else uri
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreError(f"{where}: judgment cache entry is not valid JSON ({e.msg})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) \
            or entry.get("status") not in STATUSES:
        raise StoreError(f"{where}: judgment cache entry needs 'key' and 'status'")
    return entry
