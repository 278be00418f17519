"""Runs every benchmarks/bench_*.py in turn; each writes its own section of RESULTS.md.

    python benchmarks/run_all.py [NAME ...]     # e.g. `selection sampler`; default: all

A benchmark that needs something absent here (a vLLM virtualenv, a GPU) says so and exits 0
without touching its section. A failing benchmark is reported and the others still run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
    failed = []
    for script in scripts:
        started = time.monotonic()
        print(f"== {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        print(f"== {script.name}: exit {code} in {time.monotonic() - started:.0f}s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    print(f"results: {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
