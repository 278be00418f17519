"""A pod's container as a podman container: what a node does with the manifest, done with
podman on this machine (images built by `make images`).

`container_run` (pure) reads what a rendered pod asks for and `podman_argv` (pure) turns it
into `podman run` arguments:
  * the image the container names, its `command` as the entrypoint (the image's ENTRYPOINT
    and CMD replaced, as Kubernetes does) with `$(VAR)` references expanded;
  * the pod's (or the container's) `runAsUser`/`runAsGroup`, `readOnlyRootFilesystem` (no
    writable /tmp added: Kubernetes adds none), `capabilities.drop`, no privilege escalation;
  * the environment resolved as the kubelet resolves it (`secretKeyRef` from given Secrets);
  * emptyDir volumes as host folders owned by the pod's user (`fsGroup`), memory-backed ones
    (`/dev/shm`) as tmpfs;
  * the host's network (the store, the judge and the API server listen on loopback), with
    Service host names resolving to 127.0.0.1.
`PodmanContainer` runs one (thin shell): start, wait, logs, stop.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .pods import LocalProcess, expand_refs, resolve_env, rewrite, serve_on

CONTAINERS_CONF = Path(__file__).resolve().parents[2] / "images" / "containers.conf"


@dataclass(frozen=True)
class ContainerRun:
    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    user: str | None = None
    read_only: bool = False
    cap_drop: tuple[str, ...] = ()
    no_new_privileges: bool = False
    mounts: tuple[tuple[str, str], ...] = ()      # (volume name, mount path) of emptyDirs on disk
    tmpfs: tuple[str, ...] = ()                   # mount paths of memory-backed emptyDirs
    hosts: tuple[str, ...] = ()                   # names that resolve to 127.0.0.1
    workdir: str | None = None
    binds: tuple[tuple[str, str], ...] = ()       # (host path, container path) of single files


def _security(pod: dict, container: dict) -> dict:
    return {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}


def container_run(name: str, pod: dict, container: dict, *, secrets: dict[str, dict[str, str]],
                  extra_env: dict[str, str] | None = None, hosts: tuple[str, ...] = ()) -> ContainerRun:
    """What `container` of pod spec `pod` asks for. `secrets`: name -> {key: value}; a missing
    one raises PodConfigError naming it, as a kubelet reports CreateContainerConfigError."""
    def secret(name_: str) -> dict | None:
        return {"stringData": secrets[name_]} if name_ in secrets else None

    env = {**resolve_env(container, {"name": name}, secret), **(extra_env or {})}
    argv = [expand_refs(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not argv:
        raise ValueError(f"container {container.get('name')!r} of {name} has no command")
    sec = _security(pod, container)
    user = None
    if sec.get("runAsUser") is not None:
        user = f"{sec['runAsUser']}:{sec.get('runAsGroup', sec.get('fsGroup', 0))}"
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts, tmpfs = [], []
    for m in container.get("volumeMounts") or []:
        volume = volumes.get(m["name"])
        if volume is None or "emptyDir" not in volume:
            raise ValueError(f"{name}: volume {m['name']!r} is not an emptyDir the test can provide")
        if (volume["emptyDir"] or {}).get("medium") == "Memory":
            tmpfs.append(m["mountPath"])
        else:
            mounts.append((m["name"], m["mountPath"]))
    return ContainerRun(
        name=name, image=container["image"], argv=argv, env=env, user=user,
        read_only=bool(sec.get("readOnlyRootFilesystem")),
        cap_drop=tuple((sec.get("capabilities") or {}).get("drop") or ()),
        no_new_privileges=sec.get("allowPrivilegeEscalation") is False,
        mounts=tuple(mounts), tmpfs=tuple(tmpfs), hosts=tuple(hosts), workdir=container.get("workingDir"))


def podman_argv(run: ContainerRun, volume_dirs: dict[str, Path]) -> list[str]:
    """`podman run` for `run`; `volume_dirs`: emptyDir name -> the host folder behind it."""
    argv = ["podman", "run", "--rm", "--name", run.name, "--network", "host", "--pull", "never"]
    if run.user:
        argv += ["--user", run.user]
    if run.read_only:
        argv += ["--read-only", "--read-only-tmpfs=false"]
    for cap in run.cap_drop:
        argv += ["--cap-drop", cap.lower()]
    if run.no_new_privileges:
        argv += ["--security-opt", "no-new-privileges"]
    for volume, path in run.mounts:
        argv += ["-v", f"{volume_dirs[volume]}:{path}"]
    for path in run.tmpfs:
        argv += ["--mount", f"type=tmpfs,destination={path},tmpfs-mode=1777"]
    for host in run.hosts:
        argv += ["--add-host", f"{host}:127.0.0.1"]
    for host_path, path in run.binds:
        argv += ["-v", f"{host_path}:{path}"]
    if run.workdir:
        argv += ["--workdir", run.workdir]
    for key, value in run.env.items():
        argv += ["--env", f"{key}={value}"]
    return argv + ["--entrypoint", json.dumps(run.argv[:1]), run.image, *run.argv[1:]]


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the project's containers.conf unless one is set."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=podman_env()).returncode == 0


def volume_folders(run: ContainerRun, root: Path, owner: str | None) -> dict[str, Path]:
    """A host folder per emptyDir, owned by the pod's user and group (fsGroup) when we can."""
    dirs = {}
    for volume, _ in run.mounts:
        path = root / volume
        path.mkdir(parents=True, exist_ok=True)
        if owner and os.geteuid() == 0:
            uid, gid = (int(x) for x in owner.split(":"))
            os.chown(path, uid, gid)
        else:
            path.chmod(0o777)
        dirs[volume] = path
    return dirs


