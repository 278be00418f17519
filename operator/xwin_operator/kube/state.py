"""The operator's parts and each run's state while its daemon lives, kept in kopf's memo
(handlers.configure): read by the reconciler and the observer, set by the handlers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from xwin_jobs.progress import ProgressReader

from ..core.config import OperatorConfig
from .client import KubeApi
from .kubeconfig import Login
from .metrics import Metrics
from .store_credentials import StoreCredentials
from .store_reader import StoreReader


@dataclass
class RunState:
    """What the operator keeps of one run while its daemon lives: the wake-up a change of its
    children or spec sets, the status it last wrote (newer than a body the watch has not caught
    up with), its spec parsed for the generation last reconciled, and the block last reported."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int | None = None
    run: Any = None                  # the spec parsed, for `generation`
    tasks: dict | None = None        # planner.stage_tasks(run) for that generation
    status: dict | None = None
    blocked: str | None = None
    seen: dict[str, Any] = field(default_factory=dict)   # "Kind/name" -> what its last event showed
    progress: ProgressReader = field(default_factory=ProgressReader)  # its steps' last good progress records


@dataclass
class Operator:
    """The operator's parts, in kopf's memo (handlers.configure): the API client, the store
    reader, the settings, its metrics (and their /metrics server while it runs), and the state
    of each run whose daemon is running."""

    api: KubeApi
    store: StoreReader
    config: OperatorConfig
    login: Callable[[], Login]
    runs: dict[tuple[str, str], RunState] = field(default_factory=dict)   # (namespace, name) -> state
    secrets_found: dict[tuple[str, str], float] = field(default_factory=dict)  # -> when last found
    credentials: StoreCredentials | None = None   # the runs' store keys (store_credentials.py)
    metrics: Metrics = field(default_factory=Metrics)   # its own registry (metrics.py)
    metrics_server: Any = None                    # metrics.serve's runner, while it serves

    def __post_init__(self) -> None:
        if self.credentials is None:
            self.credentials = StoreCredentials(self.api, ttl=self.config.secret_ttl_seconds,
                                                on_replaced=self.store.forget)

    @property
    def interval(self) -> float:
        return self.config.reconcile_interval

    @property
    def idle(self) -> float:
        """The safety resync of a run waiting on its child (seconds): its changes wake it."""
        return self.config.idle_factor * self.config.reconcile_interval
