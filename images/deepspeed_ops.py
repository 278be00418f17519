"""The trainer image's DeepSpeed ops, compiled while the image is built: a pod loads them from
DeepSpeed's own package and never compiles one at first use (minutes of idle GPUs per start,
and a read-only or non-root pod could not write the build anyway).

    python3 deepspeed_ops.py install   # reinstall the DeepSpeed pip resolved, from its source,
                                       # with the ops the stage jobs load (DS_BUILD_<op>=1)
    python3 deepspeed_ops.py check     # print the ops DeepSpeed reports prebuilt; exit 1
                                       # naming each one the stage jobs need that is not

The ops are `xwin_jobs.training.zero.CPU_OPS` (DeepSpeedCPUAdam for offloadOptimizer; on a CPU
base also the shared-memory collective) on the base's accelerator: `cuda` when its torch is a
CUDA build, else `cpu`; an op that accelerator lacks (no shared-memory collective on CUDA) is
left out. Runs after the project is installed, as root, with a C++ compiler and Python headers.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from importlib import metadata


def accelerator() -> str:
    """DeepSpeed's accelerator for this base: the one a pod on it selects at run time."""
    import torch

    return "cuda" if torch.version.cuda else "cpu"


def wanted(accel: str) -> dict[str, str]:
    """The ops the stage jobs load on `accel`: op name -> DeepSpeed's DS_BUILD_ variable."""
    os.environ["DS_ACCELERATOR"] = accel
    from deepspeed.accelerator import get_accelerator

    from xwin_jobs.training.zero import CPU_OPS

    builders = [get_accelerator().create_op_builder(name) for name in CPU_OPS]
    return {b.NAME: b.BUILD_VAR for b in builders if b is not None}


def install() -> int:
    accel = accelerator()
    ops = wanted(accel)
    version = metadata.version("deepspeed")
    print(f"xwin image: compiling DeepSpeed {version}'s ops {', '.join(ops)} for accelerator {accel}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": accel, "DS_BUILD_OPS": "0", **{var: "1" for var in ops.values()}}
    # setup.py imports the installed torch (no build isolation) and compiles the ops into the wheel
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir"]
    subprocess.run([*pip, "setuptools", "wheel"], check=True)
    subprocess.run([*pip, "--no-build-isolation", "--no-deps", "--force-reinstall", "--no-binary", "deepspeed",
                    f"deepspeed=={version}"], env=env, check=True)
    strip_debug_info()
    return check()


def strip_debug_info() -> None:
    """DeepSpeed's setup.py compiles with -g: its ops lose their debug sections (about 15 MB
    each) where the base has binutils' `strip`."""
    strip = shutil.which("strip")
    libraries = [f for f in metadata.distribution("deepspeed").files or () if f.name.endswith(".so")]
    if strip is None:
        print("xwin image: no `strip` on this base: DeepSpeed's ops keep their debug sections")
        return
    for f in libraries:
        subprocess.run([strip, "--strip-debug", str(f.locate())], check=True)


def check() -> int:
    accel = accelerator()
    ops = wanted(accel)
    # what DeepSpeed's setup.py recorded (deepspeed.git_version_info reads it), read from the
    # file: this process imported the DeepSpeed that was there before `install`
    record = runpy.run_path(str(metadata.distribution("deepspeed").locate_file(
        "deepspeed/git_version_info_installed.py")))
    built_for, prebuilt = record["accelerator_name"], sorted(k for k, v in record["installed_ops"].items() if v)
    print(f"xwin image: DeepSpeed ops prebuilt for {built_for}: {' '.join(prebuilt) or 'none'}")
    missing = [name for name in ops if name not in prebuilt]
    if built_for != accel:
        print(f"xwin image: DeepSpeed's ops are built for accelerator {built_for}, pods select {accel}",
              file=sys.stderr)
        return 1
    for name in missing:
        print(f"xwin image: DeepSpeed op {name} is not prebuilt (set {ops[name]}=1 when installing DeepSpeed); "
              "a pod would compile it at first use", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    commands = {"install": install, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
