"""The batch judge: the OpenAI Batch API (half the price, results within 24 hours).

One round: the requests not yet judged become JSON Lines (`custom_id` = the judgment key),
uploaded as a file, submitted as one batch per `batchMaxRequests` (OpenAI's limit: 50,000
requests and 200 MB per batch), polled until done, and the output and error files are mapped
back by `custom_id` into the judgment cache (one shard per batch). Unparseable replies with
re-asks left and transient per-request errors go into a next round, so a run takes one
submission per chunk unless something has to be asked again.

Resuming: the state file (`<stage>/judge/batch.json`) records every batch as soon as it is
created; a restarted job polls those instead of submitting again. A kill between creating a
batch and recording it is covered too: every batch carries the digest of its input in its
metadata, and before creating one the job looks for a batch with that digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from typing import Any, Awaitable, Callable

from ..store import Store
from .cache import JudgmentCache
from .client import _Refused, _Retry, backoff_delay, classify
from .core import (REFUSAL_CODES, JudgeError, JudgeRequest, JudgeRun, JudgeSettings, add_usage, is_final,
                   make_client, new_entry, redact)
from .cost import Budget
from .templates import reask_messages
from .verdict import Unparseable, parse_verdict

log = logging.getLogger("xwin_jobs.judge")
TERMINAL = ("completed", "failed", "expired", "cancelled")
DIGEST_KEY = "xwin_digest"
ENDPOINT = "/v1/chat/completions"


def request_line(request: JudgeRequest, messages: list[dict[str, str]],
                 settings: JudgeSettings) -> bytes:
    body = {"model": settings.model, "messages": messages, "temperature": settings.temperature,
            "max_tokens": settings.max_tokens}
    return (json.dumps({"custom_id": request.key, "method": "POST", "url": ENDPOINT,
                        "body": body}, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def chunk_lines(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[bytes]]:
    """Consecutive chunks of at most `max_requests` lines and `max_bytes` bytes each."""
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if len(line) > max_bytes:
            raise JudgeError(f"one batch request is {len(line)} bytes, over the per-batch "
                             f"file limit of {max_bytes}")
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(current)
    return chunks


def _parse_jsonl(text: str, what: str) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JudgeError(f"{what}: line {number}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            raise JudgeError(f"{what}: line {number}: no custom_id")
        out.append(obj)
    return out


class BatchJudge:
    """Judges requests through the Batch API; see the module docstring."""

    def __init__(self, settings: JudgeSettings, cache: JudgmentCache, budget: Budget,
                 store: Store, state_uri: str, client: Any = None,
                 rng: random.Random | None = None, max_rounds: int | None = None):
        self.settings, self.cache, self.budget = settings, cache, budget
        self.store, self.state_uri, self.client = store, state_uri, client
        self.rng = rng or random.Random()
        self.max_rounds = max_rounds or (2 + settings.max_reasks + settings.max_attempts)
        self.state: dict[str, Any] = {}
        self.progress: Any = None  # the step's live record (xwin_jobs.progress.ProgressWriter)

    # -- state
    def _load_state(self) -> None:
        if self.store.exists(self.state_uri):
            self.state = self.store.read_json(self.state_uri)
        if not self.state.get("batches"):
            self.state = {"version": 1, "startedAt": time.time(), "batches": [], "errors": {}}
        self.state.setdefault("errors", {})

    def _save_state(self) -> None:
        self.store.write_json(self.state_uri, self.state)

    # -- API calls with retries
    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                outcome = classify(e)
            if isinstance(outcome, _Refused):
                raise JudgeError(f"{what}: {outcome}")
            if not isinstance(outcome, _Retry):
                raise outcome
            if attempt >= self.settings.max_attempts:
                raise JudgeError(f"{what}: {outcome} (gave up after {attempt} attempts)")
            await asyncio.sleep(backoff_delay(attempt, outcome.retry_after,
                                              self.settings.backoff_base_s,
                                              self.settings.backoff_max_s, self.rng.random()))

    # -- the run
    async def run(self, requests: list[JudgeRequest]) -> JudgeRun:
        run = JudgeRun()
        started = time.monotonic()
        by_key = {r.key: r for r in requests}
        run.stats["cached"] = sum(1 for r in requests
                                  if is_final(self.cache.get(r.key), self.settings.max_reasks))
        own_client = self.client is None
        if own_client:
            self.client = make_client(self.settings)
        try:
            self._load_state()
            for b in self.state["batches"]:   # resume: poll what was submitted before
                if not b.get("collected"):
                    run.stats["resumed_batches"] += 1
            await self._collect_all(by_key, run)
            for round_no in range(self.max_rounds):
                pending = [r for r in requests if not is_final(self.cache.get(r.key), self.settings.max_reasks)
                           and self.state["errors"].get(r.key, 0) < self.settings.max_attempts]
                if not pending:
                    break
                submitted = await self._submit(pending, run)
                if not submitted:
                    break
                await self._collect_all(by_key, run)
                self._report(requests)
                if run.budget_stopped:
                    break
        finally:
            if own_client:
                await self.client.close()
                self.client = None
        for r in requests:
            entry = self.cache.get(r.key)
            if is_final(entry, self.settings.max_reasks):
                run.judgments[r.key] = entry
            elif self.state["errors"].get(r.key, 0) >= self.settings.max_attempts:
                run.failed[r.key] = "failed in every batch it was sent in"
        run.stats["failed"] = len(run.failed)
        run.seconds = time.monotonic() - started
        return run

    def _report(self, requests: list[JudgeRequest]) -> None:
        if self.progress is not None:
            done = sum(1 for r in requests if is_final(self.cache.get(r.key), self.settings.max_reasks))
            self.progress.update(done, usd=self.budget.spent_usd)

    def _messages_for(self, request: JudgeRequest) -> list[dict[str, str]]:
        entry = self.cache.get(request.key)
        if entry and entry["status"] == "unparseable" and entry.get("asks"):
            return reask_messages(request.messages, entry.get("reply") or "",
                                  entry.get("problem") or "unparseable", request.template)
        return request.messages

    async def _submit(self, pending: list[JudgeRequest], run: JudgeRun) -> int:
        """Submit the pending requests that fit the budget; returns how many."""
        s = self.settings
        lines: list[bytes] = []
        for r in pending:
            messages = self._messages_for(r)
            probe = JudgeRequest(r.key, r.template, messages)
            tokens = probe.estimated_tokens(s.max_tokens)
            if not self.budget.try_reserve(s.price.cost(tokens - s.max_tokens, s.max_tokens, batch=True)):
                run.budget_stopped = True
                break
            lines.append(request_line(r, messages, s))
        for chunk in chunk_lines(lines, s.batch_max_requests, s.batch_max_bytes):
            await self._create(b"".join(chunk), len(chunk), run)
        # reservations are replaced by real usage when the results are collected
        self.budget.reserved_usd = 0.0
        return len(lines)

    async def _create(self, data: bytes, count: int, run: JudgeRun) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        record = next((b for b in self.state["batches"] if b["digest"] == digest and not b.get("collected")), None)
        if record is None:
            record = {"digest": digest, "requests": count, "id": None, "collected": False}
            self.state["batches"].append(record)
        if record.get("id") is None:
            found = await self._find_by_digest(digest)
            if found is not None:
                record["id"] = found
                run.stats["adopted_batches"] += 1
                log.info("judge: found batch %s submitted before the restart", found)
            else:
                if not record.get("inputFileId"):
                    upload = await self._call("uploading the batch input", lambda: self.client.files.create(
                        file=(f"xwin-judge-{digest[:16]}.jsonl", data), purpose="batch"))
                    record["inputFileId"] = upload.id
                    self._save_state()
                batch = await self._call("creating the batch", lambda: self.client.batches.create(
                    input_file_id=record["inputFileId"], endpoint=ENDPOINT, completion_window="24h",
                    metadata={DIGEST_KEY: digest}))
                record["id"] = batch.id
                run.stats["batches_submitted"] += 1
                log.info("judge: submitted batch %s (%d requests)", batch.id, count)
        self._save_state()
        return record

    async def _find_by_digest(self, digest: str) -> str | None:
        """A batch created for this input before a restart (OpenAI lists newest first)."""
        since = float(self.state.get("startedAt", 0)) - 3600
        page = await self._call("listing batches", lambda: self.client.batches.list(limit=100))
        done = {b["id"] for b in self.state["batches"] if b.get("collected")}
        async for batch in page:
            if (getattr(batch, "metadata", None) or {}).get(DIGEST_KEY) == digest and \
                    batch.id not in done and batch.status != "failed":
                return batch.id
            if getattr(batch, "created_at", 0) and batch.created_at < since:
                break
        return None

    async def _collect_all(self, by_key: dict[str, JudgeRequest], run: JudgeRun) -> None:
        open_batches = [b for b in self.state["batches"] if b.get("id") and not b.get("collected")]
        last_log = 0.0
        while open_batches:
            for record in list(open_batches):
                batch = await self._call("polling the batch", lambda: self.client.batches.retrieve(record["id"]))
                record["status"] = batch.status
                if batch.status in TERMINAL:
                    await self._collect(record, batch, by_key, run)
                    open_batches.remove(record)
                elif time.monotonic() - last_log > 60:
                    counts = getattr(batch, "request_counts", None)
                    log.info("judge: batch %s %s (%s)", record["id"], batch.status,
                             counts.model_dump() if counts is not None else "")
                    last_log = time.monotonic()
            if open_batches:
                await asyncio.sleep(self.settings.poll_interval_s)

    async def _download(self, file_id: str, what: str) -> list[dict[str, Any]]:
        content = await self._call(f"downloading the batch {what} file",
                                   lambda: self.client.files.content(file_id))
        return _parse_jsonl(content.text, f"batch {what} file {file_id}")

    async def _collect(self, record: dict[str, Any], batch: Any,
                       by_key: dict[str, JudgeRequest], run: JudgeRun) -> None:
        rows: list[dict[str, Any]] = []
        for file_id, what in ((getattr(batch, "output_file_id", None), "output"),
                              (getattr(batch, "error_file_id", None), "error")):
            if file_id:
                rows += await self._download(file_id, what)
        if batch.status == "failed" and not rows:
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            detail = "; ".join(redact(str(getattr(e, "message", e))) for e in errors[:3])
            record["collected"] = True
            self._save_state()
            raise JudgeError(f"batch {record['id']} failed: {detail or 'no reason given'}")
        entries = []
        for row in rows:
            request = by_key.get(row["custom_id"])
            if request is None:
                continue   # not ours any more (inputs changed); never guess
            entry = self._entry_from_row(request, row, record["id"], run)
            if entry is not None:
                entries.append(entry)
        self.cache.put_many(entries, f"batch-{record['id']}")
        record["collected"] = True
        run.stats["batch_results"] += len(rows)
        self._save_state()
        log.info("judge: batch %s %s: %d results", record["id"], batch.status, len(rows))

    def _entry_from_row(self, request: JudgeRequest, row: dict[str, Any], batch_id: str,
                        run: JudgeRun) -> dict[str, Any] | None:
        s = self.settings
        entry = dict(self.cache.get(request.key) or new_entry(request, s, "batch"))
        if batch_id in entry.get("batches", []):
            return None   # collected before a restart
        response = row.get("response") or {}
        status = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if row.get("error") or status != 200:
            error = row.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
            code = str(error.get("code") or "")
            if status in (400, 422) and code in REFUSAL_CODES:
                entry.update(status="refused", problem=f"HTTP {status} {code}", mode="batch")
                entry["batches"] = [*entry.get("batches", []), batch_id]
                run.stats["refused"] += 1
                return entry
            self.state["errors"][request.key] = self.state["errors"].get(request.key, 0) + 1
            run.stats["transient_errors"] += 1
            return None
        choice = (body.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        usage = body.get("usage") or {}
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        add_usage(entry, p, c, s.price.cost(p, c, batch=True))
        self.budget.spent_usd += s.price.cost(p, c, batch=True)
        entry["batches"] = [*entry.get("batches", []), batch_id]
        entry["reply"], entry["mode"] = text, "batch"
        run.stats["asks"] += 1
        parsed = parse_verdict(request.kind, text)
        if isinstance(parsed, Unparseable):
            entry.update(status="unparseable", problem=parsed.problem, verdict=None)
            run.stats["unparseable_replies"] += 1
            if not is_final(entry, s.max_reasks):
                run.stats["reasks"] += 1
        else:
            entry.update(status="ok", problem=None, verdict=parsed.to_dict())
        return entry
