# Operator-wide settings (images, ports, backoffs, the store override): one frozen dataclass,
# read from XWIN_* variables by `OperatorConfig.from_env`. Pure.
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from ..api.spec import AlignmentRun


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings (env `XWIN_<FIELD IN UPPER CASE>` in `from_env`)."""

    trainer_image: str = "ghcr.io/xwin-align/xwin-trainer:0.1.0"
    sampler_image: str = "ghcr.io/xwin-align/xwin-sampler:0.1.0"
    annotator_image: str = "ghcr.io/xwin-align/xwin-annotator:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: str = ""       # imagePullSecrets of child pods: Secret names, comma-separated
    service_account: str = ""          # serviceAccountName of child pods ("" = namespace default)
    server_port: int = 8000            # vLLM port
    pod_backoff_limit: int = 3         # pod restarts inside one attempt (preemption, OOM kill)
    backoff_seconds: float = 10.0      # wait before attempt 2; doubles each attempt
    backoff_max_seconds: float = 600.0
    job_cpu: str = "1"                 # requests of sampler and judge pods
    job_memory: str = "2Gi"
    store: str = ""                    # replaces spec.storage.uri (tests); "" = the spec's
    secret_ttl_seconds: float = 30.0   # a Secret seen is read / looked up again after this (a rotated key)
    reconcile_interval: float = 3.0    # seconds between passes of a run waiting on what no event announces
    idle_factor: int = 10              # a run waiting on its children: a pass every idle_factor intervals
    progress_seconds: float = 20.0     # a pass at least this often while a stage's pods run (their progress)
    stall_seconds: float = 900.0       # a running step whose progress has not moved this long: stalled
    metrics_port: int = 8080           # Prometheus /metrics (kube/metrics.py) on 0.0.0.0:PORT; 0 = none

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"XWIN_{f.name.upper()}")
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)

    def image(self, run: AlignmentRun, which: str) -> str:
        return getattr(run.spec.images, which) or getattr(self, f"{which}_image")
