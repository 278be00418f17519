"""Loading and saving Hugging Face models through the artifact store.

A model URI is `s3://...`, `file://...`, a plain path, or `hf://org/name`. Store URIs are
checked with `check_model_folder` (a folder without weights is a clear StoreError) and, when
not already local, downloaded into a cache folder; `hf://org/name` goes straight to
`from_pretrained("org/name")` (the Hub, or the local HF cache).

Models are loaded in float32 (the engine autocasts where the hardware has bf16). Reward
models are `AutoModelForSequenceClassification` with one label and `pad_token_id` set, as
TRL's RewardTrainer makes them, so the scorer can load them with the same class.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

from .store import Store, StoreError, as_folder, check_model_folder

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"


class ModelLoadError(Exception):
    """A model or tokenizer folder that transformers cannot load; names the folder."""


def resolve_model_source(store: Store, uri: str, cache_dir: str | Path) -> str:
    """A local folder path or a Hub id that `from_pretrained` accepts."""
    if uri.startswith(HF_SCHEME):
        name = uri[len(HF_SCHEME):].strip("/")
        if not name:
            raise StoreError(f"{uri}: an hf:// URI needs a model name (hf://org/name)")
        return name
    check_model_folder(store, uri)
    local = store.local_path(uri)
    if local is not None:
        return str(local)
    dest = Path(cache_dir) / "models" / as_folder(uri).rstrip("/").replace("://", "/").replace("/", "_")
    if dest.exists():
        shutil.rmtree(dest)
    log.info("downloading %s", uri)
    store.download_dir(uri, dest)
    return str(dest)


def _load(what: str, source: str, fn, *args, **kwargs):
    try:
        return fn(source, *args, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{source}: cannot load the {what}: {str(e).splitlines()[0]}") from None


def load_tokenizer(source: str):
    """The tokenizer, with a pad token (unk, else eos, when it has none) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = _load("tokenizer", source, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(source: str):
    import torch
    from transformers import AutoModelForCausalLM

    return _load("causal language model", source, AutoModelForCausalLM.from_pretrained,
                 dtype=torch.float32)


def load_reward_model(source: str, pad_token_id: int):
    """A scalar-head model (num_labels=1) initialised from `source` (a causal LM or an
    existing reward model); the score head is new when `source` has none."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = _load("reward model", source, AutoModelForSequenceClassification.from_pretrained,
                  num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_token_id
    return model


def save_model(model: Any, tokenizer: Any, out_dir: str | Path,
               state_dict: dict[str, Any] | None = None) -> Path:
    """save_pretrained (safetensors) of model and tokenizer into `out_dir`; `state_dict`
    replaces the model's own (ZeRO-3 hands in the gathered weights)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with _deepspeed_unloaded_stays_unloaded():
        model.save_pretrained(out, safe_serialization=True,
                              **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(out)
    make_tokenizer_portable(out)
    return out


@contextlib.contextmanager
def _deepspeed_unloaded_stays_unloaded():
    """save_pretrained unwraps the model through accelerate, which imports deepspeed (seconds
    of start-up, more under load) merely to test `isinstance(model, DeepSpeedEngine)` whenever
    it is installed. A process that never imported deepspeed (zeroStage 0) has no such
    engine, so the check is answered without the import; under ZeRO nothing changes."""
    import sys

    other = sys.modules.get("accelerate.utils.other")
    if "deepspeed" in sys.modules or other is None or not hasattr(other, "is_deepspeed_available"):
        yield
        return
    original = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = original


def make_tokenizer_portable(folder: str | Path) -> None:
    """Let older transformers (e.g. the one inside a vLLM image) read a tokenizer saved by
    transformers 5: name the generic fast class by its long-standing name and copy the
    chat template (saved as chat_template.jinja) into tokenizer_config.json."""
    import json

    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = folder / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text()
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