def podman_process(pod_name: str, template: dict, *, container: dict, work: Path,
                   secrets: dict[str, dict[str, str]], services: dict[str, int], extra_env: dict[str, str],
                   port: int | None = None) -> LocalProcess:
    """What the test kubelet starts for a pod's container in podman mode: `podman run` of the
    container's image (see `container_run`), the pod's emptyDirs in `<work>/pods/<pod>/` (shared
    by its containers, as on a node), Service URLs pointing at the loopback port of the server
    behind them, a server's `--port`/`--host` moved to `port` on 127.0.0.1, and a file the
    kubelet hands over by path (the termination log) bind-mounted at that path."""
    pod = template.get("spec") or {}
    name = f"{pod_name}-{container.get('name', 'main')}-{uuid.uuid4().hex[:6]}"
    files = {v for v in extra_env.values() if v.startswith(str(work)) and Path(v).is_file()}
    run = container_run(name, pod, container, secrets=secrets, extra_env=extra_env,
                        hosts=tuple(services))
    env = {k: rewrite(v, {}, services) for k, v in run.env.items()}
    argv = [rewrite(a, {}, services) for a in run.argv]
    if port is not None:
        argv = serve_on(argv, port)
    for f in files:
        Path(f).chmod(0o666)
    run = ContainerRun(**{**run.__dict__, "env": env, "argv": argv,
                          "binds": tuple((f, f) for f in sorted(files))})
    dirs = volume_folders(run, work / "pods" / pod_name, run.user)
    log_name = f"{pod_name}.log" if container is pod["containers"][0] else f"{pod_name}.{container.get('name', 'init')}.log"
    return LocalProcess(argv=podman_argv(run, dirs), env=podman_env(), cwd=str(work),
                        log=work / "logs" / log_name, folders=list(dirs.values()), container=name)


def secret_values(found: dict[str, dict | None]) -> dict[str, dict[str, str]]:
    """The API server's Secret objects (base64 `data`, `stringData`) as name -> {key: value};
    absent ones (None) left out."""
    return {name: {**{k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()},
                   **(obj.get("stringData") or {})}
            for name, obj in found.items() if obj is not None}


def remove_container(name: str) -> None:
    """`podman rm -f`: a killed `podman run` client leaves its container running."""
    subprocess.run(["podman", "rm", "-f", "--ignore", "-t", "0", name], env=podman_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class PodmanContainer:
    """One container started with `podman run` (no -d: its output goes to `log`)."""
    run: ContainerRun
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def create(cls, run: ContainerRun, volume_dirs: dict[str, Path], log: Path) -> "PodmanContainer":
        return cls(run, podman_argv(run, volume_dirs), log)

    def start(self) -> "PodmanContainer":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["podman", "rm", "-f", "--ignore", self.run.name], env=podman_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=podman_env())
        return self

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it still runs after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace: int = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run(["podman", "stop", "--ignore", "-t", str(grace), self.run.name], env=podman_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(grace + 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def report(self, what: str, lines: int = 40) -> str:
        """What a failing test prints: the rendered command and the container's last lines."""
        tail = "\n".join(self.output().splitlines()[-lines:])
        return (f"{what}\n  image: {self.run.image}\n  rendered command: {json.dumps(self.run.argv)[:2000]}\n"
                f"  podman: {' '.join(a if len(a) < 200 else a[:200] + '...' for a in self.argv)}\n"
                f"  last {lines} lines of the container's log ({self.log}):\n{tail}")


def wait_until(predicate, timeout: float, interval: float = 1.0, while_=lambda: True) -> bool:
    """Poll `predicate` until it is true (True), `timeout` passes or `while_` turns false (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not while_():
            return bool(predicate())
        time.sleep(interval)
    return False
