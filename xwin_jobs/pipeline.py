# The recipe's stages as facts: their keys in pipeline order, which train a model, which sample
# from a served model, which ask the judge. The one definition the spec model, the planner, the
# manifests and the stage jobs read (the operator imports it; xwin_jobs never imports the operator).

STAGE_ORDER = ("sft", "pairs", "rewardModel", "bestOfN", "rejectionSampling", "dpo", "evaluate")
# train a model (their folder holds model/): one `train` step each, data parallel under torchrun
TRAINING_STAGES = ("sft", "rewardModel", "rejectionSampling", "dpo")
# sample from a model a vLLM server serves: `sampling` and `serving` settings, serve/sample steps
SAMPLING_STAGES = ("pairs", "bestOfN", "evaluate")
# ask the LLM judge: need spec.judge, get its API key
JUDGE_STAGES = ("pairs", "evaluate")
