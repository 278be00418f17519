"""Inputs known by their content: a fingerprint for every external input of a stage.

A stage's digest (StageTask.digest) covers its parameters, its input URIs, the digests in the
markers of the stages it reads, and, through `upstream_digests`, the fingerprint of every
external input: one the run does not make (a data file, the base model, a `from:` artifact,
evaluation prompts). Edit a data file in place or overwrite an S3 object and the digest moves,
so the stage and everything downstream runs again.

    fingerprint(store, uri) -> "sha256:..." | "stat:<size>:<mtime ns>" | "etag:..." | "tree:..." |
                               "hf:..." | MISSING

  * a `file://` file up to SMALL_FILE bytes: the sha256 of its bytes; a larger one: its size
    and modification time (hashing a 14 GB checkpoint at every look is not worth it);
  * an `s3://` object: its ETag (and VersionId where the bucket is versioned);
  * a folder (either scheme): a sha256 over the sorted list of its files' own fingerprints;
  * `hf://org/name[@revision]`, `hf://datasets/...`: the reference itself (a pinned revision
    is content; an unpinned one is what the pods resolve); a dataset repo read from a local
    copy (XWIN_HF_DATASETS_DIR, xwin_jobs.datasets_in) is that folder's fingerprint;
  * nothing there: MISSING (a stage that must read it again stops naming the field).

`Fingerprints` is the same with a memory: a `file://` file's sha256 is kept while its size
and mtime stay, and (for the operator, which asks at every reconcile) an answer may be reused
for `ttl` seconds. One function for the jobs (`task.upstream_digests`) and the planners (what
they observe), so both compute the same digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

from .store_uri import HF_DATASETS, MIRROR_ENV, as_folder, file_path, mirror_folder, scheme_of

SMALL_FILE = 64 * 1024 * 1024
MISSING = "missing"
HF = "hf://"


def _sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _tree(entries: list[tuple[str, str]]) -> str:
    return "tree:" + hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


class Fingerprints:
    """`fingerprint` with a memory (see the module docstring). `ttl`: seconds an answer is
    reused without looking again (0: look every time; file sha256s are kept by size and mtime
    either way). Not thread-safe: one per caller."""

    def __init__(self, ttl: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.clock = ttl, clock
        self._hashes: dict[tuple[str, int, int], str] = {}     # (path, size, mtime) -> sha256
        self._answers: dict[tuple[Any, str], tuple[float, str]] = {}  # (scope, uri) -> (when, fp)

    def of(self, store: Any, uri: str, scope: Any = None) -> str:
        """The fingerprint of `uri`; an answer is reused within `ttl` seconds for the same
        `scope` only (the operator passes a run's uid and generation: a new run, or a spec
        change, looks again)."""
        seen = self.cached(uri, scope)
        if seen is not None:
            return seen
        return self.remember(uri, scope, self.look(store, uri))

    def cached(self, uri: str, scope: Any = None) -> str | None:
        """The answer for `uri` in `scope` still within the TTL, else None (no I/O)."""
        if self.ttl <= 0:
            return None
        seen = self._answers.get((scope, uri))
        return seen[1] if seen is not None and self.clock() - seen[0] < self.ttl else None

    def remember(self, uri: str, scope: Any, value: str) -> str:
        if self.ttl > 0:
            now = self.clock()
            if len(self._answers) > 4096:  # drop what has expired
                self._answers = {k: v for k, v in self._answers.items() if now - v[0] < self.ttl}
            self._answers[(scope, uri)] = (now, value)
        return value

    def look(self, store: Any, uri: str) -> str:
        """The fingerprint of `uri` now (no answer reused; file hashes kept by size and mtime)."""
        if uri.startswith(HF_DATASETS) and os.environ.get(MIRROR_ENV):
            return self._file(mirror_folder(uri))
        if uri.startswith(HF):
            return "hf:" + uri[len(HF):]
        if scheme_of(uri) == "file":
            return self._file(file_path(uri))
        stats = store.s3_stats(uri)
        if not stats:
            return MISSING
        if len(stats) == 1 and stats[0][0] == "":
            _, etag, size, version = stats[0]
            return f"etag:{etag}" + (f";version:{version}" if version else "")
        return _tree([(rel, f"etag:{etag}:{size}") for rel, etag, size, _ in stats])

    def _file(self, path) -> str:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return _tree([(p.relative_to(path).as_posix(), self._file(p)) for p in files])
        try:
            st = path.stat()
        except FileNotFoundError:
            return MISSING
        if st.st_size > SMALL_FILE:
            return f"stat:{st.st_size}:{st.st_mtime_ns}"
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = _sha256_file(path)
        return self._hashes[key]


def fingerprint(store: Any, uri: str) -> str:
    """The fingerprint of one input URI (module docstring); MISSING when nothing is there."""
    return Fingerprints().look(store, uri)


def external_inputs(task: Any) -> dict[str, str]:
    """{input name: URI} of a task's inputs the run does not make: not under the folder of a
    stage whose marker the task waits for."""
    made = [as_folder(m) for m in task.markers]
    return {name: uri for name, uri in task.inputs.items()
            if uri and not any(as_folder(uri).startswith(m) or uri.startswith(m) for m in made)}


def short(value: str) -> str:
    """A fingerprint as a message shows it: `sha256:ab12cd34`."""
    kind, _, rest = value.partition(":")
    return f"{kind}:{rest[:8]}" if kind in ("sha256", "tree", "etag") else value
