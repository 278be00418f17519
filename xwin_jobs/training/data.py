"""Records -> token examples, and the order optimizer steps visit them in.

Encoding is pure (tokenizer passed in). The training stages batch through batching.py /
packing.py (the plain right-padded layout the tests compare those against is
tests/reference.py: collate_sft, collate_pairs).

The stages tokenize with `datasets` (xwin_jobs.tokenized): `encode_rows` is the body of
its `map`, and `TokenRows` reads the memory-mapped result back as the same SftExample /
PairExample objects, one on demand, with the lengths and loss units the planner needs read
as whole columns (`workload`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..chat import IGNORE_INDEX, ChatFormatError, encode_conversation
from .batching import Workload


class ExampleError(ValueError):
    """A record that cannot be turned into a training example; names the record."""


@dataclass(frozen=True)
class SftExample:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PairExample:
    chosen: SftExample
    rejected: SftExample


@dataclass
class EncodeStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: int = 0  # nothing left to learn from (no assistant tokens after truncation)
    labelled_tokens: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def as_counts(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}records": self.records, f"{prefix}examples": self.examples,
                f"{prefix}truncated": self.truncated, f"{prefix}skipped": self.skipped}


def _record_id(record: dict[str, Any], index: int) -> str:
    return str(record.get("id", f"#{index}"))


def by_id(records: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(id, record) sorted by id (stable for equal ids): what a stage trains on does not depend
    on the order its records were written in (a judge or sampler writes them as requests finish,
    so the same records come in another order on every run), so the seeded shuffle of
    `batch_plan` and `split_held_out` gives the same batches for the same records."""
    return sorted(((_record_id(r, i), r) for i, r in enumerate(records)), key=lambda pair: pair[0])


def _encode(messages, template, tokenizer, max_length, label_from, rid) -> Any:
    try:
        return encode_conversation(messages, template, tokenizer, max_length, label_from)
    except ChatFormatError as e:
        raise ExampleError(f"record {rid}: {e}") from None


def encode_conversations(records: Iterable[dict[str, Any]], template: str, tokenizer: Any,
                         max_length: int) -> tuple[list[SftExample], EncodeStats]:
    """Conversation records ({id, messages}) -> SFT examples (labels on assistant turns), in
    id order (`by_id`)."""
    examples, stats = [], EncodeStats()
    for rid, rec in by_id(records):
        stats.records += 1
        enc = _encode(rec["messages"], template, tokenizer, max_length, 0, rid)
        stats.truncated += enc.truncated
        if enc.num_labelled == 0:
            stats.skipped += 1
            stats.skipped_ids.append(rid)
            continue
        stats.labelled_tokens += enc.num_labelled
        examples.append(SftExample(enc.input_ids, enc.labels))
    stats.examples = len(examples)
    return examples, stats


def encode_pairs(records: Iterable[dict[str, Any]], template: str, tokenizer: Any,
                 max_length: int) -> tuple[list[PairExample], EncodeStats]:
    """Pair records ({id, prompt, chosen, rejected}) -> prompt+chosen / prompt+rejected
    examples, labelled on the response messages only, in id order (`by_id`)."""
    examples, stats = [], EncodeStats()
    for rid, rec in by_id(records):
        stats.records += 1
        prompt = list(rec["prompt"])
        sides = [_encode(prompt + list(rec[side]), template, tokenizer, max_length, len(prompt), rid)
                 for side in ("chosen", "rejected")]
        stats.truncated += any(s.truncated for s in sides)
        if any(s.num_labelled == 0 for s in sides):
            stats.skipped += 1
            stats.skipped_ids.append(rid)
            continue
        stats.labelled_tokens += sum(s.num_labelled for s in sides)
        examples.append(PairExample(*(SftExample(s.input_ids, s.labels) for s in sides)))
    stats.examples = len(examples)
    return examples, stats


# ----------------------------------------------------------------------------- Arrow rows

KINDS = ("sft", "pairs")  # token layouts: one sequence per example, or chosen + rejected
SIDES = ("chosen", "rejected")


