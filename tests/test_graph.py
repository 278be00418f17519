"""Stage graph and task resolution: what each stage waits for and where it reads and writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from xwin_operator.api.graph import dependencies, stages_of
from xwin_operator.api.spec_io import load_run, parse_run
from xwin_operator.core.tasks import stage_task

from plan_walk import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full():
    return load_run(ROOT / "examples/xwin-7b.yaml")


def test_full_recipe_order_and_dependencies(full):
    assert stages_of(full.spec) == ["sft", "pairs", "rewardModel", "bestOfN",
                                    "rejectionSampling", "dpo", "evaluate"]
    deps = dependencies(full.spec)
    assert deps["sft"] == []
    assert deps["pairs"] == ["sft"]
    assert deps["rewardModel"] == ["sft", "pairs"]
    assert deps["bestOfN"] == ["sft", "rewardModel"]
    assert deps["rejectionSampling"] == ["sft", "bestOfN"]
    assert deps["dpo"] == ["bestOfN", "rejectionSampling"]
    assert deps["evaluate"] == ["sft", "rejectionSampling", "dpo"]


def test_stages_start_in_pipeline_order(full):
    """Every stage of the full recipe starts after the ones it reads (the planner's walk)."""
    status, created, _ = simulate(full, store="s3://bucket/root")
    assert status["phase"] == "Succeeded"
    prefix = f"{full.metadata.name}-"
    first = list(dict.fromkeys(name.removeprefix(prefix).split("-")[0] for _, name in created))
    assert first == [s.lower() for s in stages_of(full.spec)]


def test_reused_stages_count_as_done_and_have_no_task():
    """`from:` stages (pairs, bestOfN) are done from the start: rewardModel and
    rejectionSampling, which read sft and them, start together once sft succeeded."""
    run = load_run(ROOT / "examples/tiny/run-training.yaml")
    assert dependencies(run.spec)["rewardModel"] == ["sft", "pairs"]
    assert dependencies(run.spec)["rejectionSampling"] == ["sft", "bestOfN"]
    status, created, _ = simulate(run, store="s3://bucket/root")
    assert status["phase"] == "Succeeded"
    assert [name for _, name in created] == ["tiny-sft-1", "tiny-rewardmodel-1",
                                             "tiny-rejectionsampling-1", "tiny-dpo-1"]


def test_tasks_point_at_upstream_artifacts_and_require_their_markers():
    run = load_run(ROOT / "examples/tiny/run-training.yaml")
    rs = stage_task(run, "rejectionSampling", store="s3://bucket/root")
    assert rs.output == "s3://bucket/root/demo/tiny/rejectionSampling/"
    assert rs.inputs == {"model": "s3://bucket/root/demo/tiny/sft/model/",
                         "scored": "file://./examples/tiny/work/scored.jsonl"}
    assert rs.markers == ["s3://bucket/root/demo/tiny/sft/"]  # from: inputs carry no marker
    assert rs.params["topK"] == 1 and rs.params["training"]["learningRate"] == 5.0e-4
    dpo = stage_task(run, "dpo", store="s3://bucket/root")
    assert dpo.inputs["model"].endswith("/rejectionSampling/model/")
    assert "scored" in dpo.inputs and dpo.params["beta"] == 0.1
    assert "rpoAlpha" not in dpo.params   # unset (plain DPO): the task and its digest as before
    run.spec.stages.dpo.rpoAlpha = 1.0
    assert stage_task(run, "dpo", store="s3://bucket/root").params["rpoAlpha"] == 1.0


def test_judge_secret_name_never_reaches_a_task(full):
    t = stage_task(full, "pairs")
    assert t.params["judge"]["model"] == "gpt-4-0613"
    assert "openai-api-key" not in t.to_json()


def test_digest_changes_with_params_and_upstream():
    run = load_run(ROOT / "examples/tiny/run-training.yaml")
    t = stage_task(run, "rewardModel")
    assert t.digest({"x": "1"}) == t.digest({"x": "1"})
    assert t.digest({"x": "1"}) != t.digest({"x": "2"})
    run2 = parse_run((ROOT / "examples/tiny/run-training.yaml").read_text().replace(
        "training: {epochs: 2, learningRate: 5.0e-4}", "training: {epochs: 3, learningRate: 5.0e-4}", 1))
    assert stage_task(run2, "rewardModel").digest({}) != t.digest({})
