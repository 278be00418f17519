"""`dpo`: Direct Preference Optimization, sigmoid loss (Xwin-LM-DPO).

Task: inputs {model: init model URI (also the reference), and `scored` (pairsFrom=bestOfN,
the default) or `pairs` (pairsFrom=pairs)}; params {training, beta, chosen, rejected,
rejectedFloor, minMargin, pairsFrom, rpoAlpha}.

From a scored set, one pair per prompt is built by xwin_jobs.selection (chosen `best` |
`rank:N`; rejected `worst` | `rank:N` | `random`, with `worst` and `random` drawn only from
responses at or above the `rejectedFloor` quantile of the set's scores when it is set; pairs
with score gap < minMargin dropped).
rpoAlpha > 0 adds rpoAlpha times the chosen answers' per-token NLL to the loss (RPO); the
summary reports that NLL (`chosenNll`) whatever rpoAlpha is.
Reference log-probabilities are computed once, by the init model before the first step (and
before any checkpoint is loaded), and stored as a shared artifact under the store's root,
`<storage.uri>/_cache/reference-logprobs/<key>/` (marker last), keyed by what they are a
function of: the init model (its stage's digest, or an outside model's fingerprint) and the
encoded pairs themselves (token ids: the pairs' contents, the chat template, maxLength and
truncation, and for pairs built from a scored set the selection: the digest of the tokenized
examples, xwin_jobs.tokenized), and whether they were packed.
A restarted stage reads them instead of recomputing them from a partly trained policy, and any
DPO stage of any run in the same store with the same key (a second DPO with another `beta`)
skips its reference pass; `metrics.referenceReused` says which happened.
"""

from __future__ import annotations

import hashlib
import json
import logging

from ..datasets_in import iter_input_records
from . import StageContext, StageError, StageResult, param, upstream_digests
from .sampling_common import model_stage_digest
from .common import (check_model_input, pad_id_of, require_examples, tokenized_examples,
                     tokenizer_of, train_and_publish)

log = logging.getLogger("xwin_jobs.stage")

PAIRS_FROM = ("bestOfN", "pairs")


def pairs_source(ctx: StageContext) -> str:
    """`bestOfN` (pairs built from the `scored` input) or `pairs` (judged pairs: the `pairs`
    input), from params.pairsFrom: a stage key, or the URI the `pairs` input holds."""
    inputs = ctx.task.inputs
    default_from = "pairs" if "pairs" in inputs and "scored" not in inputs else "bestOfN"
    pairs_from = str(ctx.param("pairsFrom", default_from))
    if pairs_from.startswith(("s3://", "file://", "hf://", "/")):
        return "pairs"
    if pairs_from not in PAIRS_FROM:
        raise StageError(f"params.pairsFrom: must be one of {', '.join(PAIRS_FROM)} or a URI, got {pairs_from!r}")
    return pairs_from


def selection(ctx: StageContext, pairs_from: str, seed: int) -> dict:
    """The settings that turn the input into pair records (none for judged pairs); `seed`:
    training.seed (the `random` rejected answer)."""
    if pairs_from == "pairs":
        return {}
    return {"chosen": str(ctx.param("chosen", "best")), "rejected": str(ctx.param("rejected", "worst")),
            "minMargin": float(ctx.param("minMargin", 0.0)), "seed": seed,
            "rejectedFloor": ctx.param("rejectedFloor", None)}


def load_pair_records(ctx: StageContext, pairs_from: str, settings: dict) -> tuple[list[dict], dict]:
    """Pair records and counts, from the `pairs` input or built from the `scored` input with
    the `selection` settings."""
    from ..selection import dpo_pair_records

    if pairs_from == "pairs":
        records = list(iter_input_records(ctx.store, ctx.input("pairs"), "pair", ctx.workdir))
        return records, {"pairs": len(records)}
    scored = list(iter_input_records(ctx.store, ctx.input("scored"), "scored", ctx.workdir))
    settings = dict(settings)
    floor = settings.pop("rejectedFloor")
    try:
        records, summary = dpo_pair_records(
            scored, chosen=settings["chosen"], rejected=settings["rejected"],
            min_margin=settings["minMargin"], seed=settings["seed"],
            rejected_floor=None if floor is None else float(floor))
    except ValueError as e:
        raise StageError(f"stage dpo: params.{e}") from None
    if "rejectedFloorScore" in summary:
        log.info("rejectedFloor %s: rejected answers score at least %.4f",
                 summary["rejectedFloor"], summary["rejectedFloorScore"])
    if not records:
        raise StageError("no DPO pairs: every prompt was dropped (too few valid responses or "
                         "a score gap below minMargin)")
    return records, {"scoredPrompts": len(scored), "pairs": len(records),
                     "pairsDroppedByMargin": summary.get("pairsDroppedByMargin", 0),
                     "promptsTooFewResponses": summary.get("promptsTooFewResponses", 0)}


