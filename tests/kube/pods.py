"""A pod template -> a local process: what the test kubelet starts for each replica.

What a real node would do, done on this machine:
  * the container's `env` resolved: `value`, `secretKeyRef` (read from the fake API server's
    Secrets), `fieldRef` to metadata.name / metadata.namespace; `$(VAR)` references expanded in
    `command` and `args` as the kubelet does;
  * emptyDir volumes mounted at a per-pod folder: a value or argument under a mount path
    (`/scratch/...`) is rewritten to the local folder (`/dev/shm` stays the host's);
  * the image is replaced by a local interpreter: `python`/`python3` become the interpreter
    chosen for the image, other commands (`torchrun`) are looked up next to it;
  * Service host names (`http://<service>:<port>`) are rewritten to the loopback port of the
    process serving that Service, and a server's `--port`/`--host` to that port on 127.0.0.1.

Pure except for `free_port`.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class PodConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError (e.g. a missing Secret)."""


@dataclass
class LocalProcess:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: Path
    folders: list[Path] = field(default_factory=list)
    container: str | None = None    # podman mode (podman.py): the container `argv` runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_refs(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, unknown ones kept."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def resolve_env(container: dict, pod_meta: dict, secrets: Callable[[str], dict | None]) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (in order, with `$(VAR)`)."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand_refs(str(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = secrets(ref["name"])
            if secret is None:
                if ref.get("optional"):
                    continue
                raise PodConfigError(f'secret "{ref["name"]}" not found')
            data = secret.get("data") or {}
            if ref["key"] in data:
                env[name] = base64.b64decode(data[ref["key"]]).decode()
            elif ref["key"] in (secret.get("stringData") or {}):
                env[name] = secret["stringData"][ref["key"]]
            elif not ref.get("optional"):
                raise PodConfigError(f'couldn\'t find key {ref["key"]} in Secret {ref["name"]}')
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[name] = {"metadata.name": pod_meta.get("name", ""),
                         "metadata.namespace": pod_meta.get("namespace", "")}.get(path, "")
    return env


def mount_map(pod_spec: dict, container: dict, pod_dir: Path) -> dict[str, Path]:
    """mountPath -> local folder for every emptyDir the container mounts (not /dev/shm)."""
    empty_dirs = {v["name"] for v in pod_spec.get("volumes") or [] if "emptyDir" in v}
    mounts: dict[str, Path] = {}
    for m in container.get("volumeMounts") or []:
        if m["name"] in empty_dirs and m["mountPath"] != "/dev/shm":
            mounts[m["mountPath"].rstrip("/")] = pod_dir / m["name"]
    return mounts


def rewrite(text: str, mounts: dict[str, Path], services: dict[str, int]) -> str:
    """Mount paths -> local folders; `<service>[.<ns>.svc...]:<port>` -> 127.0.0.1:<local port>."""
    for path, local in mounts.items():
        if text == path or text.startswith(path + "/"):
            text = str(local) + text[len(path):]
    for host, port in services.items():
        text = re.sub(rf"//{re.escape(host)}(\.[a-z0-9.-]+)?:\d+", f"//127.0.0.1:{port}", text)
    return text


def local_command(argv: list[str], python: str) -> list[str]:
    """The container's command run with a local interpreter instead of the image's."""
    if not argv:
        raise PodConfigError("container has no command")
    head, bindir = argv[0], Path(python).parent
    if head in ("python", "python3"):
        return [python, *argv[1:]]
    if "/" not in head and (bindir / head).exists():
        return [str(bindir / head), *argv[1:]]
    return list(argv)


def serve_on(argv: list[str], port: int) -> list[str]:
    """A server's arguments bound to 127.0.0.1:<port> (`--port N`/`--host H` and `=` forms)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag, value in (("--port", str(port)), ("--host", "127.0.0.1")):
            if arg == flag and i + 1 < len(argv):
                out += [flag, value]
                skip = True
                break
            if arg.startswith(flag + "="):
                out.append(f"{flag}={value}")
                break
        else:
            out.append(arg)
    return out


def training_operator_env(job_name: str, replica_type: str, index: int, total_replicas: int,
                          nproc_per_node: int, master_port: int) -> dict[str, str]:
    """The variables the Kubeflow Training Operator (v1) injects into a PyTorchJob replica.
    The master address is the Master's Service there; here every replica is on loopback."""
    rank = index + 1 if replica_type == "worker" else index
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
            "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(master_port),
            "WORLD_SIZE": str(total_replicas * nproc_per_node), "RANK": str(rank),
            "PET_NNODES": str(total_replicas), "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": str(nproc_per_node), "PYTHONUNBUFFERED": "1"}


def pod_process(pod_name: str, namespace: str, template: dict, *, python: str, cwd: str,
                work: Path, base_env: dict[str, str], extra_env: dict[str, str],
                secrets: Callable[[str], dict | None], services: dict[str, int],
                port: int | None = None, container: dict | None = None) -> LocalProcess:
    """The local process for a container of a pod template (default: its first container)."""
    spec = template.get("spec") or {}
    container = container or spec["containers"][0]
    pod_dir = work / "pods" / pod_name
    mounts = mount_map(spec, container, pod_dir)
    env = {**base_env, **extra_env}
    env.update(resolve_env(container, {"name": pod_name, "namespace": namespace}, secrets))
    env = {k: rewrite(v, mounts, services) for k, v in env.items()}
    argv = [expand_refs(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    argv = [rewrite(a, mounts, services) for a in local_command(argv, python)]
    if port is not None:
        argv = serve_on(argv, port)
    log = f"{pod_name}.log" if container is spec["containers"][0] else f"{pod_name}.{container.get('name', 'init')}.log"
    return LocalProcess(argv=argv, env=env, cwd=cwd, log=work / "logs" / log,
                        folders=list(mounts.values()))


def default_base_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "TZ", "XWIN_PROGRESS_INTERVAL")  # the last: tests
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
