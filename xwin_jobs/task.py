"""The contract between a planner and a stage job: one `StageTask` per stage step.

The operator (or `xwin run`) resolves an AlignmentRun into one task per stage: where the
stage's inputs are, where it writes, and its fully-resolved parameters (defaults merged in).
The job (`python -m xwin_jobs <stage> --task FILE|JSON`) needs nothing else: no spec parsing,
no knowledge of other stages. Keeping this a plain JSON document lets a pod receive it as an
environment variable or a file and lets a stage be re-run by hand.

Pure: no heavy imports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class StageTask:
    """Everything one stage job needs.

    stage: the stage key of docs/design.md (`sft`, `rewardModel`, `rejectionSampling`, `dpo`, ...).
    output: the stage's artifact folder URI, e.g. `s3://b/runs/ns/name/sft/` (trailing slash).
    inputs: named input URIs. Model inputs point at a Hugging Face folder (`.../sft/model/`
        or a user's `from:` URI); data inputs at a JSON Lines file or a folder of shards.
    markers: stage folders whose `_SUCCESS.json` must exist before any input is read
        (the planner lists the producing stage of every input that came from this run;
        inputs given with `from:` have none).
    params: the stage's own fields, resolved (e.g. `training`, `topK`, `beta`, ...).
    chat_template: `vicuna` or `tokenizer`.
    run: `{"namespace": ..., "name": ...}` for logs and metadata.
    """

    stage: str
    output: str
    inputs: dict[str, str] = field(default_factory=dict)
    markers: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    chat_template: str = "vicuna"
    run: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The task as JSON (its fields hold JSON values only: dataclasses.asdict's deep copy
        of every value would give the same text, three times slower)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageTask":
        known = {k: d[k] for k in ("stage", "output", "inputs", "markers", "params",
                                    "chat_template", "run") if k in d}
        missing = {"stage", "output"} - known.keys()
        if missing:
            raise ValueError(f"task is missing field(s): {', '.join(sorted(missing))}")
        return cls(**known)

    @classmethod
    def load(cls, text_or_path: str) -> "StageTask":
        """Accepts inline JSON or a path to a JSON file."""
        s = text_or_path.strip()
        if s.startswith("{"):
            try:
                return cls.from_dict(json.loads(s))
            except json.JSONDecodeError as e:
                raise ValueError(f"task JSON: {e}") from None
        p = Path(text_or_path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ValueError(f"task file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {e.lineno}: {e.msg}") from None

    def digest(self, marker_digests: dict[str, str] | None = None) -> str:
        """Identity of this stage's inputs: params, input URIs, the digests recorded in the
        markers of the stages it reads and the fingerprints of its external inputs (both from
        `upstream_digests`). Same digest = same work = skip."""
        body = {
            "stage": self.stage,
            "inputs": self.inputs,
            "params": self.params,
            "chat_template": self.chat_template,
            "upstream": marker_digests or {},
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def upstream_digests(store: Any, task: StageTask, fingerprints: Any = None) -> dict[str, str]:
    """What the stage's inputs are now: the digests recorded in the markers of the stages this
    task reads, by stage folder, and the fingerprint of each external input (one the run does
    not make: xwin_jobs.fingerprint), by URI. `task.digest(upstream_digests(...))` is the
    stage's identity.

    Raises MissingInputError (from xwin_jobs.store) naming the first stage without a marker:
    a stage never reads an input that has not finished. The one implementation: the jobs and
    the planners (`xwin run`, the operator) must compute the same digest to agree on what is
    done. `fingerprints`: a fingerprint.Fingerprints to reuse (hashes kept by size and mtime)."""
    from .fingerprint import Fingerprints, external_inputs
    from .store import as_folder, require_marker

    out = {as_folder(uri): str(require_marker(store, uri).get("digest", "")) for uri in task.markers}
    prints = fingerprints or Fingerprints()
    out.update({uri: prints.of(store, uri) for uri in external_inputs(task).values()})
    return out


def done_marker(store: Any, task: StageTask, upstream: dict[str, str]) -> dict[str, Any] | None:
    """The stage's own `_SUCCESS.json` if it was written for exactly these inputs, else None."""
    from .store import read_marker

    marker = read_marker(store, task.output)
    return marker if marker is not None and marker.get("digest") == task.digest(upstream) else None
