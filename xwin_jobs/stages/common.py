"""What the four training stages share: model inputs, the engine, checkpoints, publishing.

`train_and_publish(ctx, objective, load_model, tokenizer)` is the whole life of a training
stage once its objective (xwin_jobs.training.objectives) holds its examples: check that
microBatchTokens holds every example, fetch the model, build the engine
(xwin_jobs.training.build: DDP or DeepSpeed ZeRO), run `Trainer(engine, objective, config)`
(xwin_jobs.training.loop) from the newest usable checkpoint (checkpoints to
`checkpoints/step-N/`, a checkpoint and exit 128+15 on SIGTERM), upload the final model to
`model/`, and return the metrics. Under torchrun every rank trains and only rank 0 writes
the model.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..modeling import HF_SCHEME
from ..pipeline import TRAINING_STAGES
from ..store import as_folder, check_model_folder, join_uri
from . import StageContext, StageError, upstream_digests

log = logging.getLogger("xwin_jobs.stage")

# Cleared just before the final model is uploaded (never at start: checkpoints/ is how a
# restarted stage resumes, and a refused setting must leave the store untouched).
TRAINING_OUTPUTS = ("model/", "metrics.json")


def check_model_input(ctx: StageContext, name: str = "model") -> str:
    """Fail early (before reading data or downloading anything) when the model input is not
    a model folder. Returns the URI."""
    uri = ctx.input(name)
    if not uri.startswith(HF_SCHEME):
        check_model_folder(ctx.store, uri)
    return uri


def model_source(ctx: StageContext, name: str = "model") -> str:
    """A local folder or a Hub id; a remote model is downloaded once per node into the scratch
    volume and shared by the node's ranks (xwin_jobs.model_cache)."""
    from ..model_cache import node_model_copy

    return node_model_copy(ctx.store, ctx.input(name), ctx.digest)


def input_state(uri: str, upstream: dict[str, str]) -> dict[str, str]:
    """What the records at `uri` are now: its fingerprint (an external input), or the digest
    of the stage of this run that made it; for a dataset repo on the Hub without a pinned
    revision, also the commit the Hub serves."""
    from ..datasets_in import hub_commit

    state = upstream.get(uri) or next((d for m, d in upstream.items()
                                       if as_folder(uri).startswith(as_folder(m))), "")
    commit = hub_commit(uri)
    return {"uri": uri, "state": state, **({"commit": commit} if commit else {})}


def sibling_folders(task, relative: str) -> list[str]:
    """`relative` under the run's other training stages (same run folder), where a stage that
    read the same records may have left what this one needs."""
    output = as_folder(task.output)
    run, _, stage = output.rstrip("/").rpartition("/")
    if not task.run or stage != task.stage:
        return []
    return [join_uri(run + "/", other, relative) for other in TRAINING_STAGES if other != stage]


def tokenized_examples(ctx: StageContext, kind: str, tokenizer_folder: str, tokenizer: Any,
                       config, inputs: tuple[str, ...], make_records: Callable[[], tuple],
                       derive: dict | None = None):
    """The stage's examples tokenized once (xwin_jobs.tokenized) under
    `<stage>/tokenized/<key>/`, keyed by the records (`inputs`' states and the `derive`
    settings that turn them into training records), the tokenizer's files, the chat template,
    maxLength and `kind` (`sft` | `pairs`). `make_records()` -> (records, counts) runs only
    when no copy exists."""
    from ..tokenized import TOKENIZED, tokenize_once, tokenized_key, tokenizer_fingerprint
    from .sampling_common import TOKENIZER_FILES

    upstream = upstream_digests(ctx.store, ctx.task)
    files = [f for f in TOKENIZER_FILES if f not in ("config.json", "generation_config.json")]
    key = tokenized_key({"kind": kind, "derive": derive or {}, "template": ctx.task.chat_template,
                         "records": [input_state(ctx.input(n), upstream) for n in inputs],
                         "tokenizer": tokenizer_fingerprint(tokenizer_folder, files),
                         "maxLength": config.max_length})
    relative = f"{TOKENIZED}{key}/"
    encode = {"template": ctx.task.chat_template, "tokenizer": tokenizer, "max_length": config.max_length}
    return tokenize_once(ctx.store, ctx.output(relative), key, kind, make_records, encode, ctx.dist,
                         also=sibling_folders(ctx.task, relative), root=None,
                         extra={"stage": ctx.task.stage, "run": ctx.task.run})


def tokenizer_of(ctx: StageContext, name: str = "model") -> tuple[str, Any]:
    """(folder or Hub id, tokenizer) of the model input: only its tokenizer files are fetched
    (the weights come later, once the data is known good: `model_source`)."""
    from ..modeling import load_tokenizer
    from .sampling_common import tokenizer_source

    folder = tokenizer_source(ctx.store, ctx.input(name), ctx.workdir)
    return folder, load_tokenizer(folder)


def require_examples(examples: list, stats, what: str) -> None:
    if examples:
        return
    hint = f" ({stats.skipped} had no assistant tokens within maxLength)" if stats.skipped else ""
    raise StageError(f"no {what} to train on: {stats.records} record(s) read{hint}")


def pad_id_of(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        raise StageError("the tokenizer has no pad, unk or eos token to pad batches with")
    return int(tokenizer.pad_token_id)


def check_budget(config, objective) -> None:
    """A StageError naming microBatchTokens when it cannot hold an example (laid out padded,
    which needs at least the positions packing does), before any model is loaded."""
    from ..training.batching import BudgetError, check_budget as check

    try:
        workload = objective.workload(packed=False)
        check(workload.lengths, config.token_budget(workload.sequences))
    except BudgetError as e:
        raise StageError(str(e)) from None


def train_and_publish(ctx: StageContext, objective, load_model: Callable[[str], Any],
                      tokenizer: Any) -> tuple[dict, str]:
    """Train `objective` on the model `load_model(folder or Hub id)` returns (loaded by the
    engine: partitioned under ZeRO-3), seeded with training.seed (a new head's
    initialisation), resuming from the newest usable checkpoint, and upload the result with
    `tokenizer`. Returns (metrics, model URI)."""
    from ..training.build import build_engine
    from ..training.checkpoints import Checkpoints
    from ..training.engine import seed_everything
    from ..training.loop import Trainer, plan_total_steps
    from ..training.preempt import stop_requests

    config = ctx.training()
    check_budget(config, objective)
    source = model_source(ctx)
    seed_everything(config.seed)
    _, total = plan_total_steps(len(objective), config)
    engine = build_engine(lambda: load_model(source), config, total, ctx.dist)
    trainer = Trainer(engine, objective, config)
    checkpoints = Checkpoints(ctx.store, ctx.output("checkpoints/"), ctx.workdir, engine, ctx.digest)
    with stop_requests() as stop:
        metrics = trainer.fit(checkpoints, stop, ctx.progress("steps", total))
    ctx.clear(*TRAINING_OUTPUTS)  # an earlier attempt's leftovers; checkpoints stay
    uri = ctx.output("model/")
    # rank 0's folder goes up once every rank has left the process group (ctx.publish)
    ctx.publish(engine.save_pretrained(tokenizer, ctx.workdir / "model"), uri)
    return metrics, uri
