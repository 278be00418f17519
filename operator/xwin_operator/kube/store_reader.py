"""The operator's store reads: the stages' `_SUCCESS.json` markers, the existence of external
inputs and their fingerprints (what their contents are: xwin_jobs.fingerprint), read with
xwin_jobs' Store in worker threads (boto3 is synchronous); the endpoint is the run's
`storage.endpoint`. Errors are
xwin_jobs' `StoreError`.

Credentials: each call names the S3 access key to use (`credentials`, an S3Credentials read
from the run's `storage.secretRef` by the reconciler), or None for the operator's own
environment (boto3's chain): one client per endpoint and key, a new one when the key changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

FINGERPRINT_TTL = 30.0  # seconds a fingerprint is reused before the store is asked again
INVISIBLE = ""          # a file:// input this process cannot see (remembered like a fingerprint)


class StoreReader:
    """Markers and input existence, through xwin_jobs.store.Store (one per endpoint)."""

    def __init__(self, fingerprint_ttl: float = FINGERPRINT_TTL) -> None:
        self._stores: dict[tuple, Any] = {}
        self._seen_inputs: set[tuple] = set()   # (endpoint, key, URI) found once: not probed again
        self._ttl = fingerprint_ttl
        self._prints: dict[tuple, Any] = {}  # (endpoint, key) -> xwin_jobs.fingerprint.Fingerprints

    def store(self, endpoint: str | None, credentials: Any = None) -> Any:
        key = (endpoint, credentials)
        if key not in self._stores:
            from xwin_jobs.store import Store

            # short connect timeout, two tries: an unreachable endpoint is reported within a reconcile
            self._stores[key] = Store(endpoint_url=endpoint, connect_timeout=5.0, max_attempts=2,
                                      credentials=credentials)
        return self._stores[key]

    def forget(self, credentials: Any) -> None:
        """Drop the clients of a key that was replaced (a rotated Secret)."""
        for cache in (self._stores, self._prints):
            for key in [k for k in cache if k[1] == credentials]:
                del cache[key]

    async def markers(self, endpoint: str | None, stage_uris: dict[str, str],
                      credentials: Any = None) -> dict[str, dict | None]:
        from xwin_jobs.store import read_marker

        store = self.store(endpoint, credentials)

        def read_all() -> dict[str, dict | None]:
            return {stage: read_marker(store, uri) for stage, uri in stage_uris.items()}
        # in a worker thread also for file://: a file system call on the event loop hands the
        # GIL to the API client's busy worker threads and waits up to a switch interval (5 ms)
        # to get it back (a marker's stat took 1.7 ms of the loop's time on average under the
        # operator benchmark, against 5-12 us alone); the hop costs the loop far less
        return await asyncio.to_thread(read_all)

    async def missing(self, endpoint: str | None, uris: list[str], credentials: Any = None) -> list[str]:
        """The s3:// URIs among `uris` with nothing at or under them. Only s3:// is probed: the
        operator cannot see the pods' file systems, and hf:// is resolved by the pods."""
        store = self.store(endpoint, credentials)

        def exists(uri: str) -> bool:
            return store.exists(uri) or (not uri.endswith("/") and store.exists(uri + "/"))

        todo = [u for u in dict.fromkeys(uris)
                if (endpoint, credentials, u) not in self._seen_inputs and u.startswith("s3://")]
        found = await asyncio.gather(*(asyncio.to_thread(exists, u) for u in todo))
        self._seen_inputs.update((endpoint, credentials, u) for u, ok in zip(todo, found) if ok)
        return [u for u, ok in zip(todo, found) if not ok]

    async def fingerprints(self, endpoint: str | None, uris: list[str], scope: Any = None,
                           credentials: Any = None) -> dict[str, str]:
        """{URI: fingerprint} of the inputs among `uris` this process can see: s3:// and hf://,
        and file:// paths that exist here (a pod's own volume is not visible to the
        operator: its stage's marker stands for it). An answer is reused for `FINGERPRINT_TTL`
        seconds within one `scope` (a run's uid and generation: a new run or a spec change
        looks again): a reconcile every few seconds costs one S3 HEAD per input per 30 s."""
        from xwin_jobs.fingerprint import Fingerprints
        from xwin_jobs.store_uri import file_path, scheme_of

        store = self.store(endpoint, credentials)
        prints = self._prints.setdefault((endpoint, credentials), Fingerprints(ttl=self._ttl))
        known = {u: prints.cached(u, scope) for u in uris}   # on the loop: no I/O
        todo = [u for u, value in known.items() if value is None]

        def look() -> None:  # one thread hop for every input not known yet
            for u in todo:
                visible = scheme_of(u) != "file" or file_path(u).exists()
                known[u] = prints.remember(u, scope, prints.look(store, u) if visible else INVISIBLE)
        if todo:
            await asyncio.to_thread(look)
        return {u: value for u, value in known.items() if value != INVISIBLE}
