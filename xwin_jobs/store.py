"""The artifact store: one `Store` that routes every call by URI scheme.

A stage reads from several places at once (data in `s3://data/...`, artifacts in
`s3://xwin-artifacts/...`, a base model at `file://...`), so every method takes a full URI:

- `file:///abs/path`, `file://./relative/path` and plain local paths: the local file system;
  writes are atomic (temporary file in the same folder, then `os.replace`).
- `s3://bucket/key`: S3 or any S3-compatible endpoint (MinIO, moto) through boto3. The
  endpoint comes from the constructor, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`;
  credentials only from boto3's normal chain (environment, shared files, instance role).
  File transfers go through boto3's transfer manager (multipart above a threshold).
  The S3 calls live in xwin_jobs/store_s3.py (`S3Objects`, imported on first s3:// use).
- `hf://` names a Hub model and is the model loader's business, not the store's.

Every failure is a `StoreError` whose message names the URI and the cause in plain words.
Credentials never appear in messages or logs.

A stage's `_SUCCESS.json` marker is written last (`write_marker`); consumers call
`require_marker` before reading anything of a stage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .store_uri import (MissingInputError, StoreError, as_folder, file_path, join_uri,  # noqa: F401  (re-exported)
                        redact_endpoint, scheme_of)

MARKER = "_SUCCESS.json"
MiB = 1024 * 1024

# ----------------------------------------------------------------------------- the store

class Store:
    """Reads and writes artifacts by URI; see the module docstring."""

    def __init__(self, endpoint_url: str | None = None, *,
                 multipart_threshold: int = 8 * MiB, multipart_chunksize: int = 8 * MiB,
                 max_concurrency: int = 8, max_attempts: int | None = None,
                 connect_timeout: float = 10.0, credentials: Any = None):
        """`credentials`: a store_s3.S3Credentials for s3:// (default: boto3's own chain)."""
        self.credentials = credentials
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self._s3_objects = None

    def __repr__(self) -> str:
        return f"Store(endpoint_url={redact_endpoint(self.endpoint_url)!r})"

    # -- S3 (xwin_jobs/store_s3.py does every s3:// call; boto3 is imported on first use)
    @property
    def _s3(self):
        """The `S3Objects` behind every s3:// call, built on first use from the settings."""
        if self._s3_objects is None:
            from .store_s3 import S3Objects

            self._s3_objects = S3Objects(
                self.endpoint_url, multipart_threshold=self.multipart_threshold,
                multipart_chunksize=self.multipart_chunksize,
                max_concurrency=self.max_concurrency, max_attempts=self.max_attempts,
                connect_timeout=self.connect_timeout, credentials=self.credentials)
        return self._s3_objects

    @property
    def s3(self):
        """The boto3 S3 client, built on first use."""
        return self._s3.client

    # -- queries
    def local_path(self, uri: str) -> Path | None:
        """The local path behind a file URI (so callers can skip copies); None for s3://."""
        return file_path(uri) if scheme_of(uri) == "file" else None

    def exists(self, uri: str) -> bool:
        """Whether an object (or, for a URI ending in '/', any object under it) exists."""
        if scheme_of(uri) == "file":
            return file_path(uri).exists()
        return self._s3.exists(uri)

    def list_files(self, prefix_uri: str) -> list[str]:
        """Every file under a folder URI, recursively, as sorted full URIs (same scheme as
        given). A folder that does not exist lists as empty."""
        if scheme_of(prefix_uri) == "file":
            root = file_path(prefix_uri)
            if not root.is_dir():
                return []
            rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            return [join_uri(prefix_uri, r) for r in rels]
        return self._s3.list_files(prefix_uri)

    # -- bytes, text, JSON
    def read_bytes(self, uri: str) -> bytes:
        if scheme_of(uri) == "file":
            path = file_path(uri)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise StoreError(f"{uri}: no such file") from None
            except IsADirectoryError:
                raise StoreError(f"{uri}: is a folder, not a file") from None
            except PermissionError:
                raise StoreError(f"{uri}: permission denied") from None
        return self._s3.read_bytes(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        if scheme_of(uri) == "file":
            _atomic_write(file_path(uri), data, uri)
            return
        self._s3.write_bytes(uri, data)

    def read_text(self, uri: str) -> str:
        data = self.read_bytes(uri)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StoreError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_json(self, uri: str) -> Any:
        text = self.read_text(uri)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{uri}: invalid JSON at line {e.lineno} column {e.colno}: "
                             f"{e.msg}") from None

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    # -- files and folders
    def upload_file(self, local: str | Path, uri: str) -> None:
        """Copy a local file to `uri` (multipart on S3 above the threshold)."""
        local = Path(local)
        if not local.is_file():
            raise StoreError(f"{local}: no such local file to upload to {uri}")
        if scheme_of(uri) == "file":
            dest = file_path(uri)
            if dest.exists() and dest.resolve() == local.resolve():
                return
            _atomic_copy(local, dest, uri)
            return
        self._s3.upload_file(local, uri)

    def download_file(self, uri: str, local: str | Path) -> Path:
        """Copy `uri` to a local file (parents created); returns the local path."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        if scheme_of(uri) == "file":
            src = file_path(uri)
            if not src.is_file():
                raise StoreError(f"{uri}: no such file" if not src.exists()
                                 else f"{uri}: is a folder, not a file")
            if not (local.exists() and local.resolve() == src.resolve()):
                _atomic_copy(src, local, str(local))
            return local
        self._s3.download_file(uri, local)
        return local

    def upload_dir(self, local_dir: str | Path, uri: str) -> list[str]:
        """Copy every file under `local_dir` to the folder `uri`; returns the URIs written."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"{local_dir}: no such local folder to upload to {uri}")
        dest = self.local_path(uri)
        if dest is not None and dest.exists() and dest.resolve() == local_dir.resolve():
            return self.list_files(uri)
        written = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            target = join_uri(uri, path.relative_to(local_dir).as_posix())
            self.upload_file(path, target)
            written.append(target)
        return written

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Copy every file under the folder `uri` into `local_dir`; returns `local_dir`.
        An empty or missing folder is an error."""
        local_dir = Path(local_dir)
        src = self.local_path(uri)
        if src is not None and local_dir.exists() and src.exists() and \
                src.resolve() == local_dir.resolve():
            return local_dir
        files = self.list_files(uri)
        if not files:
            raise StoreError(f"{uri}: no such folder (no files under it)")
        base = as_folder(uri)
        for f in files:
            self.download_file(f, local_dir / f[len(base):])
        return local_dir

    def s3_stats(self, uri: str) -> list[tuple[str, str, int, str]]:
        """For an s3:// URI: (path under it, ETag, size, VersionId) of the object it names, or
        of every object under it as a folder ([] when none): what fingerprints read."""
        return self._s3.stats(uri)

    def delete_prefix(self, uri: str) -> None:
        """Delete a file or everything under a folder URI. Missing is fine."""
        if scheme_of(uri) == "file":
            path = file_path(uri)
            if path.resolve() == Path(path.resolve().anchor):
                raise StoreError(f"{uri}: refusing to delete a file-system root")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            return
        self._s3.delete_prefix(uri)


# ----------------------------------------------------------------------------- local helpers

def _atomic_write(path: Path, data: bytes, uri: str) -> None:
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic_replace(path, uri, fill)


def _atomic_copy(src: Path, dest: Path, uri: str) -> None:
    _atomic_replace(dest, uri, lambda tmp: shutil.copyfile(src, tmp))


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _atomic_replace(path: Path, uri: str, fill) -> None:
    """Create `path` whole or not at all: `fill` a temporary file beside it, then rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fill(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except IsADirectoryError:
        raise StoreError(f"{uri}: is a folder, not a file") from None
    except (NotADirectoryError, FileExistsError):
        raise StoreError(f"{uri}: a parent of this path is a file, not a folder") from None
    except PermissionError:
        raise StoreError(f"{uri}: permission denied") from None
    except OSError as e:
        raise StoreError(f"{uri}: cannot write: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- markers

def marker_uri(stage_uri: str) -> str:
    return join_uri(as_folder(stage_uri), MARKER)


def read_marker(store: Store, stage_uri: str) -> dict | None:
    """The stage's `_SUCCESS.json`, or None when the stage has not finished."""
    uri = marker_uri(stage_uri)
    if not store.exists(uri):
        return None
    payload = store.read_json(uri)
    if not isinstance(payload, dict):
        raise StoreError(f"{uri}: a marker must hold a JSON object")
    return payload


def write_marker(store: Store, stage_uri: str, payload: dict) -> dict:
    """Write the stage's `_SUCCESS.json` (always a stage's last write); adds `finishedAt`.
    Returns what was written."""
    body = dict(payload)
    body["finishedAt"] = datetime.now(timezone.utc).isoformat(timespec="seconds") \
        .replace("+00:00", "Z")
    store.write_json(marker_uri(stage_uri), body)
    return body


def require_marker(store: Store, stage_uri: str) -> dict:
    """The marker of an input stage; MissingInputError when it has none."""
    payload = read_marker(store, stage_uri)
    if payload is None:
        raise MissingInputError(f"input stage {as_folder(stage_uri)} has no {MARKER}: it has "
                                "not finished (or failed)")
    return payload


# ----------------------------------------------------------------------------- model folders

def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or (name.startswith("pytorch_model")
                                             and name.endswith(".bin"))


def check_model_folder(store: Store, uri: str) -> list[str]:
    """Raise StoreError unless `uri` is a Hugging Face model folder (a config.json and
    weights: *.safetensors or pytorch_model*.bin at its top level). Returns its file URIs."""
    folder = as_folder(uri)
    files = store.list_files(uri)
    top = {f[len(folder):] for f in files if "/" not in f[len(folder):]}
    if not files:
        raise StoreError(f"{folder}: not a model folder: no files there (does it exist?)")
    if "config.json" not in top:
        raise StoreError(f"{folder}: not a Hugging Face model folder: no config.json")
    if not any(_is_weights(name) for name in top):
        raise StoreError(f"{folder}: model folder has no weights (*.safetensors or "
                         "pytorch_model*.bin)")
    return files
