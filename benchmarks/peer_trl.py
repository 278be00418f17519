"""The peer side of bench_train_trl.py: one TRL 1.16 trainer run, in TRL's own virtualenv.

    .venv-trl/bin/python benchmarks/peer_trl.py WORKLOAD.json OUT_DIR

WORKLOAD.json (written by bench_train_trl.py): {"stage": "sft" | "dpo" | "rewardModel",
"model": base model folder, "hp": hyperparameters, "examples": token ids}. The token ids and
labelled positions are exactly the ones our stage trains on (encoded by our code and handed
over pre-tokenized), so the two sides see the same data; TRL's own trainers, collators and
defaults do the rest (padding to the longest sequence of each batch, full logits). Prints one
JSON line: first, mean and final loss; the trainer's own `train_runtime` (its training loop)
and the seconds around trainer.train(); DPO's reference pass (`ref_seconds`: TRL precomputes
the reference log-probabilities while the trainer is built, before the loop); real tokens and
fed positions of the training batches (what its collator built). Imports nothing from this
project.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(workload_path: str, out_dir: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    work = json.loads(Path(workload_path).read_text())
    stage, hp, rows = work["stage"], work["hp"], work["examples"]
    tokenizer = AutoTokenizer.from_pretrained(work["model"])
    common = dict(output_dir=out_dir, per_device_train_batch_size=hp["microBatchSize"],
                  gradient_accumulation_steps=hp["globalBatchSize"] // hp["microBatchSize"],
                  learning_rate=hp["learningRate"], num_train_epochs=hp["epochs"],
                  lr_scheduler_type=hp["lrScheduler"], warmup_steps=hp["warmupRatio"],
                  weight_decay=hp["weightDecay"], adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                  max_grad_norm=hp["maxGradNorm"], seed=hp["seed"], logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                  dataloader_num_workers=0, max_length=hp["maxLength"], disable_tqdm=True)
    torch.manual_seed(hp["seed"])
    timings: dict[str, float] = {}
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
        data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data,
                             processing_class=tokenizer)
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PreTokenized(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # prompt_ids / chosen_ids / rejected_ids as given

            def _precompute_ref_logps(self, *args, **kwargs):
                started = time.monotonic()
                try:
                    return super()._precompute_ref_logps(*args, **kwargs)
                finally:
                    timings["ref_seconds"] = timings.get("ref_seconds", 0.0) + time.monotonic() - started

        model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
        data = Dataset.from_list(rows)
        trainer = PreTokenized(model=model, args=DPOConfig(**common, beta=hp["beta"], loss_type=["sigmoid"],
                                                           precompute_ref_log_probs=True),
                               train_dataset=data, processing_class=tokenizer)
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(work["model"], num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        data = Dataset.from_list(rows)
        trainer = RewardTrainer(model=model, args=RewardConfig(**common, center_rewards_coefficient=None),
                                train_dataset=data, processing_class=tokenizer)

    counts = {"real": 0, "fed": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counts["fed"] += int(batch["input_ids"].numel())
        counts["real"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(
            batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    started = time.monotonic()
    output = trainer.train()
    seconds = time.monotonic() - started
    trainer.save_model(str(Path(out_dir) / "model"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"mean_loss": sum(losses) / len(losses) if losses else None,
                      "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
                      "train_seconds": seconds, "train_runtime": output.metrics.get("train_runtime", seconds),
                      "ref_seconds": timings.get("ref_seconds"), "real_tokens": counts["real"],
                      "fed_positions": counts["fed"], "steps": trainer.state.global_step}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
