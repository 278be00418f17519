"""Small helpers the training, scoring, sampler and chat tests share: the tiny-model builder
of examples/tiny_model.py (loaded from its path: examples/ is not a package) and a JSONL writer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_module() -> ModuleType:
    """examples/tiny_model.py: build_tiny_model, build_tiny_tokenizer."""
    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "examples" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records) -> str:
    """One JSON object per line; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)
