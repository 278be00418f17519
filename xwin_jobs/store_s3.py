"""The S3 side of the artifact store: `S3Objects` does every `s3://` call for `Store`.

`Store` (xwin_jobs/store.py) routes each call by URI scheme and hands `s3://` URIs here.
This module holds what only S3 needs: building the boto3 client (endpoint, timeouts,
retries, path-style addressing for S3-compatible servers), the transfer manager settings
(multipart above a threshold), the S3 calls themselves, and turning botocore/boto3
exceptions into a `StoreError` in plain words that never shows credentials.

boto3 and botocore are imported inside the functions that use them, so importing this
module (or `xwin_jobs.store`) does not import boto3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store_uri import StoreError, as_folder, join_uri, redact_endpoint, split_s3

MiB = 1024 * 1024


@dataclass(frozen=True)
class S3Credentials:
    """An access key for S3 given explicitly (the operator's, from a run's Secret) instead of
    boto3's default chain (the environment, a pod's service account). Never shown: its repr
    names only the key id's last four characters."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"S3Credentials(access_key_id='...{self.access_key_id[-4:]}')"

    def session_kwargs(self) -> dict[str, str | None]:
        return {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key,
                "aws_session_token": self.session_token}


# S3's multipart limits: at most 10,000 parts, each 5 MiB to 5 GiB (the last may be smaller).
MAX_PARTS = 10_000
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB


def part_size(object_size: int, preferred: int, max_parts: int | None = None) -> int:
    """The multipart part size for an object of `object_size` bytes: `preferred` (the store's
    chunk size) unless that would need more than `max_parts` (S3's 10,000) parts, then the
    smallest whole number of MiB that fits it in `max_parts`. A 8 MiB part caps an object at
    78 GiB; a 140 GB consolidated 70B checkpoint file gets 14 MiB parts. Pure."""
    max_parts = MAX_PARTS if max_parts is None else max_parts
    need = -(-max(0, int(object_size)) // max_parts)
    size = max(int(preferred), MIN_PART, -(-need // MiB) * MiB)
    if size > MAX_PART:
        raise StoreError(f"an object of {object_size} bytes needs parts of {size} bytes to fit in "
                         f"{max_parts} parts, above S3's largest part ({MAX_PART} bytes)")
    return size


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


class S3Objects:
    """Objects in S3 or an S3-compatible endpoint, addressed by full `s3://` URIs."""

    def __init__(self, endpoint_url: str | None, *, multipart_threshold: int,
                 multipart_chunksize: int, max_concurrency: int, max_attempts: int | None,
                 connect_timeout: float, credentials: S3Credentials | None = None):
        self.endpoint_url, self.credentials = endpoint_url, credentials
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self._client = None
        self._buckets_seen: set[str] = set()

    # -- plumbing
    @property
    def client(self):
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
            session = boto3.session.Session(**(self.credentials.session_kwargs() if self.credentials else {}))
            self._client = session.client(
                "s3", endpoint_url=self.endpoint_url, config=Config(**options))
        return self._client

    def transfer_config(self, object_size: int = 0):
        """boto3's transfer settings; parts sized for an object of `object_size` bytes
        (`part_size`: at most MAX_PARTS of them)."""
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=part_size(object_size, self.multipart_chunksize),
                              max_concurrency=self.max_concurrency)

    def error(self, uri: str, exc: BaseException) -> StoreError:
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
                if bucket != "?" and not self.bucket_exists(bucket):
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

    def bucket_exists(self, bucket: str) -> bool:
        if bucket in self._buckets_seen:
            return True
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                return False
            return True  # 403 etc.: it exists, we may just not list it
        except Exception:
            return True  # let the original error speak
        self._buckets_seen.add(bucket)
        return True

    def call(self, uri: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, with any boto3/botocore failure raised as a StoreError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self.error(uri, e) from None

    # -- the calls `Store` routes here (same contracts as the `Store` methods)
    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        if key == "" or key.endswith("/"):
            resp = self.call(uri, self.client.list_objects_v2, Bucket=bucket, Prefix=key,
                             MaxKeys=1)
            return resp.get("KeyCount", 0) > 0
        from botocore.exceptions import ClientError

        try:
            self.call(uri, self.client.head_object, Bucket=bucket, Key=key)
        except StoreError as e:
            if isinstance(e.__context__, ClientError) and str(e).endswith("no such object"):
                return False
            raise
        return True

    def list_files(self, prefix_uri: str) -> list[str]:
        bucket, key = split_s3(prefix_uri)
        prefix = as_folder(key) if key else ""
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")

        def collect():
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out.append(obj["Key"][len(prefix):])

        self.call(prefix_uri, collect)
        return [join_uri(prefix_uri, r) for r in sorted(out)]

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: is a folder, not a file")
        return self.call(uri, lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: cannot write an object with a folder URI")
        self.call(uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)

    def upload_file(self, local: Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: cannot upload a file to a folder URI; name the object")
        size = Path(local).stat().st_size
        self.call(uri, self.client.upload_file, str(local), bucket, key,
                  Config=self.transfer_config(size))

    def download_file(self, uri: str, local: Path) -> None:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StoreError(f"{uri}: is a folder, not a file")
        self.call(uri, self.client.download_file, bucket, key, str(local),
                  Config=self.transfer_config())

    def delete_prefix(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        if not key.strip("/"):
            raise StoreError(f"{uri}: refusing to delete a whole bucket")
        keys = [f[len(f"s3://{bucket}/"):] for f in self.list_files(uri)]
        if not key.endswith("/"):
            keys.append(key)  # the object itself, if the URI names one
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self.call(uri, self.client.delete_objects, Bucket=bucket,
                      Delete={"Objects": batch, "Quiet": True})

    def stats(self, uri: str) -> list[tuple[str, str, int, str]]:
        """(path under `uri`, ETag, size, VersionId or "") of the object `uri` names (path ""),
        else of every object under it as a folder; [] when there is none. For fingerprints."""
        bucket, key = split_s3(uri)
        if key and not key.endswith("/"):
            from botocore.exceptions import ClientError

            try:
                head = self.call(uri, self.client.head_object, Bucket=bucket, Key=key)
                return [("", str(head.get("ETag", "")).strip('"'), int(head.get("ContentLength", 0)),
                         str(head.get("VersionId") or ""))]
            except StoreError as e:
                if not (isinstance(e.__context__, ClientError) and str(e).endswith("no such object")):
                    raise
        prefix = as_folder(key) if key else ""
        out: list[tuple[str, str, int, str]] = []
        paginator = self.client.get_paginator("list_objects_v2")

        def collect():
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out.append((obj["Key"][len(prefix):], str(obj.get("ETag", "")).strip('"'),
                                    int(obj.get("Size", 0)), ""))

        self.call(uri, collect)
        return sorted(out)
