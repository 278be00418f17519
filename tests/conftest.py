"""Shared fixtures. tests/ is not a package: helper modules here import by plain name."""

from s3_server import s3_auth_server, s3_bucket, s3_server  # noqa: F401  (moto ThreadedMotoServer on loopback)
