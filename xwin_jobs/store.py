"""The artifact store: one `Store` that routes every call by URI scheme.

A stage reads from several places at once (data in `s3://data/...`, artifacts in
`s3://xwin-artifacts/...`, a base model at `file://...`), so every method takes a full URI:

- `file:///abs/path`, `file://./relative/path` and plain local paths: the local file system;
  writes are atomic (temporary file in the same folder, then `os.replace`).
- `s3://bucket/key`: S3 or any S3-compatible endpoint (MinIO, moto) through boto3. The
  endpoint comes from the constructor, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`;
  credentials only from boto3's normal chain (environment, shared files, instance role).
  File transfers go through boto3's transfer manager (multipart above a threshold).
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
from urllib.parse import urlsplit, urlunsplit

MARKER = "_SUCCESS.json"
MiB = 1024 * 1024


class StoreError(Exception):
    """A store operation failed; the message names the URI and the cause."""


class MissingInputError(StoreError):
    """An input stage has no `_SUCCESS.json`: it has not finished (or it failed)."""


# ----------------------------------------------------------------------------- URIs (pure)

def scheme_of(uri: str) -> str:
    """`s3`, `file` (also for plain paths) or `hf`; anything else is a StoreError."""
    uri = str(uri)
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("s3", "file"):
        return scheme
    if scheme == "hf":
        raise StoreError(f"{uri}: hf:// names a Hugging Face Hub model; it is loaded by the "
                         "model loader, not read through the artifact store")
    raise StoreError(f"{uri}: unsupported URI scheme '{scheme}://' (use s3://, file:// "
                     "or a local path)")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> (`bucket`, `some/key`)."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StoreError(f"{uri}: an s3:// URI needs a bucket name (s3://bucket/key)")
    return bucket, key


def file_path(uri: str) -> Path:
    """The local path of a `file://` URI or a plain path (`file://./x` is relative)."""
    uri = str(uri)
    path = uri[len("file://"):] if uri.lower().startswith("file://") else uri
    if not path:
        raise StoreError(f"{uri}: empty path")
    return Path(path)


def join_uri(base: str, *parts: str) -> str:
    """Join URI parts with exactly one slash between them.

    `join_uri("s3://b/runs/", "ns", "name", "sft/")` -> `s3://b/runs/ns/name/sft/`. A trailing
    slash on the last non-empty part is kept (it marks a folder); empty parts are skipped.
    """
    out = str(base)
    trailing = None
    for part in parts:
        part = str(part)
        piece = part.strip("/")
        if not piece:
            continue
        out = out + piece if (out == "" or out.endswith("/")) else out + "/" + piece
        trailing = part.endswith("/")
    return out + "/" if trailing else out


def as_folder(uri: str) -> str:
    """The URI with exactly one trailing slash."""
    return str(uri).rstrip("/") + "/"


def redact_endpoint(url: str | None) -> str:
    """The endpoint URL without any user:password part, for messages."""
    if not url:
        return "the default AWS S3 endpoint"
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _plain_cause(exc: BaseException | None) -> str:
    """A network failure in a few plain words."""
    text = str(exc or "").lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or \
            "temporary failure in name resolution" in text or "getaddrinfo" in text:
        return "host name not found"
    if "timed out" in text or "timeout" in text:
        return "connection timed out"
    if "ssl" in text or "certificate" in text:
        return f"TLS error ({exc})"
    return str(exc) or type(exc).__name__


# ----------------------------------------------------------------------------- the store

class Store:
    """Reads and writes artifacts by URI; see the module docstring."""

    def __init__(self, endpoint_url: str | None = None, *,
                 multipart_threshold: int = 8 * MiB, multipart_chunksize: int = 8 * MiB,
                 max_concurrency: int = 8, max_attempts: int | None = None,
                 connect_timeout: float = 10.0):
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self._client = None
        self._buckets_seen: set[str] = set()

    def __repr__(self) -> str:
        return f"Store(endpoint_url={redact_endpoint(self.endpoint_url)!r})"

    # -- S3 plumbing
    @property
    def s3(self):
        """The boto3 S3 client, built on first use."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            options: dict[str, Any] = {"connect_timeout": self.connect_timeout,
                                       "read_timeout": 120}
            if self.max_attempts is not None:
                options["retries"] = {"max_attempts": self.max_attempts, "mode": "standard"}
            if self.endpoint_url:
                # S3-compatible servers (MinIO, moto) want path-style URLs and may not know
                # the newer default checksums.
                options["s3"] = {"addressing_style": "path"}
                options["request_checksum_calculation"] = "when_required"
                options["response_checksum_validation"] = "when_required"
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, config=Config(**options))
        return self._client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize,
                              max_concurrency=self.max_concurrency)

    def _s3_error(self, uri: str, exc: BaseException) -> StoreError:
        """Turn a botocore/boto3 exception into a StoreError in plain words."""
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bx

        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            exc = exc.__context__
        if isinstance(exc, bx.NoCredentialsError):
            return StoreError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                            bx.ReadTimeoutError, bx.ConnectionClosedError)):
            inner = getattr(exc, "kwargs", {}).get("error", exc)
            return StoreError(f"{uri}: cannot reach S3 endpoint "
                              f"{redact_endpoint(self.endpoint_url)}: {_plain_cause(inner)}")
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            bucket = split_s3(uri)[0] if uri.startswith("s3://") else "?"
            if code == "NoSuchBucket":
                return StoreError(f"{uri}: no such bucket '{bucket}'")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                if bucket != "?" and not self._bucket_exists(bucket):
                    return StoreError(f"{uri}: no such bucket '{bucket}'")
                return StoreError(f"{uri}: no such object")
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
                return StoreError(f"{uri}: access denied (check the S3 credentials and the "
                                  "bucket policy)")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                        "ExpiredToken"):
                return StoreError(f"{uri}: S3 refused the credentials ({code})")
            message = err.get("Message") or str(exc)
            return StoreError(f"{uri}: S3 error {code or status}: {message}")
        if isinstance(exc, bx.BotoCoreError):
            return StoreError(f"{uri}: S3 error: {exc}")
        return StoreError(f"{uri}: {exc}")

    def _bucket_exists(self, bucket: str) -> bool:
        if bucket in self._buckets_seen:
            return True
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                return False
            return True  # 403 etc.: it exists, we may just not list it
        except Exception:
            return True  # let the original error speak
        self._buckets_seen.add(bucket)
        return True

    def _call(self, uri: str, fn, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._s3_error(uri, e) from None

    # -- queries
    def local_path(self, uri: str) -> Path | None:
        """The local path behind a file URI (so callers can skip copies); None for s3://."""
        return file_path(uri) if scheme_of(uri) == "file" else None

    def exists(self, uri: str) -> bool:
        """Whether an object (or, for a URI ending in '/', any object under it) exists."""
        if scheme_of(uri) == "file":
            return file_path(uri).exists()
        bucket, key = split_s3(uri)
        if key == "" or key.endswith("/"):
            resp = self._call(uri, self.s3.list_objects_v2, Bucket=bucket, Prefix=key, MaxKeys=1)
            return resp.get("KeyCount", 0) > 0
        from botocore.exceptions import ClientError

        try:
            self._call(uri, self.s3.head_object, Bucket=bucket, Key=key)
        except StoreError as e:
            if isinstance(e.__context__, ClientError) and str(e).endswith("no such object"):
                return False
            raise
        return True

    def list_files(self, prefix_uri: str) -> list[str]:
        """Every file under a folder URI, recursively, as sorted full URIs (same scheme as
        given). A folder that does not exist lists as empty."""
        if scheme_of(prefix_uri) == "file":
            root = file_path(prefix_uri)
            if not root.is_dir():
                return []
            rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            return [join_uri(prefix_uri, r) for r in rels]
        bucket, key = split_s3(prefix_uri)
        prefix = as_folder(key) if key else ""
        out: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")

        def collect():
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out.append(obj["Key"][len(prefix):])

        self._call(prefix_uri, collect)
        return [join_uri(prefix_uri, r) for r in sorted(out)]

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
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: is a folder, not a file")
        return self._call(uri, lambda: self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    def write_bytes(self, uri: str, data: bytes) -> None:
        if scheme_of(uri) == "file":
            _atomic_write(file_path(uri), data, uri)
            return
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: cannot write an object with a folder URI")
        self._call(uri, self.s3.put_object, Bucket=bucket, Key=key, Body=data)

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
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: cannot upload a file to a folder URI; name the object")
        self._call(uri, self.s3.upload_file, str(local), bucket, key,
                   Config=self._transfer_config())

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
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: is a folder, not a file")
        self._call(uri, self.s3.download_file, bucket, key, str(local),
                   Config=self._transfer_config())
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
        bucket, key = split_s3(uri)
        if not key.strip("/"):
            raise StoreError(f"{uri}: refusing to delete a whole bucket")
        keys = [f[len(f"s3://{bucket}/"):] for f in self.list_files(uri)]
        if not key.endswith("/"):
            keys.append(key)  # the object itself, if the URI names one
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self._call(uri, self.s3.delete_objects, Bucket=bucket,
                       Delete={"Objects": batch, "Quiet": True})


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
