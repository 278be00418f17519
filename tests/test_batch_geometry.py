"""Micro-batch geometry as DeepSpeed derives it (issue 23, item 6): an unset microBatchSize is
the largest micro-batch up to 4 that makes globalBatchSize = micro x ranks x accumulation
exact; only explicit values that conflict are refused, naming the fields and the numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tiny_files import tiny_model_module, write_jsonl

from xwin_jobs.stages import run_stage
from xwin_jobs.store import Store
from xwin_jobs.training.config import (TrainingConfig, TrainingConfigError, check_training_settings,
                                       derive_geometry)
from xwin_jobs.training.zero_config import deepspeed_config
from xwin_operator.api.spec_io import SpecError, parse_run
from xwin_operator.core.tasks import stage_task

# The spec of before the defaults assumed 8 GPUs and a micro-batch of 4: no microBatchSize,
# no resources (nodes 1 x gpusPerNode 8 at validate time; one rank under `xwin run`).
OLD_SPEC = """\
apiVersion: xwin.ai/v1alpha1
kind: AlignmentRun
metadata: {name: old, namespace: ns}
spec:
  baseModel: BASE
  storage: {uri: STORE}
  stages:
    sft:
      data: DATA
      training: {globalBatchSize: 8, maxLength: 128, learningRate: 1.0e-3, maxSteps: 2, checkpointEvery: 0,
                 gradientCheckpointing: false ZERO}
"""


@pytest.mark.parametrize("global_batch,ranks,expected", [
    (8, 1, (4, 2)), (8, 8, (1, 1)), (8, 2, (4, 1)), (12, 2, (3, 2)), (128, 16, (4, 2)),
    (6, 4, None),  # ZeRO: 6 is no multiple of 4 ranks
])
def test_unset_micro_batch_is_derived_for_the_ranks(global_batch, ranks, expected):
    config = TrainingConfig.from_params({"globalBatchSize": global_batch, "zeroStage": 3})
    if expected is None:
        with pytest.raises(TrainingConfigError, match=rf"params.training.globalBatchSize: {global_batch} "
                                                      rf"cannot be split over {ranks} rank\(s\).*e.g. 8"):
            derive_geometry(config, ranks)
        return
    geometry = derive_geometry(config, ranks)
    assert (geometry.micro, geometry.accumulation) == expected
    assert geometry.micro * ranks * geometry.accumulation == global_batch and geometry.exact
    assert geometry.derived
    ds = deepspeed_config(config.for_world(ranks), ranks, bf16=False)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == expected


def test_explicit_micro_batch_is_kept_and_a_conflict_names_both_fields():
    ok = check_training_settings({"globalBatchSize": 32, "microBatchSize": 2, "zeroStage": 3}, 8)
    assert ok.micro_batch_size == 2 and not ok.micro_batch_derived
    with pytest.raises(TrainingConfigError, match=r"globalBatchSize: 8 is not a multiple of "
                                                  r"microBatchSize 4 x 8 rank\(s\) = 32.*microBatchSize unset"):
        check_training_settings({"globalBatchSize": 8, "microBatchSize": 4, "zeroStage": 3}, 8)
    # DDP and one process accept an uneven last share, derived or not
    ddp = check_training_settings({"globalBatchSize": 6, "zeroStage": 0}, 4)
    assert ddp.micro_batch_size == 4 and not derive_geometry(ddp, 4).exact


def test_old_spec_validates_and_says_its_geometry():
    text = OLD_SPEC.replace("BASE", "s3://m/").replace("STORE", "s3://a").replace("DATA", "s3://d.jsonl")
    run = parse_run(text.replace(" ZERO", ""))  # zeroStage 3 on 8 default GPUs: 1 x 8 x 1
    task = stage_task(run, "sft")
    assert "microBatchSize" not in task.params["training"]
    with pytest.raises(SpecError, match=r"spec.stages.sft.training.globalBatchSize.*12 is not a multiple "
                                        r"of microBatchSize 4 x 8 rank\(s\) = 32"):
        parse_run(text.replace("globalBatchSize: 8", "globalBatchSize: 12, microBatchSize: 4")
                  .replace(" ZERO", ""))


@pytest.mark.slow
def test_old_spec_runs_with_one_rank(tmp_path, caplog):
    root = tmp_path
    corpus = ["what is 1 plus 2?", "1 plus 2 is 3",
              "A chat between a curious user and an artificial intelligence assistant. The assistant "
              "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:"]
    base = tiny_model_module().build_tiny_model(root / "base", corpus, seed=0)
    data = write_jsonl(root / "sft.jsonl", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": "what is 1 plus 2?"},
                                     {"role": "assistant", "content": "1 plus 2 is 3"}]}
        for i in range(16)])
    text = (OLD_SPEC.replace("BASE", f"file://{base}").replace("STORE", f"file://{root}/runs")
            .replace("DATA", f"file://{data}").replace(" ZERO", ", zeroStage: 0"))
    task = stage_task(parse_run(text), "sft")
    with caplog.at_level(logging.INFO, logger="xwin_jobs.stage"):
        marker = run_stage(task, Store())
    assert ("globalBatchSize 8 = micro-batch 4 x 1 rank(s) x 2 accumulation step(s); micro-batch "
            "derived" in caplog.text)
    metrics = json.loads(Path(f"{root}/runs/ns/old/sft/metrics.json").read_text())
    assert (metrics["microBatchSize"], metrics["gradientAccumulationSteps"], metrics["ranks"],
            metrics["microBatchSizeDerived"]) == (4, 2, 1, True)
    assert marker["metrics"]["microBatchSize"] == 4
