"""The S3 key the operator reads a run's store with: the run's own `storage.secretRef`
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN), read from the run's
namespace, the same Secret its pods get. The operator's own environment is only the fallback,
for a run without a secretRef or while its Secret does not exist yet (the planner holds the
run's children back and says so). A Secret is read again every `ttl` seconds, so a rotated
key is picked up; a Secret without a needed key blocks the run naming the Secret and the key.
The key lives in memory only: never in status, Events, logs or files.
"""

from __future__ import annotations

import time
from typing import Any

from xwin_jobs.store_s3 import S3Credentials

from .blocked import Blocked, api_refusal
from .client import ApiError

KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SESSION_TOKEN = "AWS_SESSION_TOKEN"
TTL = 30.0  # seconds a Secret read is reused before it is read again


class StoreCredentials:
    def __init__(self, api: Any, ttl: float = TTL, on_replaced: Any = None) -> None:
        """`on_replaced(credentials)`: called with a key that a newer version of its Secret replaced."""
        self.api, self.ttl, self.on_replaced = api, ttl, on_replaced
        self._cache: dict[tuple[str, str], tuple[float, str, S3Credentials | None]] = {}

    async def get(self, namespace: str, name: str | None) -> S3Credentials | None:
        """The key of Secret `name` in `namespace`; None without a secretRef or a Secret (the
        operator's environment then)."""
        if not name:
            return None
        key, now = (namespace, name), time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[2]
        try:
            found = await self.api.read_secret(namespace, name)
        except ApiError as e:
            raise api_refusal(f"cannot read Secret '{name}' (spec.storage.secretRef) in namespace "
                              f"'{namespace}' for the store", e.status, str(e)) from None
        if found is None:
            self._cache[key] = (now, "", None)
            return None
        version, data = found
        if cached is not None and cached[1] == version:
            self._cache[key] = (now, version, cached[2])
            return cached[2]
        absent = [k for k in KEYS if not data.get(k)]
        if absent:
            raise Blocked("SecretKeyNotFound", f"spec.storage.secretRef: Secret '{name}' in namespace '{namespace}' "
                          f"has no key {' or '.join(absent)} (it needs {' and '.join(KEYS)})")
        credentials = S3Credentials(data[KEYS[0]].strip(), data[KEYS[1]].strip(),
                                    (data.get(SESSION_TOKEN) or "").strip() or None)
        if cached is not None and cached[2] is not None and cached[2] != credentials and self.on_replaced:
            self.on_replaced(cached[2])
        self._cache[key] = (now, version, credentials)
        return credentials
