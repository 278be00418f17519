"""URIs of the artifact store and its errors, pure: scheme, bucket/key, local path, joining,
redacted endpoints (xwin_jobs.store and xwin_jobs.store_s3 both read them); and the
`hf://datasets/ORG/NAME[@revision][/config][:split]` references of dataset repos
(read by xwin_jobs.datasets_in, fingerprinted by xwin_jobs.fingerprint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class StoreError(Exception):
    """A store operation failed; the message names the URI and the cause."""


class MissingInputError(StoreError):
    """An input stage has no `_SUCCESS.json`: it has not finished (or it failed)."""


HF_DATASETS = "hf://datasets/"
MIRROR_ENV = "XWIN_HF_DATASETS_DIR"


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
        raise StoreError(f"{uri}: hf:// names a Hugging Face Hub model or dataset repo; it is "
                         "loaded by the model loader or `datasets`, not read through the "
                         "artifact store")
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


# ----------------------------------------------------------------------------- dataset repos (pure)

@dataclass(frozen=True)
class HfDataset:
    repo: str             # ORG/NAME
    revision: str | None  # a branch, tag or commit; None: the default branch
    config: str | None    # None: the repo's default config
    split: str            # train unless named

    def where(self) -> str:
        """The URI as messages name it."""
        return (HF_DATASETS + self.repo + (f"@{self.revision}" if self.revision else "")
                + (f"/{self.config}" if self.config else "") + f":{self.split}")


def parse_hf_dataset(uri: str) -> HfDataset:
    """`hf://datasets/ORG/NAME[@revision][/config][:split]` -> HfDataset (StoreError if not)."""
    rest = uri[len(HF_DATASETS):].strip("/") if uri.startswith(HF_DATASETS) else ""
    path, _, split = rest.partition(":")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise StoreError(f"{uri}: a dataset repo URI is "
                         "hf://datasets/ORG/NAME[@revision][/config][:split]")
    name, _, revision = parts[1].partition("@")
    return HfDataset(f"{parts[0]}/{name}", revision or None,
                     parts[2] if len(parts) == 3 else None, split or "train")


def is_hf_dataset(uri: str) -> bool:
    return str(uri).startswith(HF_DATASETS)


def mirror_folder(uri: str, env: dict[str, str] | None = None) -> Path | None:
    """The local copy of the repo of an hf://datasets URI under XWIN_HF_DATASETS_DIR, or None
    (no mirror configured: the Hub)."""
    env = os.environ if env is None else env
    root = env.get(MIRROR_ENV)
    return Path(root) / parse_hf_dataset(uri).repo if root else None
