"""Fault injection for the loopback judge server (judge_server.py): the seeded draw that
decides a request's faults, which fault a draw picks, the requests-per-window limit, and
whether a client has hung up."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections import deque
from typing import Any

from aiohttp import web


def seeded_rng(seed: int, key: str, attempt: int, salt: str) -> random.Random:
    """The generator for the `attempt`-th ask of comparison `key`: a re-run meets the same
    faults."""
    digest = hashlib.sha256(f"{seed}:{key}:{attempt}:{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def pick_fault(roll: float, config: Any) -> str | None:
    """The fault a uniform `roll` in [0, 1) picks: "429", "5xx", "timeout", "garbage" or
    None, with the fault rates of `config` (a ServerConfig) laid end to end."""
    edges = [("429", config.rate_429), ("5xx", config.rate_5xx), ("timeout", config.rate_timeout),
             ("garbage", config.rate_garbage_body)]
    edge = 0.0
    for name, rate in edges:
        edge += rate
        if roll < edge:
            return name
    return None


class RequestWindow:
    """A sliding requests-per-window limit."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def clear(self) -> None:
        self.times.clear()

    def wait_or_admit(self, limit: int | None, window_s: float) -> float | None:
        """Seconds until a slot frees, when the window is full; else None (and the request
        takes a slot). No limit admits everything."""
        if not limit:
            return None
        now = time.monotonic()
        while self.times and self.times[0] <= now - window_s:
            self.times.popleft()
        if len(self.times) >= limit:
            return max(0.001, self.times[0] + window_s - now)
        self.times.append(now)
        return None


def client_gone(request: web.Request) -> bool:
    """Whether the client has hung up: the transport says so, or its socket shows an
    end-of-stream or a reset that the event loop has not processed yet (a killed client's
    kernel closes the connection at once)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
    except OSError:
        return True
    try:
        return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        dup.close()
