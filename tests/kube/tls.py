"""TLS and authentication for the test API server, as a real cluster has them.

* `make_pki()`: a CA made for the test, a server certificate for 127.0.0.1/localhost and a
  client certificate (CN `xwin-operator`), all PEM bytes (`cryptography`).
* `TokenAuth`: the API server's authenticator: a client certificate signed by the CA, a static
  admin token (the test's own client, the kubelet), or a token of the exec plugin below that
  has not expired. Anything else is 401.
* `exec_plugin(...)`: a kubectl/client-go exec credential plugin (a Python script) printing an
  ExecCredential whose token expires `ttl` seconds after it is printed; its
  `expirationTimestamp` is that plus REFRESH_AHEAD (clients fetch a new token that long before
  the stamp), so clients refresh it every `ttl` seconds. It counts its runs in a file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REFRESH_AHEAD = 300  # seconds: the official Python client's (and ours) refresh margin


@dataclass
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    files: dict[str, Path] = field(default_factory=dict)

    def server_context(self, folder: Path) -> ssl.SSLContext:
        """The server's TLS: its certificate, client certificates verified when offered."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / "server.crt", folder / "server.key"
        cert.write_bytes(self.server_cert)
        key.write_bytes(self.server_key)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cadata=self.ca.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.decode())


def make_pki() -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("xwin-test-ca")).issuer_name(name("xwin-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    server_cert, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = leaf("xwin-operator", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca.public_bytes(serialization.Encoding.PEM), server_cert, server_key, client_cert, client_key)


class TokenAuth:
    """Who may call the API server (see the module docstring); counts what it refused."""

    def __init__(self, admin_token: str, exec_key: str, ttl: float, grace: float = 2.0):
        self.admin_token, self.exec_key, self.ttl, self.grace = admin_token, exec_key.encode(), ttl, grace
        self.refused = 0
        self.users: set[str] = set()

    def __call__(self, authorization: str | None, peercert: dict | None) -> bool:
        if peercert:
            subject = dict(x[0] for x in peercert.get("subject", ()))
            self.users.add(f"cert:{subject.get('commonName')}")
            return True
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token and hmac.compare_digest(token, self.admin_token):
            return True
        if token.startswith("exec."):
            _, issued, sig = (token.split(".") + ["", ""])[:3]
            good = hmac.new(self.exec_key, issued.encode(), hashlib.sha256).hexdigest()
            if hmac.compare_digest(sig, good) and time.time() - int(issued) / 1000 <= self.ttl + self.grace:
                self.users.add("exec")
                return True
        self.refused += 1
        return False


EXEC_PLUGIN = '''#!{python}
import datetime, hashlib, hmac, json, time
with open({counter!r}, "a") as f:
    f.write("run\\n")
issued = str(int(time.time() * 1000))  # milliseconds
token = "exec." + issued + "." + hmac.new({key!r}.encode(), issued.encode(), hashlib.sha256).hexdigest()
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds={ttl} + {ahead})
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {{"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}}}))
'''


def exec_plugin(folder: Path, key: str, ttl: float) -> tuple[Path, Path]:
    """(the plugin script, its run counter file)."""
    folder.mkdir(parents=True, exist_ok=True)
    script, counter = folder / "xwin-test-credential", folder / "exec-runs.txt"
    script.write_text(EXEC_PLUGIN.format(python=sys.executable, counter=str(counter), key=key, ttl=ttl,
                                         ahead=REFRESH_AHEAD))
    script.chmod(0o755)
    return script, counter


def exec_user(script: Path) -> dict:
    """A kubeconfig `user` running the plugin, as EKS's and GKE's kubeconfigs do."""
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(script),
                     "interactiveMode": "Never"}}
