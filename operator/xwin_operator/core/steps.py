"""Steps: what a stage runs, in order, read by the operator's planner and by `xwin run`.

A stage is a short, linear list of steps: its descriptor's `steps` (core/descriptors.py),
built from the helpers below. Each step is one child on Kubernetes (a vLLM server is a
Deployment plus its Service) and one process locally.

Kinds of step:
  * `train`: `python -m xwin_jobs <job> --task ...` under torchrun (a PyTorchJob on Kubernetes);
    `<job>` is the stage key for training stages and `<stage>-<step>` (`bestOfN-score`) for
    the steps of other stages (xwin_jobs.pipeline: a job's `steps`);
  * `serve`: a vLLM OpenAI server for one model input of the task (a Deployment + Service). It
    lives only while the sample step it serves runs: it starts right before it and is deleted
    as soon as that step finishes, so GPUs are not held. Where a sample step is followed by
    another serve step (evaluate's next model), that server is created as soon as the sampler
    starts, so its cold start overlaps the sampling: at most two servers of a stage are up;
  * `job`: `python -m xwin_jobs <job> --task ...` once (a Job).

What a step's process gets besides the task (the StageTask is the same for every step of a
stage, so its digest and `_SUCCESS.json` stay those of the stage; only the LAST step of a
stage writes `_SUCCESS.json`):
  * env `XWIN_STEP`: the step name (`sample`, `sample-sft`, ...);
  * env `XWIN_MODEL_INPUT` (serve and sample steps): the name of the task input holding the
    model served / sampled (`policy`, or `model:<m>` for evaluate);
  * env `OPENAI_BASE_URL` (sample steps): the OpenAI-compatible base URL of the server
    (`http://<service>:<port>/v1`), and `XWIN_SERVED_MODEL`: the model name it serves
    (what `xwin_jobs.sampler` reads).

Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str                       # label xwin.ai/step and part of the child name
    kind: str                       # train | serve | job
    job: str | None = None          # `python -m xwin_jobs <job>`: the stage, or "<stage>-<step>"
    image: str = "trainer"          # trainer | sampler | annotator (keys of spec.images)
    model_input: str | None = None  # serve/sample: the task input with the model
    serves: str | None = None       # serve: the sample step it exists for
    served_by: str | None = None    # sample: its serve step (must be ready first)
    resources: str = "training"     # training | scoring | serving | none: which settings size it
    needs_judge: bool = False       # reads judge.apiKeySecret


def model_slug(ref: str, index: int) -> str:
    """A short DNS-safe name for an evaluated model: the stage key lowercased, else m<index>."""
    slug = ref.lower()
    return slug if re.fullmatch(r"[a-z][a-z0-9]{0,19}", slug) else f"m{index}"


def train(stage: str, settings: object = None) -> list[Step]:
    """A training stage's steps (whatever its settings): its own job under torchrun."""
    return [Step("train", "train", job=stage)]


def served_sampling(stage: str, model_input: str, suffix: str = "") -> list[Step]:
    """A vLLM server for the task input `model_input`, and the sampler it exists for."""
    serve, sample = f"serve{suffix}", f"sample{suffix}"
    return [Step(serve, "serve", image="sampler", model_input=model_input, serves=sample,
                 resources="serving"),
            Step(sample, "job", job=f"{stage}-sample", image="sampler", model_input=model_input,
                 served_by=serve, resources="none")]


def judge(stage: str) -> Step:
    """The judge Job of a stage (it gets the judge's API key)."""
    return Step("judge", "job", job=f"{stage}-judge", image="annotator", resources="none",
                needs_judge=True)


def score(stage: str) -> Step:
    """A scoring step under torchrun, sized by the stage's `scoringResources`."""
    return Step("score", "train", job=f"{stage}-score", resources="scoring")


def step_env(step: Step, server_url: str | None = None, served_model: str | None = None) -> dict[str, str]:
    """The step-specific environment (see the module docstring), for pods and local processes."""
    env = {"XWIN_STEP": step.name}
    if step.model_input:
        env["XWIN_MODEL_INPUT"] = step.model_input
    if step.served_by and server_url:
        env["OPENAI_BASE_URL"] = server_url
    if step.served_by and served_model:
        env["XWIN_SERVED_MODEL"] = served_model
    return env
