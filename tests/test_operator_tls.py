"""The operator against an API server that serves HTTPS with a CA made in the test and refuses
anonymous calls, logged in with the kubeconfigs kind, EKS, GKE and AKS write:
`certificate-authority-data` plus an `exec` credential plugin whose token expires every few
seconds (refreshed by the official client and by kopf), and `client-certificate-data` /
`client-key-data`. The run reaches Succeeded; no key material is written to disk; the
operator's log holds no credential. Bad logins (an unreadable kubeconfig, a failing plugin, a
plugin printing garbage, a token the server refuses and that cannot be refreshed) are one clear
line each, and the operator keeps running.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from kube import Cluster, Kubelet
from kube.fixtures import NS, tiny_run
from kube.harness import RUNS, OperatorProcess, events_of, wait_phase, write_marker_for
from kube.kubelet import Outcome
from kube.tls import TokenAuth, exec_plugin, exec_user, make_pki

ADMIN = "admin-token-of-the-test-itself"
EXEC_KEY = "exec-plugin-signing-key"
TTL = 2.0  # seconds an exec token is good for


async def slow_success(child: dict) -> Outcome:
    """Children take a second each, so a run outlives several exec tokens."""
    await asyncio.sleep(1.0)
    await asyncio.to_thread(write_marker_for, child)
    return Outcome()


@pytest.fixture(scope="module")
def pki():
    return make_pki()


@pytest.fixture
def tls_cluster(tmp_path, pki):
    from xwin_operator.api.crd import crd

    auth = TokenAuth(ADMIN, EXEC_KEY, ttl=TTL)
    with Cluster(namespaces=(NS,), crds=(crd(),), tls=pki, auth=auth, admin_token=ADMIN, work=tmp_path) as c:
        kubelet = Kubelet(c, work=tmp_path / "node", namespace=NS, instant=slow_success).start()
        try:
            yield c, auth
        finally:
            kubelet.stop()


def run_to_success(cluster, tmp_path, user: dict) -> tuple[OperatorProcess, dict]:
    tmp = tmp_path / "operator-tmp"
    tmp.mkdir()
    op = OperatorProcess(cluster, tmp_path / "operator", namespace=NS, interval=0.3, user=user,
                         env={"TMPDIR": str(tmp)}).start()
    try:
        cluster.create(RUNS, tiny_run(storage={"uri": f"file://{tmp_path}/store"}))
        status = wait_phase(cluster, NS, "tiny", timeout=90, operator=op)
        cluster.wait_for(lambda: any(e["reason"] == "RunSucceeded" for e in events_of(cluster, NS, "tiny")),
                         timeout=15, what="the RunSucceeded Event")
    finally:
        op.stop()
    assert not list(tmp.rglob("*")), f"the operator wrote files to its TMPDIR: {list(tmp.rglob('*'))}"
    return op, status


def test_ca_data_and_an_exec_plugin_with_an_expiring_token(tls_cluster, tmp_path):
    cluster, auth = tls_cluster
    script, counter = exec_plugin(tmp_path / "plugin", EXEC_KEY, ttl=TTL)
    op, status = run_to_success(cluster, tmp_path, exec_user(script))
    assert status["phase"] == "Succeeded"
    assert "exec" in auth.users
    runs = counter.read_text().count("run")
    # one login each for kopf's watches and for the operator's own client, then a fresh token
    # for the client's calls as each expires (the run lasts several TTLs)
    assert runs >= 3, f"the exec plugin ran {runs} time(s): its {TTL}s token was not refreshed"
    log = op.output()
    assert "exec." not in log and "Traceback" not in log, log[-3000:]


def test_client_certificate_data(tls_cluster, tmp_path, pki):
    cluster, auth = tls_cluster
    user = {"client-certificate-data": base64.b64encode(pki.client_cert).decode(),
            "client-key-data": base64.b64encode(pki.client_key).decode()}
    op, status = run_to_success(cluster, tmp_path, user)
    assert status["phase"] == "Succeeded"
    assert "cert:xwin-operator" in auth.users
    key_body = pki.client_key.decode().splitlines()[1]
    assert key_body not in op.output() and "Traceback" not in op.output()


@pytest.mark.parametrize("case, expect", [
    ("failing plugin", "the exec credential plugin"),
    pytest.param("garbage plugin", "its output is not an ExecCredential", marks=pytest.mark.slow),
    pytest.param("unreadable kubeconfig", "cannot be read", marks=pytest.mark.slow),
    ("refused token", "the API server refused the credentials (401 Unauthorized)"),
])
def test_a_bad_login_is_one_clear_line_and_no_crash(tls_cluster, tmp_path, case, expect):
    cluster, _ = tls_cluster
    plugin = tmp_path / "plugin"
    plugin.write_text("#!/bin/sh\necho 'token: hunter2-not-json'\n" if case == "garbage plugin"
                      else "#!/bin/sh\necho 'no credentials for this profile' >&2\nexit 3\n")
    plugin.chmod(0o755)
    user = {"token": "hunter2-expired-token"} if case == "refused token" else exec_user(plugin)
    op = OperatorProcess(cluster, tmp_path / "operator", namespace=NS, user=user)
    if case == "unreadable kubeconfig":
        bad = tmp_path / "bad-kubeconfig"
        bad.write_text("clusters: [unclosed\n")
        op.extra_env["KUBECONFIG"] = str(bad)
    op.start()
    try:
        deadline = time.monotonic() + 30
        while expect not in op.output() and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(1.0)
        log = op.output()
        assert expect in log, log[-3000:]
        assert op.alive, "the operator exited on a bad login (a crash loop in a Deployment)"
        assert "hunter2" not in log
        if case == "failing plugin":
            assert "exec: process returned 3" in log and "no credentials for this profile" in log
    finally:
        op.stop()
