"""Logging in to the Kubernetes API with the official client (`kubernetes`), as kubectl does.

`load_login()` returns a `Login`: a `kubernetes.client.Configuration` for the operator's own
calls (kube.KubeApi) and the fields of kopf's ConnectionInfo for kopf's watches (handlers'
on.login), both from one loading, so whatever works for kubectl works for both:
  * in-cluster: the service account's token (re-read as the kubelet rotates it) and CA;
  * else $KUBECONFIG (a ':'-separated list, merged as kubectl merges it: the first file to name
    a context, cluster or user wins) or ~/.kube/config: the current context's cluster and user,
    with `certificate-authority(-data)`, `client-certificate(-data)`/`client-key(-data)`,
    `token`/`tokenFile`, `exec` credential plugins (EKS `aws eks get-token`,
    `gke-gcloud-auth-plugin`, `kubelogin`; their token is fetched again before it expires),
    `insecure-skip-tls-verify` and `tls-server-name`. Relative paths are read from the folder
    of the kubeconfig that names them.

Key material never touches the disk: the `*-data` fields are decoded into anonymous in-memory
files (Linux memfd) that the TLS layers of both clients read by their /proc/self/fd path (the
kubernetes package's own loader writes them to temporary files). No credential is logged or
put in an error: a `LoginError` names the kubeconfig, the context, the user and the field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# the official client fetches an exec plugin's token again this long before it expires
REFRESH_AHEAD = dt.timedelta(minutes=5)
_DATA_FIELDS = {"certificate-authority-data": "certificate-authority",
                "client-certificate-data": "client-certificate", "client-key-data": "client-key"}
_PATH_FIELDS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


class LoginError(Exception):
    """The operator cannot log in: the message names the cause, never a credential."""


class MemFiles:
    """Bytes as anonymous in-memory files, readable by path (/proc/self/fd/N) while the
    process lives; the same content gets the same file (a re-login opens nothing new)."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}

    def path(self, data: bytes, what: str) -> str:
        key = hashlib.sha256(data).hexdigest()
        if key not in self._paths:
            if not hasattr(os, "memfd_create"):
                raise LoginError(f"{what}: in-memory key files need Linux (memfd); give the file's path instead")
            fd = os.memfd_create("xwin-" + what.rsplit(".", 1)[-1], os.MFD_CLOEXEC)
            os.write(fd, data)
            self._paths[key] = f"/proc/self/fd/{fd}"
        return self._paths[key]


@dataclass
class Login:
    """A loaded login: `configuration` for the official client, `connection_info()` for kopf."""

    configuration: Any            # kubernetes.client.Configuration
    source: str                   # what it was loaded from, for messages
    namespace: str | None = None  # the context's default namespace
    expiry: dt.datetime | None = None  # when an exec plugin's token expires

    def token(self) -> str | None:
        """The current bearer token (refreshed first when it is about to expire)."""
        value = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if not value:
            return None
        return value.split(" ", 1)[1] if " " in value else value

    def connection_info(self) -> dict[str, Any]:
        """Keyword arguments of kopf.ConnectionInfo: the same server, CA, client certificate and
        token as `configuration`. An expiring token expires for kopf when the official client
        would fetch a new one (kopf then logs in again)."""
        cfg = self.configuration
        expiration = None
        if self.expiry is not None:
            ahead = self.expiry - REFRESH_AHEAD
            expiration = ahead if ahead > dt.datetime.now(dt.timezone.utc) else self.expiry
        token = self.token()
        return dict(server=cfg.host, ca_path=cfg.ssl_ca_cert or None, insecure=not cfg.verify_ssl,
                    certificate_path=cfg.cert_file or None, private_key_path=cfg.key_file or None,
                    scheme="Bearer" if token else None, token=token, expiration=expiration,
                    default_namespace=self.namespace)


def load_login(memfiles: MemFiles, kubeconfig: str | None = None, context: str | None = None) -> Login:
    """The in-cluster service account when running in a pod (and no kubeconfig is given),
    else the kubeconfig ($KUBECONFIG, else ~/.kube/config). Raises LoginError."""
    from kubernetes import client, config

    kubeconfig = kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG")
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT / "token").exists():
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg, try_refresh_token=True)
        except config.ConfigException as e:
            raise LoginError(f"in-cluster service account ({SERVICE_ACCOUNT}): {e}") from None
        ns_file = SERVICE_ACCOUNT / "namespace"
        return Login(cfg, "the in-cluster service account",
                     ns_file.read_text().strip() if ns_file.exists() else None)
    paths = [p for p in (kubeconfig or "~/.kube/config").split(os.pathsep) if p]
    merged = merge_kubeconfigs([Path(p).expanduser() for p in paths])
    return login_from_dict(merged, memfiles, source=", ".join(paths), context=context)


