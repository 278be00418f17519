"""`make demo`: the tiny AlignmentRun, every stage, end to end on this machine.

    python examples/tiny/demo.py [--store file://./xwin-runs] [-v]

1. writes the synthetic task and the tiny base model (examples/tiny/make_task.py);
2. starts the loopback judge server (examples/judge_server.py) on the port that
   examples/tiny/run.yaml names in `judge.baseURL`, standing in for GPT-4;
3. runs `xwin run examples/tiny/run.yaml`, which starts and stops vLLM servers itself;
4. stops the judge and prints what it was asked.

The judge's API key is a demo value passed through the environment, as the operator maps
`judge.apiKeySecret` on a cluster. Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import yaml  # noqa: E402
from judge_server import JudgeServer, ServerConfig  # noqa: E402
from make_task import make_task  # noqa: E402

DEMO_KEY = "sk-demo-not-a-real-key"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "run.yaml"))
    ap.add_argument("--store", default="file://./xwin-runs")
    ap.add_argument("--judge-port", type=int, default=None,
                    help="serve the judge on this port instead of the spec's (0: any free port)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    make_task(HERE / "work")
    run = yaml.safe_load(Path(args.spec).read_text())
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
    if server.base_url != run["spec"]["judge"]["baseURL"]:  # another port: a copy of the spec
        run["spec"]["judge"]["baseURL"] = server.base_url
        spec_file = str(Path(tempfile.mkdtemp(prefix="xwin-demo-")) / Path(args.spec).name)
        Path(spec_file).write_text(yaml.safe_dump(run, sort_keys=False))
    env = {**os.environ, "OPENAI_API_KEY": DEMO_KEY}
    cmd = [str(Path(sys.executable).parent / "xwin"), "run", spec_file, "--store", args.store]
    try:
        code = subprocess.call(cmd + (["-v"] if args.verbose else []), env=env)
    finally:
        stats = server.stats()
        server.stop()
    served = {k: v for k, v in stats.items() if isinstance(v, int) and v}
    print("judge requests served: " + ", ".join(f"{k}={v}" for k, v in sorted(served.items())))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
