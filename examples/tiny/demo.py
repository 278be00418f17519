"""`make demo`: the tiny AlignmentRun, every stage, end to end on this machine.

    python examples/tiny/demo.py [--store file://./xwin-runs] [--seed 0] [-v]

1. writes the synthetic task and the tiny base model for the seed (examples/tiny/make_task.py;
   seed 0 in examples/tiny/work, seed N in examples/tiny/work-seedN);
2. starts the loopback judge server (examples/judge_server.py) on the port that
   examples/tiny/run.yaml names in `judge.baseURL`, standing in for GPT-4;
3. runs `xwin run examples/tiny/run.yaml` (for another seed: a copy with that seed's files,
   training and sampling seeds), which starts and stops vLLM servers itself;
4. stops the judge and prints the paper's table from the evaluate stage's report, plus what
   only the demo can know: the exact grade of a random best-of-N sample vs the one the reward
   model selected (`recipe_summary`).

The judge's API key is a demo value passed through the environment, as the operator maps
`judge.apiKeySecret` on a cluster. Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import yaml  # noqa: E402
from judge_server import JudgeServer, ServerConfig  # noqa: E402
from make_task import make_task  # noqa: E402

DEMO_KEY = "sk-demo-not-a-real-key"
WORK = "./examples/tiny/work"


def seeded_run(run: dict[str, Any], seed: int) -> dict[str, Any]:
    """The demo's AlignmentRun for `seed`: that seed's task files, training and sampling
    seeds, and its own name (seed 0 is the file as it is). Pure."""
    text = yaml.safe_dump(run, sort_keys=False)
    if seed == 0:
        return yaml.safe_load(text)
    out = yaml.safe_load(text.replace(f"{WORK}/", f"{WORK}-seed{seed}/"))
    out["metadata"]["name"] = f"{run['metadata']['name']}-s{seed}"
    defaults = out["spec"].setdefault("defaults", {})
    defaults.setdefault("training", {})["seed"] = seed
    defaults.setdefault("sampling", {})["seed"] = seed
    return out


def recipe_summary(store_uri: str, run: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage's report, and the exact grade (examples/tiny/synthetic.py) of a
    random best-of-N response vs of the one the reward model scored highest."""
    import synthetic
    from xwin_jobs.records import iter_records
    from xwin_jobs.store import Store

    store = Store()
    root = f"{store_uri.rstrip('/')}/{run['metadata']['namespace']}/{run['metadata']['name']}"
    out: dict[str, Any] = {"report": store.read_json(f"{root}/evaluate/data/report.json")}
    rows = [r for r in iter_records(store, f"{root}/bestOfN/data/", "scored")]
    random_grades, selected = [], []
    for r in rows:
        valid = [x for x in r["responses"] if x.get("score") is not None]
        if not valid:
            continue
        grades = [synthetic.grade(r["prompt"], x["content"]) for x in valid]
        random_grades.append(sum(grades) / len(grades))
        selected.append(grades[max(range(len(valid)), key=lambda i: valid[i]["score"])])
    if selected:
        out["bestOfNExact"] = {"prompts": len(selected),
                               "randomSampleGrade": sum(random_grades) / len(random_grades),
                               "selectedGrade": sum(selected) / len(selected)}
    return out


def print_summary(summary: dict[str, Any]) -> None:
    from xwin_jobs.judge.report import render_table

    print("\n" + "\n".join(render_table(summary["report"])))
    exact = summary.get("bestOfNExact")
    if exact:
        print(f"\nBest-of-N, exact grade (0..1) on {exact['prompts']} prompts: a random sample "
              f"{exact['randomSampleGrade']:.3f}, the reward model's pick {exact['selectedGrade']:.3f}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "run.yaml"))
    ap.add_argument("--store", default="file://./xwin-runs")
    ap.add_argument("--seed", type=int, default=0, help="task, model and sampling seed (default 0)")
    ap.add_argument("--judge-port", type=int, default=None,
                    help="serve the judge on this port instead of the spec's (0: any free port)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    started = time.monotonic()
    make_task(HERE / ("work" if args.seed == 0 else f"work-seed{args.seed}"), args.seed)
    original = yaml.safe_load(Path(args.spec).read_text())
    run = seeded_run(original, args.seed)
    judge_url = urlparse(run["spec"]["judge"]["baseURL"])
    port = judge_url.port if args.judge_port is None else args.judge_port
    try:
        server = JudgeServer(ServerConfig(host=judge_url.hostname, port=port,
                                          api_key=DEMO_KEY)).start()
    except OSError as e:
        print(f"cannot start the judge server on {judge_url.netloc}: {e}", file=sys.stderr)
        return 1
    print(f"judge server (exact grader standing in for GPT-4) on {server.base_url}", flush=True)
    spec_file = args.spec
    run["spec"]["judge"]["baseURL"] = server.base_url
    if run != original:  # another port or seed: a copy of the spec
        spec_file = str(Path(tempfile.mkdtemp(prefix="xwin-demo-")) / Path(args.spec).name)
        Path(spec_file).write_text(yaml.safe_dump(run, sort_keys=False))
    # One thread per process: the stage jobs' tiny models gain nothing from a second thread
    # and lose several times over when the cores are busy (vLLM, the judge and the sampler run
    # beside each other; on a shared machine, other work too). A caller's setting wins.
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **os.environ, "OPENAI_API_KEY": DEMO_KEY}
    cmd = [str(Path(sys.executable).parent / "xwin"), "run", spec_file, "--store", args.store]
    try:
        code = subprocess.call(cmd + (["-v"] if args.verbose else []), env=env)
    finally:
        stats = server.stats()
        server.stop()
    served = {k: v for k, v in stats.items() if isinstance(v, int) and v}
    print("judge requests served: " + ", ".join(f"{k}={v}" for k, v in sorted(served.items())))
    if code == 0:
        print_summary(recipe_summary(args.store, run))
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s (exit {code})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