def targets_of(labels: Sequence[int]) -> int:
    """Positions whose next token is learned: the per-token loss weight of a sequence."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def encode_rows(batch: dict[str, list], kind: str, template: str, tokenizer: Any,
                max_length: int) -> dict[str, list]:
    """The body of `datasets.map(batched=True)`: record columns (`id`, `messages`; or `id`,
    `prompt`, `chosen`, `rejected`) -> token columns, one row per record. `keep` is False
    for a record with nothing left to learn from within max_length (EncodeStats.skipped)."""
    out: dict[str, list] = {"id": [], "keep": [], "truncated": [], "labelled": []}
    for i, rid in enumerate(batch["id"]):
        if kind == "sft":
            encoded = {"": _encode(batch["messages"][i], template, tokenizer, max_length, 0, rid)}
        else:
            prompt = list(batch["prompt"][i])
            encoded = {f"{side}_": _encode(prompt + list(batch[side][i]), template, tokenizer,
                                           max_length, len(prompt), rid) for side in SIDES}
        out["id"].append(rid)
        out["keep"].append(all(e.num_labelled for e in encoded.values()))
        out["truncated"].append(any(e.truncated for e in encoded.values()))
        out["labelled"].append(sum(e.num_labelled for e in encoded.values()))
        for prefix, e in encoded.items():
            for name, value in (("input_ids", e.input_ids), ("labels", e.labels),
                                ("length", len(e.input_ids)), ("targets", targets_of(e.labels))):
                out.setdefault(prefix + name, []).append(value)
    return out


def token_features(kind: str):
    """The Arrow schema of `encode_rows`' output (int32 tokens)."""
    from datasets import Features, Sequence as ArrowList, Value

    columns = {"id": Value("string"), "keep": Value("bool"), "truncated": Value("bool"),
               "labelled": Value("int64")}
    for prefix in ([""] if kind == "sft" else [f"{side}_" for side in SIDES]):
        columns.update({prefix + "input_ids": ArrowList(Value("int32")),
                        prefix + "labels": ArrowList(Value("int32")),
                        prefix + "length": Value("int32"), prefix + "targets": Value("int32")})
    return Features(columns)


class TokenRows(Sequence):
    """The examples of a tokenized `datasets.Dataset` (memory-mapped), read on demand:
    `rows[i]` is an SftExample (kind `sft`) or a PairExample (`pairs`)."""

    def __init__(self, dataset: Any, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown token layout {kind!r}")
        self.dataset, self.kind = dataset, kind

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):  # type: ignore[override]
        row = self.dataset[int(index)]
        if self.kind == "sft":
            return SftExample(row["input_ids"], row["labels"])
        return PairExample(*(SftExample(row[f"{s}_input_ids"], row[f"{s}_labels"]) for s in SIDES))

    def select(self, indices: Sequence[int]) -> "TokenRows":
        """These examples, in this order (no copy: an index over the same files)."""
        return TokenRows(self.dataset.select(list(indices)), self.kind)

    def column(self, name: str) -> list:
        return self.dataset.with_format("arrow")[:].column(name).to_pylist() if len(self) else []

    def workload(self, packed: bool = False) -> Workload:
        """What planning needs (batching.Workload), read as columns: no example is loaded."""
        if self.kind == "sft":
            return Workload([(n,) for n in self.column("length")], self.column("targets"), packed)
        return Workload(list(zip(self.column("chosen_length"), self.column("rejected_length"))),
                        None, packed)




def batch_plan(num_examples: int, global_batch_size: int, micro_batch_size: int,
               seed: int, epoch: int) -> list[list[list[int]]]:
    """Example indices for one epoch: optimizer steps, each a list of micro-batches.

    Seeded shuffle per epoch; the last step may be smaller."""
    order = list(range(num_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    micro = min(micro_batch_size, global_batch_size)
    steps = []
    for start in range(0, num_examples, global_batch_size):
        chunk = order[start : start + global_batch_size]
        steps.append([chunk[j : j + micro] for j in range(0, len(chunk), micro)])
    return steps


def split_held_out(num_examples: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices). With fraction > 0 and at least two examples, at
    least one is held out and at least one is trained on."""
    if not 0 <= fraction < 1:
        raise ValueError("heldOutFraction must be in [0, 1)")
    order = list(range(num_examples))
    random.Random(f"held-out:{seed}").shuffle(order)
    n_held = int(round(fraction * num_examples))
    if fraction > 0 and num_examples >= 2:
        n_held = min(max(n_held, 1), num_examples - 1)
    return sorted(order[n_held:]), sorted(order[:n_held])


def rank_share(micro_batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step: every world_size-th, counted from
    `rank`, so the ranks together visit exactly the single-process micro-batches (same
    composition, so per-micro-batch means are unchanged). May be empty for a small step."""
    return micro_batches[rank::world_size]
