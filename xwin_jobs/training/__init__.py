"""Training machinery shared by the training stages.

config: TrainingConfig (the resolved `training` block of a stage), TRAINING_DEFAULTS and
    TRAINING_BOUNDS (the ranges the spec declares and the trainer checks).
build: the engine `zeroStage` names, with the model loaded the way it needs.
engine: zeroStage 0 (one process, or DDP under torchrun): devices, precision, AdamW, schedule.
zero, zero_config: zeroStage 1-3 on DeepSpeed ZeRO, and the one function making its config.
distributed: torchrun's ranks and the collectives the loop and the stages use.
loop: Trainer(engine, objective, config), the optimizer-step loop (packing settled first,
    gradient accumulation, logging, checkpoints, resume, SIGTERM).
checkpoints: exact-resume checkpoints (checkpoints/step-N/), resume, pruning.
preempt: SIGTERM as a request to checkpoint and exit 128 + signal.
data: records -> token examples, and the seeded order of optimizer steps.
batching: which examples share a micro-batch (by length, a token budget, packing); the one
    definition of loss normalisation (LOSS_NORMALISATION).
packing: micro-batch tensors (padded or packed) and the reads of hidden states at the used
    positions only (LM head at labelled positions, reward at the last token).
objectives: an Objective per kind of stage (workload, prepare, micro_step, evaluate).
"""
