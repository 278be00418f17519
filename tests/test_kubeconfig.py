"""Loading a login as kubectl would (xwin_operator.kube.kubeconfig), without a cluster: the merge of
a KUBECONFIG list, relative paths, `*-data` kept in memory (never on disk), and the clear
errors of bad kubeconfigs, none of which quotes a credential."""

from __future__ import annotations

import base64
import os

import pytest
import yaml

from kube.tls import make_pki
from xwin_operator.kube.kubeconfig import LoginError, MemFiles, load_login, login_from_dict, merge_kubeconfigs


def doc(server: str = "https://127.0.0.1:6443", user: dict | None = None, cluster: dict | None = None,
        name: str = "c") -> dict:
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": {"server": server, **(cluster or {})}}],
            "users": [{"name": name, "user": user or {"token": "tok-123"}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "ns1"}}]}


def test_a_kubeconfig_list_merges_as_kubectl_does(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b" / "b.yaml"
    second.parent.mkdir()
    first.write_text(yaml.safe_dump({**doc("https://first:6443"), "current-context": "c"}))
    (second.parent / "ca.crt").write_bytes(make_pki().ca)
    other = doc("https://second:6443", cluster={"certificate-authority": "ca.crt"}, name="other")
    other["clusters"].append({"name": "c", "cluster": {"server": "https://ignored:1"}})
    second.write_text(yaml.safe_dump({**other, "current-context": "other"}))
    merged = merge_kubeconfigs([first, tmp_path / "missing.yaml", second])
    assert merged["current-context"] == "c"  # the first file setting it
    servers = {c["name"]: c["cluster"]["server"] for c in merged["clusters"]}
    assert servers == {"c": "https://first:6443", "other": "https://second:6443"}  # the first naming it wins
    ca = next(c for c in merged["clusters"] if c["name"] == "other")["cluster"]["certificate-authority"]
    assert ca == str(second.parent / "ca.crt")  # relative to the file that names it


def test_token_context_namespace_and_the_same_login_for_kopf(tmp_path, monkeypatch):
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(doc()))
    monkeypatch.setenv("KUBECONFIG", str(path))
    login = load_login(MemFiles())
    assert login.configuration.host == "https://127.0.0.1:6443" and login.namespace == "ns1"
    assert login.token() == "tok-123"
    info = login.connection_info()
    assert (info["server"], info["scheme"], info["token"], info["default_namespace"]) == \
        ("https://127.0.0.1:6443", "Bearer", "tok-123", "ns1")


def test_certificate_and_key_data_stay_in_memory(tmp_path, monkeypatch):
    pki = make_pki()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    user = {"client-certificate-data": base64.b64encode(pki.client_cert).decode(),
            "client-key-data": base64.b64encode(pki.client_key).decode()}
    memfiles = MemFiles()
    login = login_from_dict(doc(user=user, cluster={"certificate-authority-data": base64.b64encode(pki.ca).decode()}),
                            memfiles)
    cfg = login.configuration
    for path, content in ((cfg.key_file, pki.client_key), (cfg.cert_file, pki.client_cert), (cfg.ssl_ca_cert, pki.ca)):
        assert path.startswith("/proc/self/fd/")
        assert os.readlink(path).startswith("/memfd:")  # an anonymous in-memory file
        with open(path, "rb") as f:
            assert f.read() == content
    assert not list(tmp_path.iterdir())
    again = login_from_dict(doc(user=user), memfiles)
    assert again.configuration.key_file == cfg.key_file  # a re-login opens no new file


@pytest.mark.parametrize("change, message", [
    ({"current-context": "nope"}, "no context named 'nope'"),
    ({"users": []}, "no user named 'c'"),
    ({"clusters": [{"name": "c", "cluster": {}}]}, "cluster 'c' has no server"),
    ({"users": [{"name": "c", "user": {"client-key-data": "!!not base64!!"}}]}, "client-key-data is not base64"),
    ({"users": [{"name": "c", "user": {"client-key-data": base64.b64encode(b"secret-bytes").decode()}}]},
     "client-key-data is not PEM"),
])
def test_a_bad_kubeconfig_names_the_cause_never_the_secret(change, message):
    with pytest.raises(LoginError, match=message) as e:
        login_from_dict({**doc(), **change}, MemFiles())
    assert "secret-bytes" not in str(e.value) and "c2VjcmV0LWJ5dGVz" not in str(e.value)


def test_no_kubeconfig_and_no_service_account(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(LoginError, match="no kubeconfig found"):
        load_login(MemFiles())
