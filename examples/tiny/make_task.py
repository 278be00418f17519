"""Writes the tiny demo task: data files and a randomly initialised tiny base model.

    python examples/tiny/make_task.py --out examples/tiny/work [--seed 0]

Everything is made offline and is a pure function of the seed. Re-running with the same
arguments leaves existing files alone (the base model is only built once).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import synthetic  # noqa: E402


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def make_task(out: Path, seed: int = 0, n_sft: int = 256, n_prompts: int = 32,
              n_pairs: int = 128, n_scored: int = 64, n_responses: int = 8) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {
        "sft": [synthetic.conversation(rng, i, multi_turn=i % 3 == 0) for i in range(n_sft)],
        "pair-prompts": [synthetic.prompt(rng, i, "pp") for i in range(n_prompts)],
        "rs-prompts": [synthetic.prompt(rng, i, "rs") for i in range(n_prompts)],
        "pairs": [synthetic.pair(rng, i) for i in range(n_pairs)],
        "scored": [synthetic.scored(rng, i, n_responses) for i in range(n_scored)],
        "alpaca": [synthetic.prompt(rng, i, "alpaca") for i in range(16)],
    }
    files["alpaca-ref"] = [{"id": p["id"], "prompt": p["messages"],
                            "output": synthetic.wrong_answer(rng, p["messages"]) if i % 2
                            else synthetic.right_answer(p["messages"])}
                           for i, p in enumerate(files["alpaca"])]
    files["mt-bench"] = []
    for i in range(8):
        c = synthetic.conversation(rng, i, multi_turn=True)
        files["mt-bench"].append({"id": f"mt-{i}", "turns": [c["messages"][0]["content"],
                                                             c["messages"][2]["content"]]})
    paths = {}
    for name, records in files.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)

    base = out / "base-model"
    if not (base / "config.json").exists():
        from tiny_model import build_tiny_model

        build_tiny_model(base, synthetic.corpus(random.Random(seed)), seed=seed)
    paths["base-model"] = base
    return paths


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
