"""Training machinery shared by the training stages.

config: TrainingConfig (the resolved `training` block of a stage).
engine: the ONE place that knows about devices, precision, optimizers and torchrun ranks
    (data parallel with DDP under torchrun; DeepSpeed is not implemented).
loop: the optimizer-step loop (gradient accumulation, logging, checkpoints).
data: records -> token examples -> padded batches.
objectives: the per-micro-batch loss of each stage.
"""
