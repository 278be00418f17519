"""S3 multipart parts sized from the object (issue 23, item 7): at most 10,000 parts, so an
object past 78 GiB (8 MiB x 10,000; a consolidated 70B checkpoint file) still uploads."""

from __future__ import annotations

import os

import pytest

from xwin_jobs import store_s3
from xwin_jobs.store import Store
from xwin_jobs.store_s3 import MAX_PART, MiB, part_size
from xwin_jobs.store_uri import StoreError

GiB = 1024 * MiB


def test_part_size_keeps_every_object_within_the_part_limit():
    assert part_size(1 * GiB, 8 * MiB) == 8 * MiB                 # small: the store's own size
    assert part_size(78 * GiB, 8 * MiB) == 8 * MiB                # 9,984 parts: still fits
    for size in (80 * GiB, 140 * 10**9, 1024 * GiB, 5 * 1024 * GiB):
        part = part_size(size, 8 * MiB)
        assert part % MiB == 0 and -(-size // part) <= 10_000 and part - MiB < -(-size // 10_000)
    assert part_size(140 * 10**9, 8 * MiB) == 14 * MiB
    assert part_size(0, 1024) == 5 * MiB                          # never below S3's 5 MiB
    with pytest.raises(StoreError, match=r"above S3's largest part"):
        part_size(10_000 * MAX_PART + 1, 8 * MiB)


def test_an_object_needing_more_parts_than_allowed_at_the_old_size_uploads(s3_server, s3_bucket,
                                                                           tmp_path, monkeypatch):
    """The limit lowered to 3 parts: a 26 MiB file would need 4 parts of 8 MiB; it goes up as
    3 parts of 9 MiB (the ETag of a multipart upload ends with its part count)."""
    monkeypatch.setattr(store_s3, "MAX_PARTS", 3)
    local = tmp_path / "shard.bin"
    data = os.urandom(26 * MiB)
    local.write_bytes(data)
    store = Store(s3_server.endpoint_url)
    uri = f"{s3_bucket}/ckpt/shard.bin"
    store.upload_file(local, uri)
    bucket, key = uri[len("s3://"):].split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == 26 * MiB and head["ETag"].strip('"').endswith("-3")
    back = tmp_path / "back.bin"
    store.download_file(uri, back)
    assert back.read_bytes() == data
