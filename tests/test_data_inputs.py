"""Stage inputs as users have them (xwin_jobs.datasets_in): Parquet files and folders, a
dataset repo laid out as the Hub lays it out (read offline through XWIN_HF_DATASETS_DIR),
TRL's column names, bad rows and missing columns named; and the stages' own records loading
with `datasets.load_dataset("json")`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from judge_fixtures import (candidate_records, eval_task, judge_server, pairs_task, run_step,  # noqa: F401
                            write_candidates)

from xwin_jobs.datasets_in import from_columns, iter_input_records
from xwin_jobs.fingerprint import fingerprint
from xwin_jobs.records import RecordError, write_records
from xwin_jobs.store import Store, StoreError
from xwin_jobs.store_uri import parse_hf_dataset

USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: prefs
  data_files:
  - split: train
    path: prefs/train-*
---
# a dataset card
"""


def write_parquet(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def hub_repo(root, conversations, pairs):
    """ORG/NAME as the Hub lays out a dataset repo: data/<split>-00000-of-00001.parquet, a
    second config in its own folder, the configs in README.md."""
    repo = root / "org" / "chat"
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", conversations)
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", conversations[:2])
    write_parquet(repo / "prefs" / "train-00000-of-00001.parquet", pairs)
    (repo / "README.md").write_text(README)
    return repo


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("XWIN_HF_DATASETS_DIR", raising=False)
    # huggingface_hub and datasets read these once, at import: a test that imported them first
    # would leave them online, and each call would wait on this machine's absent network
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return monkeypatch


def test_dataset_repo_uris():
    ref = parse_hf_dataset("hf://datasets/org/chat@v1.0/prefs:test")
    assert (ref.repo, ref.revision, ref.config, ref.split) == ("org/chat", "v1.0", "prefs", "test")
    assert parse_hf_dataset("hf://datasets/org/chat").split == "train"
    with pytest.raises(StoreError, match="hf://datasets/ORG/NAME"):
        parse_hf_dataset("hf://datasets/chat")


def test_trl_columns_map_to_records():
    assert from_columns({"messages": [USER, {**ASSISTANT, "tool_calls": None}]}, "conversation", 7) == \
        {"id": "000000007", "messages": [USER, ASSISTANT]}
    assert from_columns({"id": 3, "prompt": "hi", "completion": "hello"}, "conversation", 0) == \
        {"id": 3, "messages": [USER, ASSISTANT]}
    plain = from_columns({"prompt": "hi", "chosen": "hello", "rejected": "go away",
                          "score_chosen": 8.0, "score_rejected": 2.0}, "pair", 1)
    assert plain["prompt"] == [USER] and plain["chosen"] == [ASSISTANT]
    assert plain["rejected"] == [{"role": "assistant", "content": "go away"}]
    assert (plain["chosen_score"], plain["rejected_score"]) == (8.0, 2.0)
    implicit = from_columns({"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "no"}]},
                            "pair", 2)
    assert implicit["prompt"] == [USER] and implicit["chosen"] == [ASSISTANT]
    assert from_columns({"prompt": "hi"}, "prompt", 4)["messages"] == [USER]


def test_parquet_folder_is_read_in_file_order_and_a_bad_row_is_named(tmp_path):
    store = Store()
    good = [{"messages": [USER, ASSISTANT]}] * 3
    write_parquet(tmp_path / "sft" / "part-0.parquet", good)
    write_parquet(tmp_path / "sft" / "part-1.parquet", good[:2])
    records = list(iter_input_records(store, f"file://{tmp_path}/sft/", "conversation"))
    assert [r["id"] for r in records] == [f"{i:09d}" for i in range(5)]  # rows numbered across files
    bad = write_parquet(tmp_path / "bad.parquet", good + [{"messages": [USER, {"role": "robot", "content": "x"}]}])
    with pytest.raises(RecordError, match=r"bad.parquet row 3: field 'messages.1.role': must be one of"):
        list(iter_input_records(store, bad, "conversation"))


def test_a_parquet_file_without_the_needed_column_is_named(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", [{"prompt": "hi", "chosen": "hello", "answer": "x"}])
    with pytest.raises(RecordError, match=r"pairs.parquet: no column 'rejected' \(columns: prompt, chosen, answer\)"):
        list(iter_input_records(Store(), f"file://{path}", "pair"))


def test_a_dataset_repo_is_read_from_its_local_copy(tmp_path, offline):
    conversations = [{"id": f"c{i}", "messages": [USER, ASSISTANT]} for i in range(4)]
    pairs = [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}]
    hub_repo(tmp_path / "hub", conversations, pairs)
    offline.setenv("XWIN_HF_DATASETS_DIR", str(tmp_path / "hub"))
    store = Store()
    assert [r["id"] for r in iter_input_records(store, "hf://datasets/org/chat", "conversation", tmp_path)] == \
        ["c0", "c1", "c2", "c3"]
    assert len(list(iter_input_records(store, "hf://datasets/org/chat:test", "conversation", tmp_path))) == 2
    pair, = iter_input_records(store, "hf://datasets/org/chat/prefs", "pair", tmp_path)
    assert pair["prompt"] == [USER] and pair["chosen"] == [ASSISTANT]
    with pytest.raises(RecordError, match=r"hf://datasets/org/chat/prefs:train: no column 'messages'"):
        list(iter_input_records(store, "hf://datasets/org/chat/prefs", "conversation", tmp_path))
    # the input's fingerprint is the local copy's: edit it and the stage reading it reruns
    before = fingerprint(store, "hf://datasets/org/chat")
    write_parquet(tmp_path / "hub" / "org" / "chat" / "data" / "train-00000-of-00001.parquet", conversations[:1])
    assert fingerprint(store, "hf://datasets/org/chat") != before


def test_a_dataset_repo_the_pod_cannot_reach_is_named(tmp_path, offline):
    with pytest.raises(RecordError, match=r"hf://datasets/org/nowhere:train: cannot load this dataset "
                                          r"from the Hugging Face Hub: ConnectionError"):
        list(iter_input_records(Store(), "hf://datasets/org/nowhere", "conversation", tmp_path))
    offline.setenv("XWIN_HF_DATASETS_DIR", str(tmp_path / "hub"))
    with pytest.raises(RecordError, match=r"org/nowhere:train: no local copy at .*hub/org/nowhere"):
        list(iter_input_records(Store(), "hf://datasets/org/nowhere", "conversation", tmp_path))


def test_judged_pairs_load_with_datasets(judge_server, tmp_path, offline):  # noqa: F811
    """What README shows: a pairs stage's data/ and ties/ read with datasets' JSON loader."""
    import datasets

    task = pairs_task(tmp_path, judge_server.base_url)
    write_candidates(task, candidate_records(12, seed=3))
    assert run_step("pairs-judge", task, tmp_path).returncode == 0
    for folder in ("data", "ties"):
        files = sorted(str(p) for p in (tmp_path / "pairs" / folder).glob("part-*.jsonl"))
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows > 0 and {"prompt", "chosen", "rejected", "judge"} <= set(ds.column_names)
        assert ds[0]["chosen"][0]["role"] == "assistant"


def test_scored_sets_load_with_datasets(tmp_path, offline):
    """bestOfN's data/: prompts with responses, scores null where unscored, gzip shards."""
    import datasets

    scored = [{"id": f"s{i}", "prompt": [USER],
               "responses": [{"content": "a", "finish_reason": "stop", "score": 0.5},
                             {"content": "b", "finish_reason": "length", "score": None}]} for i in range(5)]
    write_records(Store(), f"file://{tmp_path}/bestOfN/data/", scored, kind="scored", max_records=2, gzip=True)
    ds = datasets.load_dataset("json", data_files=f"{tmp_path}/bestOfN/data/part-*.jsonl.gz", split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 5 and [r["score"] for r in ds[0]["responses"]] == [0.5, None]


def test_evaluation_details_load_with_datasets(judge_server, tmp_path, offline):  # noqa: F811
    """evaluate's data/details-*.jsonl: one row per judged item, every model and benchmark."""
    import datasets

    task = eval_task(tmp_path, judge_server.base_url, {"good": 0.9, "bad": 0.1})
    assert run_step("evaluate-judge", task, tmp_path).returncode == 0
    ds = datasets.load_dataset("json", data_files=f"{tmp_path}/evaluate/data/details-*.jsonl", split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert set(ds["model"]) == {"good", "bad"} and {"benchmark", "id"} <= set(ds.column_names)
