"""The Files and Batch API of the loopback judge server (judge_server.py), as a mixin of
JudgeServer: POST /v1/files, GET /v1/files/{id}[/content]; POST /v1/batches,
GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel; and the background processing of a
batch (validating -> in_progress for `batch_seconds` -> finalizing -> completed, with
injected per-line errors and malformed verdicts).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from judge_verdicts import comparison_key, error_response

if TYPE_CHECKING:
    from judge_server import Counters, ServerConfig


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


class FilesAndBatches:
    """Files + Batch API endpoints; the host class provides the state and helpers below."""

    config: "ServerConfig"
    counters: "Counters"
    files: dict[str, dict[str, Any]]
    batches: dict[str, dict[str, Any]]
    _tasks: set[asyncio.Task]

    if TYPE_CHECKING:
        def _auth(self, request: web.Request) -> web.Response | None: ...
        def _count(self, request: web.Request, route: str, status: int) -> None: ...
        def _draw(self, key: str, attempt: int, salt: str) -> random.Random: ...
        def answer(self, body: dict[str, Any], rng: random.Random, malformed_rate: float) -> tuple[str, bool]: ...
        def completion(self, body: dict[str, Any], reply: str) -> dict[str, Any]: ...

    # -- files
    async def upload(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            self._count(request, "/v1/files", 401)
            return denied
        form = await request.post()
        upload = form.get("file")
        purpose = str(form.get("purpose", ""))
        if upload is None or not hasattr(upload, "file"):
            self._count(request, "/v1/files", 400)
            return error_response(400, "a multipart 'file' field is required", "invalid_request_error")
        file_id = self._store_file(upload.file.read(), purpose, upload.filename)
        self._count(request, "/v1/files", 200)
        return web.json_response(self._file_view(file_id))

    def _file_view(self, file_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.files[file_id].items() if not k.startswith("_")}

    async def file_info(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            self._count(request, "/v1/files/{id}", 404)
            return error_response(404, f"No such File object: {file_id}", "invalid_request_error")
        self._count(request, "/v1/files/{id}", 200)
        return web.json_response(self._file_view(file_id))

    async def file_content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            self._count(request, "/v1/files/{id}/content", 404)
            return error_response(404, f"No such File object: {file_id}", "invalid_request_error")
        self._count(request, "/v1/files/{id}/content", 200)
        return web.Response(body=self.files[file_id]["_data"], content_type="application/octet-stream")

    def _store_file(self, data: bytes, purpose: str, name: str) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                               "created_at": int(time.time()), "filename": name,
                               "purpose": purpose, "status": "processed", "_data": data}
        return file_id

    # -- batches
    def _batch_view(self, batch_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    async def create_batch(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            self._count(request, "/v1/batches", 401)
            return denied
        body = await request.json()
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            self._count(request, "/v1/batches", 400)
            return error_response(400, f"input_file_id {file_id!r} does not exist", "invalid_request_error")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": file_id, "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata") or None}
        with self.counters.lock:
            self.counters.batches_created += 1
        task = asyncio.create_task(self._process_batch(batch_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._count(request, "/v1/batches", 200)
        return web.json_response(self._batch_view(batch_id))

    def _parse_batch_input(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(requests, problems) of a batch's input file: a line that is not a POST to the
        batch's endpoint with a fresh custom_id and messages is a problem; so is a batch
        over `batch_max_requests`."""
        lines = self.files[batch["input_file_id"]]["_data"].decode("utf-8").splitlines()
        requests, problems, seen = [], [], set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                assert item["method"] == "POST" and item["url"] == batch["endpoint"]
                assert item["custom_id"] not in seen and item["body"]["messages"]
            except Exception:  # noqa: BLE001
                problems.append({"code": "invalid_request", "line": number,
                                 "message": f"line {number} is not a valid batch request"})
                continue
            seen.add(item["custom_id"])
            requests.append(item)
        if len(requests) > self.config.batch_max_requests:
            problems.append({"code": "too_many_requests", "line": None,
                             "message": f"a batch holds at most {self.config.batch_max_requests} requests"})
        return requests, problems

    async def _process_batch(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        requests, problems = self._parse_batch_input(batch)
        if problems:
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": problems[:10]})
            return
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = len(requests)
        await asyncio.sleep(self.config.batch_seconds)
        if batch["status"] != "in_progress":
            return   # cancelled meanwhile
        out, err = [], []
        for item in requests:
            body = item["body"]
            key = comparison_key(body["messages"], str(body.get("model")))
            with self.counters.lock:
                attempt = self.counters.asks_by_comparison[key]
                self.counters.asks_by_comparison[key] += 1
                self.counters.batch_requests += 1
            rng = self._draw(key, attempt, "batch")
            row_id = f"batch_req_{uuid.uuid4().hex[:24]}"
            if rng.random() < self.config.batch_rate_error:
                err.append({"id": row_id, "custom_id": item["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": row_id,
                                         "body": {"error": {"message": "server error (injected)",
                                                            "type": "server_error", "code": None}}}})
                batch["request_counts"]["failed"] += 1
                continue
            reply, valid = self.answer(body, rng, self.config.batch_rate_malformed)
            out.append({"id": row_id, "custom_id": item["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": row_id,
                                     "body": self.completion(body, reply)}})
            identical = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            with self.counters.lock:
                self.counters.paid_by_comparison[key] += 1
                self.counters.batch_paid_by_request[identical] += 1
                if valid:
                    self.counters.valid_by_comparison[key] += 1
                    self.counters.valid_times.setdefault(key, []).append(time.time())
            batch["request_counts"]["completed"] += 1
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        if out:
            batch["output_file_id"] = self._store_file(_jsonl(out), "batch_output", f"{batch_id}_output.jsonl")
        if err:
            batch["error_file_id"] = self._store_file(_jsonl(err), "batch_output", f"{batch_id}_error.jsonl")
        batch.update(status="completed", completed_at=int(time.time()))

    async def get_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if batch_id not in self.batches:
            self._count(request, "/v1/batches/{id}", 404)
            return error_response(404, f"No such Batch: {batch_id}", "invalid_request_error")
        self._count(request, "/v1/batches/{id}", 200)
        return web.json_response(self._batch_view(batch_id))

    async def list_batches(self, request: web.Request) -> web.Response:
        limit = min(100, int(request.query.get("limit", 20)))
        after = request.query.get("after")
        ordered = sorted(self.batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
        if after:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        self._count(request, "/v1/batches", 200)
        return web.json_response({"object": "list", "data": [self._batch_view(b["id"]) for b in page],
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None,
                                  "has_more": len(ordered) > limit})

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if batch_id not in self.batches:
            return error_response(404, f"No such Batch: {batch_id}", "invalid_request_error")
        batch = self.batches[batch_id]
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        return web.json_response(self._batch_view(batch_id))
