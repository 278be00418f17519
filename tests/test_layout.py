"""The operator's pure core stays pure: importing every module of xwin_operator.core loads no
executor (kube/, local/) and none of kopf, kubernetes, aiohttp, torch or boto3, so the planner
can be read, tested and reused without a cluster client or a training stack."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("kopf", "kubernetes", "aiohttp", "torch", "boto3", "botocore",
         "xwin_operator.kube", "xwin_operator.local")

PROBE = """
import importlib, json, pkgutil, sys
import xwin_operator.core as core
names = [m.name for m in pkgutil.iter_modules(core.__path__, "xwin_operator.core.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_importing_the_core_loads_no_executor_client_or_training_stack():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert "xwin_operator.core.planner" in report["modules"]
    loaded = [m for m in report["loaded"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert loaded == []
