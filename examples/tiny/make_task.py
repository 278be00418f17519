"""Writes the tiny demo task: data files and a randomly initialised tiny base model.

    python examples/tiny/make_task.py --out examples/tiny/work [--seed 0]

Everything is made offline and is a pure function of the seed. The questions come from one
pool of distinct phrasings (examples/tiny/synthetic.py); the evaluation prompts (alpaca.jsonl,
mt-bench.jsonl) are drawn from a part of it that no training, pair or best-of-N prompt comes
from, and `check_disjoint` asserts it on every call. The SFT conversations are imperfect on
purpose (`noise`): the recipe's later stages have something to fix.

Re-running with the same arguments rewrites the data files (cheap) and leaves the base model
alone unless the tokenizer's corpus changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import synthetic  # noqa: E402

EVAL_FILES = ("alpaca", "mt-bench")
TRAIN_FILES = ("sft", "pair-prompts", "rs-prompts", "pairs", "scored")


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def first_user_turns(records: Iterable[dict[str, Any]]) -> set[str]:
    """The first user message of every record: conversation/prompt records (`messages`),
    pairs and scored sets (`prompt`), MT-bench questions (`turns`)."""
    out = set()
    for r in records:
        if "turns" in r:
            out.add(r["turns"][0])
            continue
        messages = r.get("messages") or r.get("prompt") or []
        out.update(m["content"] for m in messages[:1] if m["role"] == "user")
    return out


def check_disjoint(files: dict[str, list[dict]]) -> None:
    """No evaluation prompt is a training, pair or best-of-N prompt (AssertionError naming one)."""
    evaluated = set().union(*(first_user_turns(files[k]) for k in EVAL_FILES if k in files))
    for name in TRAIN_FILES:
        shared = evaluated & first_user_turns(files.get(name, []))
        assert not shared, f"{name}.jsonl shares {len(shared)} prompt(s) with the evaluation " \
                           f"prompts, e.g. {sorted(shared)[0]!r}"


def task_records(seed: int = 0, n_sft: int = 1024, n_pair_prompts: int = 256,
                 n_rs_prompts: int = 256, n_alpaca: int = 300, n_mt: int = 200,
                 noise: float = 0.5, n_pairs: int = 128, n_scored: int = 64,
                 n_responses: int = 8, second_turn_every: int = 2,
                 second_turn_in: tuple[str, ...] = ("pp",)) -> dict[str, list[dict]]:
    """Every data file of the task, as records. Pure.

    Every `second_turn_every`-th prompt of the files `second_turn_in` names ("pp": the pair
    prompts, "rs": the best-of-N prompts; 0: none) asks the second turn ("And plus c?" after a
    worked first answer), as MT-bench's second turn does. The demo's: every other pair prompt,
    so the judged pairs (which its DPO learns from) cover both turns, while best-of-N stays on
    first turns, which the 2-layer reward model ranks well (benchmarks/RESULTS.md `## Recipe`).
    The follow-ups come from their own seeded generator: every other file is the same."""
    rng = random.Random(seed)
    follow = random.Random(f"{seed}:second-turn")
    evaluation, training = synthetic.split_pool(rng, n_alpaca + n_mt)
    pick = lambda: rng.choice(training)  # noqa: E731

    def prompt(i: int, prefix: str) -> dict[str, Any]:
        text = pick()
        if second_turn_every and prefix in second_turn_in and i % second_turn_every == second_turn_every - 1:
            return synthetic.two_turn_prompt(i, text, follow.randint(0, synthetic.MAX_TERM), prefix)
        return synthetic.prompt_record(i, text, prefix)

    files = {
        "sft": [synthetic.noisy_conversation(rng, i, pick(), multi_turn=i % 3 == 0, noise=noise)
                for i in range(n_sft)],
        "pair-prompts": [prompt(i, "pp") for i in range(n_pair_prompts)],
        "rs-prompts": [prompt(i, "rs") for i in range(n_rs_prompts)],
        # ready-made pairs and scored sets: run-training.yaml reuses them with `from:`
        "pairs": [synthetic.pair(rng, i, pick()) for i in range(n_pairs)],
        "scored": [synthetic.scored(rng, i, n_responses, pick()) for i in range(n_scored)],
        "alpaca": [synthetic.prompt_record(i, t, "alpaca") for i, t in enumerate(evaluation[:n_alpaca])],
        "mt-bench": [synthetic.mt_question(rng, i, t) for i, t in enumerate(evaluation[n_alpaca:])],
    }
    files["alpaca-ref"] = [{"id": p["id"], "prompt": p["messages"],
                            "output": synthetic.wrong_answer(rng, p["messages"]) if i % 2
                            else synthetic.right_answer(p["messages"])}
                           for i, p in enumerate(files["alpaca"])]
    check_disjoint(files)
    return files


def make_task(out: Path, seed: int = 0, **sizes: Any) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in task_records(seed, **sizes).items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)

    base = out / "base-model"
    corpus = synthetic.corpus(random.Random(seed))
    stamp = hashlib.sha256(json.dumps([seed, corpus]).encode()).hexdigest()
    if not (base / "config.json").exists() or _read(base / "xwin-corpus.sha256") != stamp:
        from tiny_model import build_tiny_model

        build_tiny_model(base, corpus, seed=seed)
        (base / "xwin-corpus.sha256").write_text(stamp)
    paths["base-model"] = base
    return paths


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "work"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = make_task(Path(args.out), args.seed)
    print(f"tiny task written to {args.out}: " + ", ".join(sorted(paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
