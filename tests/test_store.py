"""The artifact store against the local file system and a real S3 endpoint (moto server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3_server import closed_port
from xwin_jobs.store import (
    MARKER,
    MissingInputError,
    Store,
    StoreError,
    check_model_folder,
    join_uri,
    read_marker,
    require_marker,
    write_marker,
)


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> tuple[Store, str]:
    """(store, base folder URI) for each backend; the same behaviour is asserted on both."""
    if request.param == "file":
        return Store(), f"file://{tmp_path}/artifacts/"
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(server.endpoint_url), f"{bucket}/runs/"


# --------------------------------------------------------------------------- pure helpers

def test_join_uri_puts_exactly_one_slash_between_parts():
    assert join_uri("s3://b/runs/", "ns", "name", "sft/") == "s3://b/runs/ns/name/sft/"
    assert join_uri("s3://b", "/k") == "s3://b/k"
    assert join_uri("file:///", "tmp", "x") == "file:///tmp/x"
    assert join_uri("/tmp/x/", "", "a/b.json") == "/tmp/x/a/b.json"
    assert join_uri("s3://b/x") == "s3://b/x"


def test_hf_and_unknown_schemes_are_refused_with_a_clear_error():
    with pytest.raises(StoreError, match="hf://org/m: hf:// names a Hugging Face Hub model"):
        Store().read_bytes("hf://org/m")
    with pytest.raises(StoreError, match="unsupported URI scheme 'gs://'"):
        Store().exists("gs://b/k")


def test_importing_the_store_does_not_import_boto3():
    code = "import sys, xwin_jobs.store; assert 'boto3' not in sys.modules, 'boto3 imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- both backends

def test_bytes_text_and_json_round_trip(root):
    store, base = root
    store.write_bytes(join_uri(base, "a/b/blob.bin"), b"\x00\x01")
    store.write_text(join_uri(base, "note.txt"), "héllo")
    store.write_json(join_uri(base, "m.json"), {"x": [1, 2], "y": None})
    assert store.read_bytes(join_uri(base, "a/b/blob.bin")) == b"\x00\x01"
    assert store.read_text(join_uri(base, "note.txt")) == "héllo"
    assert store.read_json(join_uri(base, "m.json")) == {"x": [1, 2], "y": None}
    assert store.exists(join_uri(base, "note.txt"))
    assert not store.exists(join_uri(base, "nope.txt"))
    assert store.exists(join_uri(base, "a/"))


def test_list_files_is_recursive_sorted_and_returns_full_uris(root):
    store, base = root
    for name in ["z.txt", "a/2.txt", "a/1.txt", "b/c/d.txt"]:
        store.write_text(join_uri(base, "data", name), name)
    store.write_text(join_uri(base, "data-other.txt"), "not under data/")
    assert store.list_files(join_uri(base, "data")) == [
        join_uri(base, "data", n) for n in ["a/1.txt", "a/2.txt", "b/c/d.txt", "z.txt"]]
    assert store.list_files(join_uri(base, "missing/")) == []


def test_reading_a_missing_object_names_the_uri(root):
    store, base = root
    uri = join_uri(base, "missing.json")
    with pytest.raises(StoreError, match=rf"^{uri}: no such (object|file)$"):
        store.read_json(uri)


def test_invalid_json_names_the_uri_and_position(root):
    store, base = root
    uri = join_uri(base, "bad.json")
    store.write_text(uri, '{"a": 1,\n oops}')
    with pytest.raises(StoreError, match=rf"{uri}: invalid JSON at line 2"):
        store.read_json(uri)


def test_dir_upload_and_download_round_trip(root, tmp_path):
    store, base = root
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(os.urandom(1000))
    (src / "sub" / "tok.json").write_text("[]")
    uri = join_uri(base, "sft/model/")
    written = store.upload_dir(src, uri)
    assert written == store.list_files(uri) and len(written) == 3
    check_model_folder(store, uri)
    out = store.download_dir(uri, tmp_path / "copy")
    for rel in ["config.json", "model.safetensors", "sub/tok.json"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    with pytest.raises(StoreError, match="no such folder"):
        store.download_dir(join_uri(base, "nothing/"), tmp_path / "none")


def test_file_upload_download_and_delete_prefix(root, tmp_path):
    store, base = root
    local = tmp_path / "x.bin"
    local.write_bytes(b"payload")
    store.upload_file(local, join_uri(base, "stage/data/x.bin"))
    store.write_text(join_uri(base, "stage/keep.txt"), "keep")
    got = store.download_file(join_uri(base, "stage/data/x.bin"), tmp_path / "d" / "y.bin")
    assert got.read_bytes() == b"payload"
    store.delete_prefix(join_uri(base, "stage/data/"))
    assert store.list_files(join_uri(base, "stage")) == [join_uri(base, "stage/keep.txt")]
    store.delete_prefix(join_uri(base, "stage/data/"))  # already gone: fine


def test_markers_gate_a_stage(root):
    store, base = root
    stage = join_uri(base, "ns/run/sft/")
    assert read_marker(store, stage) is None
    with pytest.raises(MissingInputError) as err:
        require_marker(store, stage)
    assert str(err.value) == (f"input stage {stage} has no _SUCCESS.json: it has not "
                              "finished (or failed)")
    written = write_marker(store, stage, {"stage": "sft", "counts": {"train": 3}})
    assert written["finishedAt"].endswith("Z")
    assert require_marker(store, stage.rstrip("/")) == written
    assert store.exists(join_uri(stage, MARKER))


def test_check_model_folder_names_what_is_missing(root):
    store, base = root
    uri = join_uri(base, "m/")
    with pytest.raises(StoreError, match=rf"{uri}: not a model folder: no files"):
        check_model_folder(store, uri)
    store.write_text(join_uri(uri, "model.safetensors"), "w")
    with pytest.raises(StoreError, match=rf"{uri}: not a Hugging Face model folder: no config"):
        check_model_folder(store, uri)
    store.delete_prefix(uri)
    store.write_text(join_uri(uri, "config.json"), "{}")
    store.write_text(join_uri(uri, "checkpoints/step-1/model.safetensors"), "w")
    with pytest.raises(StoreError, match=rf"{uri}: model folder has no weights"):
        check_model_folder(store, uri)
    store.write_text(join_uri(uri, "pytorch_model-00001-of-00002.bin"), "w")
    check_model_folder(store, uri)


# --------------------------------------------------------------------------- file only

def test_plain_paths_and_relative_file_uris_are_local_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store()
    store.write_text("file://./runs/a.txt", "rel")
    assert (tmp_path / "runs" / "a.txt").read_text() == "rel"
    assert store.read_text(str(tmp_path / "runs" / "a.txt")) == "rel"
    assert store.local_path("file://./runs/a.txt") == Path("./runs/a.txt")
    assert store.local_path("s3://b/k") is None


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    store = Store()
    uri = f"file://{tmp_path}/out/report.json"
    store.write_text(uri, "old")
    with pytest.raises(TypeError):
        store.write_bytes(uri, object())  # fails half-way through the write
    assert (tmp_path / "out" / "report.json").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]
    assert (tmp_path / "out" / "report.json").stat().st_mode & 0o644 == 0o644  # not 0600


def test_writing_below_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="a parent of this path is a file"):
        Store().write_text(f"file://{tmp_path}/f/child.txt", "y")


# --------------------------------------------------------------------------- S3 only

def test_large_uploads_are_multipart_and_round_trip(s3_server, s3_bucket, tmp_path):
    store = Store(s3_server.endpoint_url, multipart_threshold=5 * 2**20,
                  multipart_chunksize=5 * 2**20)
    data = os.urandom(11 * 2**20)
    (tmp_path / "big.bin").write_bytes(data)
    uri = f"{s3_bucket}/model/model.safetensors"
    store.upload_file(tmp_path / "big.bin", uri)
    etag = s3_server.client().head_object(Bucket=s3_bucket[5:], Key="model/model.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # three parts
    assert store.download_file(uri, tmp_path / "back.bin").read_bytes() == data


def test_endpoint_and_credentials_come_from_the_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    store = Store()
    store.write_text(f"{s3_bucket}/k.txt", "via env")
    assert store.read_text(f"{s3_bucket}/k.txt") == "via env"


def test_unreachable_endpoint_is_reported_plainly_and_quickly(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    url = f"http://127.0.0.1:{closed_port()}"
    store = Store(url, max_attempts=1)
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.read_bytes("s3://b/k")
    assert str(err.value) == f"s3://b/k: cannot reach S3 endpoint {url}: connection refused"
    assert time.monotonic() - start < 5
    with pytest.raises(StoreError, match="cannot reach S3 endpoint"):
        store.list_files("s3://b/data/")
    assert "very-secret-value" not in str(err.value)


def test_missing_bucket_is_named(s3_server, tmp_path):
    store = Store(s3_server.endpoint_url)
    with pytest.raises(StoreError, match=r"^s3://no-such-bucket-x/k: no such bucket 'no-such-bucket-x'$"):
        store.read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(StoreError, match="no such bucket"):
        store.exists("s3://no-such-bucket-x/_SUCCESS.json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="no such bucket"):
        store.upload_file(tmp_path / "f", "s3://no-such-bucket-x/f")
    with pytest.raises(StoreError, match="no such bucket"):
        store.list_files("s3://no-such-bucket-x/data/")


def test_missing_object_download_is_named(s3_server, s3_bucket, tmp_path):
    store = Store(s3_server.endpoint_url)
    with pytest.raises(StoreError, match=rf"^{s3_bucket}/m/config.json: no such object$"):
        store.download_file(f"{s3_bucket}/m/config.json", tmp_path / "c.json")


def test_deleting_a_whole_bucket_is_refused(s3_server, s3_bucket):
    with pytest.raises(StoreError, match="refusing to delete a whole bucket"):
        Store(s3_server.endpoint_url).delete_prefix(s3_bucket + "/")
