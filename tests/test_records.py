"""Records: the four kinds, errors naming file/line/field, shards, resume, datasets."""

from __future__ import annotations

import gzip
import json

import pytest

from xwin_jobs.records import (
    RecordError,
    ShardWriter,
    existing_ids,
    iter_records,
    next_shard_index,
    read_records,
    write_records,
)
from xwin_jobs.store import Store, join_uri


def msg(role, content):
    return {"role": role, "content": content}


USER, ASSISTANT, SYSTEM = msg("user", "Hi?"), msg("assistant", "Hello."), msg("system", "Be kind.")

GOOD = {
    "conversation": {"id": "c1", "messages": [SYSTEM, USER, ASSISTANT, USER, ASSISTANT]},
    "prompt": {"id": "p1", "messages": [SYSTEM, USER, ASSISTANT, USER]},
    "pair": {"id": "x1", "prompt": [USER], "chosen": [ASSISTANT], "rejected": [msg("assistant", "No.")],
             "chosen_score": 1.0, "rejected_score": 0.0, "judge": {"model": "gpt-4", "swapped": True}},
    "scored": {"id": "s1", "prompt": [USER],
               "responses": [{"content": "a", "score": 0.5}, {"content": "b", "score": None}]},
}

BAD = [  # kind, record, field, problem
    ("conversation", {"id": "c", "messages": [USER, msg("bot", "x")]},
     "messages.1.role", "must be one of system, user, assistant"),
    ("conversation", {"id": "c", "messages": [USER]}, "messages", "needs at least one assistant message"),
    ("conversation", {"id": "c", "messages": []}, "messages", "must not be empty"),
    ("conversation", {"messages": [USER, ASSISTANT]}, "id", "is required"),
    ("conversation", {"id": "c", "messages": [USER, {"role": "assistant", "content": 7}]},
     "messages.1.content", "must be a string"),
    ("prompt", {"id": "p", "messages": [USER, ASSISTANT]}, "messages",
     "must end with a user message (the last one is assistant)"),
    ("prompt", {"id": "p", "messages": "Hi?"}, "messages", "must be a list"),
    ("pair", {"id": "x", "prompt": [USER], "chosen": [ASSISTANT]}, "rejected", "is required"),
    ("pair", {"id": "x", "prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT],
              "chosen_score": "high"}, "chosen_score", "must be a number or null"),
    ("pair", {"id": "x", "prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]},
     "chosen", "must end with an assistant message (the last one is user)"),
    ("scored", {"id": "s", "prompt": [USER], "responses": [{"score": 1.0}]},
     "responses.0.content", "is required"),
    ("scored", {"id": "s", "prompt": [USER], "responses": []}, "responses", "must not be empty"),
]


def jsonl(*records) -> str:
    return "".join(json.dumps(r, default=str) + "\n" for r in records)


@pytest.fixture
def store():
    return Store()


@pytest.mark.parametrize("kind", list(GOOD))
def test_good_records_of_each_kind_read_back_with_extra_keys_kept(kind, store, tmp_path):
    record = {**GOOD[kind], "meta": {"source": "unit"}}
    uri = f"file://{tmp_path}/{kind}.jsonl"
    store.write_text(uri, jsonl(record, {**record, "id": "second"}))
    store.write_text(uri, jsonl(record, {**record, "id": 2}))
    got = read_records(store, uri, kind)
    assert [r["id"] for r in got] == [record["id"], "2"]
    assert got[0]["meta"] == {"source": "unit"}
    for key, value in GOOD[kind].items():
        assert got[0][key] == value


@pytest.mark.parametrize("kind,record,field,problem", BAD,
                         ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_line_names_file_line_and_field(kind, record, field, problem, store, tmp_path):
    uri = f"file://{tmp_path}/data.jsonl"
    good = GOOD[kind]
    store.write_text(uri, jsonl(good, good) + "\n" + jsonl(good, record))  # bad one on line 5
    with pytest.raises(RecordError) as err:
        read_records(store, uri, kind)
    e = err.value
    assert (e.file, e.line, e.field) == (uri, 5, field)
    assert str(e) == f"{uri}:5: field '{field}': {problem}"


def test_invalid_json_and_non_object_lines(store, tmp_path):
    uri = f"file://{tmp_path}/data.jsonl"
    store.write_text(uri, jsonl(GOOD["prompt"]) + '{"id": "p2", "messages": [\n')
    with pytest.raises(RecordError, match=r"data.jsonl:2: field '<json>': invalid JSON: "):
        read_records(store, uri, "prompt")
    store.write_text(uri, "[1, 2]\n")
    with pytest.raises(RecordError, match=r"data.jsonl:1: field '<record>': must be a JSON object"):
        read_records(store, uri, "prompt")


def test_empty_input_is_an_error_naming_the_uri(store, tmp_path):
    folder = f"file://{tmp_path}/data/"
    with pytest.raises(RecordError, match=rf"^{folder}: no records: no \*.jsonl"):
        read_records(store, folder, "prompt")
    store.write_text(join_uri(folder, "part-00000.jsonl"), "\n\n")
    with pytest.raises(RecordError, match=rf"^{folder}: no records: the input is empty"):
        read_records(store, folder, "prompt")


def test_gzip_shards_in_a_folder_read_in_order(store, tmp_path):
    folder = f"file://{tmp_path}/out/data/"
    records = [{**GOOD["scored"], "id": f"s{i}"} for i in range(5)]
    shards = write_records(store, folder, records, kind="scored", max_records=2, gzip=True)
    assert [s.rsplit("/", 1)[1] for s in shards] == [
        "part-00000.jsonl.gz", "part-00001.jsonl.gz", "part-00002.jsonl.gz"]
    first = gzip.decompress((tmp_path / "out/data/part-00000.jsonl.gz").read_bytes())
    assert [json.loads(x)["id"] for x in first.splitlines()] == ["s0", "s1"]
    store.write_json(join_uri(folder, "_SUCCESS.json"), {})  # not a shard
    store.write_text(join_uri(folder, "notes.txt"), "not a shard")
    assert [r["id"] for r in read_records(store, folder, "scored")] == [f"s{i}" for i in range(5)]


def test_a_shard_appears_only_when_complete(store, tmp_path):
    folder = f"file://{tmp_path}/data/"
    with ShardWriter(store, folder, max_records=3) as writer:
        writer.write(GOOD["prompt"])
        writer.write(GOOD["prompt"])
        assert list((tmp_path).rglob("*.jsonl*")) == []
        writer.write(GOOD["prompt"])
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "part-00000.jsonl"]
        writer.write(GOOD["prompt"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "part-00000.jsonl", "part-00001.jsonl"]
    assert writer.count == 4


def test_a_writer_with_a_kind_refuses_bad_records(store, tmp_path):
    with pytest.raises(RecordError, match=r"part-00000.jsonl:2: field 'messages'"):
        with ShardWriter(store, f"file://{tmp_path}/d/", kind="prompt") as writer:
            writer.write(GOOD["prompt"])
            writer.write({"id": "bad", "messages": [ASSISTANT]})


def test_a_killed_job_resumes_by_skipping_ids_already_written(store, tmp_path):
    folder = f"file://{tmp_path}/data/"
    prompts = [{**GOOD["prompt"], "id": f"p{i}"} for i in range(7)]
    assert existing_ids(store, folder) == set()

    with pytest.raises(RuntimeError):  # the job dies after 5 records
        with ShardWriter(store, folder, max_records=2) as writer:
            for p in prompts[:5]:
                writer.write(p)
            raise RuntimeError("killed")
    done = existing_ids(store, folder)
    assert done == {f"p{i}" for i in range(5)}
    assert next_shard_index(store, folder) == 3

    with ShardWriter(store, folder, max_records=2) as writer:  # numbering continues
        writer.write_all(p for p in prompts if p["id"] not in done)
    assert [s.rsplit("/", 1)[1] for s in writer.shards] == ["part-00003.jsonl"]
    assert sorted(r["id"] for r in read_records(store, folder, "prompt")) == [
        f"p{i}" for i in range(7)]


def test_a_corrupt_gzip_shard_is_named(store, tmp_path):
    uri = f"file://{tmp_path}/part-00000.jsonl.gz"
    store.write_bytes(uri, b"this is not gzip\n")
    with pytest.raises(RecordError, match=rf"{uri}: not a readable gzip file"):
        read_records(store, uri, "prompt")


def test_shards_on_s3_read_back_and_resume(s3_server, s3_bucket):
    store = Store(s3_server.endpoint_url)
    folder = f"{s3_bucket}/runs/ns/r/pairs/data/"
    pairs = [{**GOOD["pair"], "id": f"x{i}"} for i in range(3)]
    write_records(store, folder, pairs[:2], kind="pair", max_records=1, gzip=True)
    assert existing_ids(store, folder) == {"x0", "x1"}
    write_records(store, folder, pairs[2:], kind="pair", gzip=True)
    assert store.list_files(folder)[-1].endswith("part-00002.jsonl.gz")
    assert [r["id"] for r in iter_records(store, folder, "pair")] == ["x0", "x1", "x2"]
    with pytest.raises(Exception, match=r"no such object"):
        read_records(store, f"{s3_bucket}/missing.jsonl", "pair")


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return str(tmp_path / "hf-cache")


def test_shards_load_with_datasets(store, tmp_path, offline_datasets):
    """What a user does with a stage's data/ folder: plain and gzip shards alike."""
    import datasets

    folder = f"file://{tmp_path}/data/"
    convs = [{**GOOD["conversation"], "id": f"c{i}"} for i in range(5)]
    write_records(store, folder, convs[:3], max_records=2)
    write_records(store, folder, convs[3:], gzip=True)  # mixed plain and gzip shards
    ds = datasets.load_dataset("json", data_files=f"{tmp_path}/data/part-*.jsonl*", split="train",
                               cache_dir=offline_datasets)
    assert ds.num_rows == 5
    assert sorted(ds["id"]) == [f"c{i}" for i in range(5)]
    assert ds[ds["id"].index("c0")]["messages"][2] == ASSISTANT
