"""URIs of the artifact store and its errors, pure: scheme, bucket/key, local path, joining,
redacted endpoints (xwin_jobs.store and xwin_jobs.store_s3 both read them).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


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
