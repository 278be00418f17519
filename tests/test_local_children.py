"""`xwin run`'s start rule (local/children.may_start): one job at a time, plus the servers
its sampler needs; evaluate's next server may come up beside a sampler (two at most)."""

from __future__ import annotations

from xwin_operator.api.spec import EvaluateStage
from xwin_operator.core.descriptors import stage_steps
from xwin_operator.local.children import LocalChild, may_start

EVAL = {s.name: s for s in stage_steps("evaluate", EvaluateStage(models=["sft", "rejectionSampling", "dpo"]))}
BEST = {s.name: s for s in stage_steps("bestOfN")}


def kid(stage, step, attempt=1, steps=EVAL):
    kind = "Deployment" if step.startswith("serve") else "Job"
    return LocalChild(kind, f"{stage}-{step}-{attempt}", stage, steps[step], attempt, None, "t0",
                      started_at=0.0, phase="Running")


def test_a_server_starts_alone_or_beside_a_sampler_of_its_stage_two_at_most():
    assert may_start(kid("evaluate", "serve-sft"), [])
    up = [kid("evaluate", "serve-sft"), kid("evaluate", "sample-sft")]
    assert may_start(kid("evaluate", "serve-rejectionsampling"), up)
    assert not may_start(kid("evaluate", "serve-dpo"), up + [kid("evaluate", "serve-rejectionsampling")])
    # never beside a training job, another stage's server or an older attempt's
    assert not may_start(kid("evaluate", "serve-sft"), [kid("dpo", "train", steps={"train": stage_steps("dpo")[0]})])
    assert not may_start(kid("evaluate", "serve-sft"), [kid("bestOfN", "serve", steps=BEST)])
    assert not may_start(kid("evaluate", "serve-dpo", attempt=2), up)


def test_a_job_starts_alone_and_a_sampler_beside_its_server_and_the_next_one():
    sft_server, next_server = kid("evaluate", "serve-sft"), kid("evaluate", "serve-rejectionsampling")
    assert may_start(kid("evaluate", "sample-sft"), [sft_server, next_server])
    assert may_start(kid("evaluate", "sample-rejectionsampling"), [sft_server, next_server])
    assert not may_start(kid("evaluate", "sample-dpo"), [sft_server, next_server])   # its server is not up
    assert not may_start(kid("evaluate", "sample-rejectionsampling"),
                         [next_server, kid("evaluate", "sample-sft")])          # one job at a time
    assert not may_start(kid("evaluate", "judge"), [next_server])               # judges with no server up
    assert may_start(kid("evaluate", "judge"), [])