REFERENCE_CACHE = "_cache/reference-logprobs/"
REFERENCE, REFERENCE_MARKER = "logprobs.pt", "_REFERENCE.json"


def reference_key(model_state: dict, tokens: str, packed: bool) -> str:
    """What reference log-probabilities are a function of (module docstring): the init model,
    the digest of the encoded pairs' tokens, packing. Pure."""
    body = {"model": model_state, "tokens": tokens, "packed": bool(packed)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store_root(task) -> str:
    """The store's root (`storage.uri`) from the stage's output `<root>/<ns>/<name>/<stage>/`;
    the stage's own folder when the output is laid out otherwise."""
    from ..store import as_folder

    output = as_folder(task.output)
    suffix = f"{task.run.get('namespace')}/{task.run.get('name')}/{task.stage}/"
    return output[:-len(suffix)] if task.run and output.endswith("/" + suffix) else output


class ReferenceCache:
    """DPO's reference log-probabilities kept under the store's root (module docstring) for
    the init model's state and the encoded pairs' `tokens` digest (objectives.ReferenceStore)."""

    def __init__(self, ctx: StageContext, model_state: dict, tokens: str):
        self.ctx, self.model_state, self.tokens = ctx, model_state, tokens

    def fetch(self, engine, packed: bool, compute):
        """(the table stored under this key, else `compute()`'s (every rank runs it: forward
        passes are collective under ZeRO-3), stored by rank 0, marker last; whether reused)."""
        import io

        import torch

        from ..store import join_uri

        ctx, key = self.ctx, reference_key(self.model_state, self.tokens, packed)
        folder = join_uri(store_root(ctx.task), REFERENCE_CACHE, key + "/")
        marker = join_uri(folder, REFERENCE_MARKER)
        stored = None
        if ctx.is_main and ctx.store.exists(marker) and ctx.store.read_json(marker).get("key") == key:
            stored = torch.load(io.BytesIO(ctx.store.read_bytes(join_uri(folder, REFERENCE))))
        stored = engine.dist.broadcast_object(stored)
        if stored is not None:
            log.info("reference log-probabilities: reused from %s", folder)
            return stored, True
        logps = compute()
        if ctx.is_main:
            buf = io.BytesIO()
            torch.save(logps, buf)
            ctx.store.write_bytes(join_uri(folder, REFERENCE), buf.getvalue())
            ctx.store.write_json(marker, {"key": key, "pairs": len(logps), "run": ctx.task.run})
            log.info("reference log-probabilities: stored in %s", folder)
        return logps, False


def run(ctx: StageContext) -> StageResult:
    from ..modeling import load_causal_lm
    from ..training.objectives import DpoObjective

    beta, rpo_alpha = param(ctx.task, "beta"), param(ctx.task, "rpoAlpha")
    pairs_from = pairs_source(ctx)
    config = ctx.training()
    check_model_input(ctx)
    folder, tokenizer = tokenizer_of(ctx)
    settings = selection(ctx, pairs_from, config.seed)
    tokenized = tokenized_examples(ctx, "pairs", folder, tokenizer, config, (pairs_from_input(pairs_from),),
                                   lambda: load_pair_records(ctx, pairs_from, settings), settings)
    pairs, stats = tokenized.rows, tokenized.stats()
    require_examples(pairs, stats, "pairs")
    model_state = model_stage_digest(ctx.task.inputs["model"], upstream_digests(ctx.store, ctx.task))
    objective = DpoObjective(pairs, pad_id_of(tokenizer), config, float(beta), float(rpo_alpha),
                             ReferenceCache(ctx, model_state, tokenized.manifest["tokens"]))
    metrics, uri = train_and_publish(ctx, objective, load_causal_lm, tokenizer)
    metrics["truncated"] = stats.truncated
    metrics.update(tokenized.metrics())
    return StageResult(counts={**tokenized.counts, **stats.as_counts()}, metrics=metrics,
                       outputs={"model": uri})


def pairs_from_input(pairs_from: str) -> str:
    return "pairs" if pairs_from == "pairs" else "scored"