def merge_kubeconfigs(paths: list[Path]) -> dict[str, Any]:
    """kubectl's merge of a KUBECONFIG list: named entries from the first file naming them,
    `current-context` from the first file setting it; relative paths made absolute."""
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": [], "current-context": None}
    seen: set[tuple[str, str]] = set()
    readable = 0
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue  # as kubectl: a missing file in the list is skipped
        except (OSError, yaml.YAMLError) as e:
            raise LoginError(f"kubeconfig {path}: cannot be read: {type(e).__name__}: {_first_line(e)}") from None
        if not isinstance(doc, dict):
            raise LoginError(f"kubeconfig {path}: not a kubeconfig (a YAML mapping with clusters, users, contexts)")
        readable += 1
        merged["current-context"] = merged["current-context"] or doc.get("current-context")
        for section, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for entry in doc.get(section) or []:
                if not isinstance(entry, dict) or "name" not in entry:
                    raise LoginError(f"kubeconfig {path}: an entry of {section} has no name")
                if (section, entry["name"]) in seen:
                    continue
                seen.add((section, entry["name"]))
                body = dict(entry.get(inner) or {})
                for key in _PATH_FIELDS:
                    if body.get(key) and not os.path.isabs(body[key]):
                        body[key] = str(path.parent / body[key])
                ex = body.get("exec")
                if isinstance(ex, dict) and os.sep in str(ex.get("command", "")) and not os.path.isabs(ex["command"]):
                    body["exec"] = {**ex, "command": str(path.parent / ex["command"])}
                merged[section].append({"name": entry["name"], inner: body})
    if not readable:
        raise LoginError(f"no kubeconfig found at {os.pathsep.join(map(str, paths))} and not running in a "
                         "cluster: set KUBECONFIG or run with a service account")
    return merged


def login_from_dict(doc: dict[str, Any], memfiles: MemFiles, *, source: str = "kubeconfig",
                    context: str | None = None) -> Login:
    """A Login from a (merged) kubeconfig document, through the official client's loader."""
    from kubernetes import client
    from kubernetes.config import ConfigException
    from kubernetes.config.kube_config import KubeConfigLoader

    name = context or doc.get("current-context")
    if not name:
        raise LoginError(f"kubeconfig {source}: no current-context (and no context given)")
    ctx = _entry(doc, "contexts", "context", name, source)
    where = f"kubeconfig {source}, context '{name}'"
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    cluster = _entry(doc, "clusters", "cluster", cluster_name, where)
    user = _entry(doc, "users", "user", user_name, where) if user_name else {}
    if not cluster.get("server"):
        raise LoginError(f"{where}: cluster '{cluster_name}' has no server")
    doc = _in_memory(doc, memfiles, where)
    cfg = client.Configuration()
    try:
        loader = KubeConfigLoader(config_dict=doc, active_context=name, config_base_path="")
        loader.load_and_set(cfg)
    except ConfigException as e:
        raise LoginError(f"{where}, user '{user_name}': {_first_line(e)}") from None
    except (ValueError, OSError) as e:  # e.g. a CA or key file that is not there
        raise LoginError(f"{where}, user '{user_name}': {type(e).__name__}: {_first_line(e)}") from None
    expiry = getattr(loader, "expiry", None)
    if "exec" in user and getattr(loader, "token", None) is None and not cfg.cert_file:
        raise LoginError(f"{where}, user '{user_name}': the exec credential plugin "
                         f"'{user['exec'].get('command')}' failed: {exec_failure(loader)}")
    return Login(cfg, where, ctx.get("namespace"), expiry)


def exec_failure(loader: Any) -> str:
    """Why the exec plugin gave no credential (the official loader only logs it): the plugin
    is run once more to say, without ever quoting its output (it may hold a token)."""
    from kubernetes.config import ConfigException
    from kubernetes.config.exec_provider import ExecProvider

    try:
        status = ExecProvider(loader._user["exec"], None, loader._cluster).run()
    except ConfigException as e:
        text = str(e)
        if "failed to decode" in text:
            return "its output is not an ExecCredential (JSON)"
        return _first_line(e)
    except OSError as e:
        return f"cannot run it: {e.strerror or e}"
    return ("its ExecCredential has no status.token (nor client certificate)" if isinstance(status, dict)
            else "its ExecCredential has no status")


def _entry(doc: dict, section: str, inner: str, name: Any, where: str) -> dict:
    for entry in doc.get(section) or []:
        if entry.get("name") == name:
            return entry.get(inner) or {}
    raise LoginError(f"{where}: no {inner} named '{name}' in {section}")


def _in_memory(doc: dict, memfiles: MemFiles, where: str) -> dict:
    """The document with every `*-data` field replaced by the path of an in-memory file."""
    doc = json.loads(json.dumps(doc))
    for section, inner in (("clusters", "cluster"), ("users", "user")):
        for entry in doc.get(section) or []:
            body = entry.get(inner) or {}
            for data_key, path_key in _DATA_FIELDS.items():
                if body.get(data_key):
                    what = f"{section}['{entry['name']}'].{data_key}"
                    try:
                        raw = base64.b64decode(body.pop(data_key), validate=True)
                    except (binascii.Error, ValueError):
                        raise LoginError(f"{where}: {what} is not base64") from None
                    if b"-----BEGIN" not in raw:
                        raise LoginError(f"{where}: {what} is not PEM once base64-decoded")
                    body[path_key] = memfiles.path(raw, what)
    return doc


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
