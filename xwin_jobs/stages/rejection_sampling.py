"""`rejectionSampling`: finetune on the top-k scored responses per prompt (Xwin-LM-RS).

Task: inputs {model: init model URI, scored: scored-set records}; params {training, topK}.
The top-k responses of each prompt (by reward-model score, see xwin_jobs.selection) become
conversations `prompt + [assistant response]`, trained exactly like `sft` (tokenized once:
a restarted attempt reads neither the scored set nor the tokenizer's output again).
"""

from __future__ import annotations

from ..datasets_in import iter_input_records
from . import StageContext, StageError, StageResult, param
from .common import check_model_input
from .sft import finetune


def run(ctx: StageContext) -> StageResult:
    from ..selection import rejection_sampling_records

    top_k = param(ctx.task, "topK")
    check_model_input(ctx)
    uri = ctx.input("scored")

    def make_records():
        scored = list(iter_input_records(ctx.store, uri, "scored", ctx.workdir))
        conversations, summary = rejection_sampling_records(scored, top_k)
        if not conversations:
            raise StageError(f"{uri}: no prompt has a valid scored response ({len(scored)} prompts read)")
        counts = {"scoredPrompts": len(scored), "selected": len(conversations),
                  "promptsShort": summary.get("promptsShort", 0)}
        for key in ("meanScore", "meanMaxScore"):
            if summary.get(key) is not None:
                counts[f"scored{key[0].upper()}{key[1:]}"] = summary[key]
        return conversations, counts

    result = finetune(ctx, ("scored",), make_records, derive={"topK": top_k})
    for key in ("scoredMeanScore", "scoredMeanMaxScore"):  # metrics, not counts
        if key in result.counts:
            result.metrics[key] = result.counts.pop(key)
    return result
