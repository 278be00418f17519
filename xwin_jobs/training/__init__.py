"""Training machinery shared by the training stages.

config: TrainingConfig (the resolved `training` block of a stage).
engine: the ONE place that knows about devices, precision, optimizers and torchrun ranks
    (data parallel with DDP under torchrun; DeepSpeed is not implemented).
loop: the optimizer-step loop (gradient accumulation, logging, checkpoints).
data: records -> token examples, and the seeded order of optimizer steps.
batching: which examples share a micro-batch (by length, a token budget, packing); the one
    definition of loss normalisation (LOSS_NORMALISATION).
packing: micro-batch tensors (padded or packed) and the reads of hidden states at the used
    positions only (LM head at labelled positions, reward at the last token).
objectives: the per-micro-batch loss of each stage.
"""
