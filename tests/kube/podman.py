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

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .pods import expand_refs, resolve_env

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


def _security(pod: dict, container: dict) -> dict:
    return {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}


def container_run(name: str, pod: dict, container: dict, *, secrets: dict[str, dict[str, str]],
                  extra_env: dict[str, str] | None = None, hosts: tuple[str, ...] = ()) -> ContainerRun:
    """What `container` of pod spec `pod` asks for. `secrets`: name -> {key: value}; a missing
    one raises KeyError naming it, as a kubelet reports CreateContainerConfigError."""
    def secret(name_: str) -> dict | None:
        if name_ not in secrets:
            raise KeyError(f"the pod reads Secret {name_!r}, which the test does not provide")
        return {"stringData": secrets[name_]}

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
