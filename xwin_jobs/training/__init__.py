"""Training machinery shared by the training stages.

config: TrainingConfig (the resolved `training` block of a stage).
engine: the ONE place that knows about devices, precision and optimizers (DeepSpeed and
    torchrun plug in here later).
loop: the optimizer-step loop (gradient accumulation, logging, checkpoints).
data: records -> token examples -> padded batches.
objectives: the per-micro-batch loss of each stage.
"""
