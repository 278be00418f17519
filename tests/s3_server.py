"""A real S3 endpoint for tests: moto's ThreadedMotoServer on 127.0.0.1, a free port.

Fixtures (wire them in tests/conftest.py with `from s3_server import s3_server, s3_bucket`):
- `s3_server` (session): starts the server once, sets fake AWS credentials in the environment
  for the session (and points boto3 away from any user config), yields an `S3Server` with the
  `endpoint_url` and `env` (the variables a subprocess needs to talk to it).
- `s3_bucket` (function): a fresh, uniquely named bucket on that server, as `s3://name`.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def make_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        try:
            yield S3Server(url, env={**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL_S3": url})
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.make_bucket()


@dataclass
class AuthS3Server:
    """A moto server that checks credentials: only `key` (an IAM user's access key allowed
    s3:*) is accepted; anything else, the session's fake credentials included, is refused."""

    endpoint_url: str
    key: dict[str, str]      # {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.key["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.key["AWS_SECRET_ACCESS_KEY"], aws_session_token=None)

    def make_bucket(self, prefix: str = "auth") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_auth_server(s3_server):
    """A moto server in its own process with authentication on (its first three calls, which
    make the IAM user, its key and its policy, are the only unauthenticated ones)."""
    import json
    import subprocess
    import sys
    import time

    import boto3

    port = closed_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
        deadline = time.monotonic() + 30
        while True:
            try:
                iam.create_user(UserName="xwin-run")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        key = iam.create_access_key(UserName="xwin-run")["AccessKey"]
        iam.put_user_policy(UserName="xwin-run", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        yield AuthS3Server(url, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})
    finally:
        proc.terminate()
        proc.wait(10)
