"""The AlignmentRun spec: what `xwin validate` accepts and refuses, defaults, the CRD."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml

from cel_cost import schema_nodes
from xwin_operator.api.crd import crd, crd_yaml
from xwin_operator.api.spec import AlignmentRun, resolved_training
from xwin_operator.api.spec_io import SpecError, load_run, parse_run
from xwin_jobs.training.config import TRAINING_BOUNDS, TrainingConfig, TrainingConfigError, bound_error

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "examples/tiny/run-training.yaml", ROOT / "examples/xwin-7b.yaml"]

MINIMAL = """\
apiVersion: xwin.ai/v1alpha1
kind: AlignmentRun
metadata: {name: r1, namespace: ns}
spec:
  baseModel: s3://models/base/
  storage: {uri: s3://artifacts/runs}
  stages:
    sft:
      data: s3://data/sft.jsonl
"""


def xwin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xwin_operator.cli", *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    run = load_run(path)
    assert run.spec.stages.present()
    assert xwin("validate", str(path)).returncode == 0


def test_defaults_filled_and_merged():
    run = parse_run(MINIMAL + "      training: {epochs: 3}\n  defaults:\n    training: {learningRate: 0.5, epochs: 7}\n")
    t = resolved_training(run.spec, run.spec.stages.sft)
    assert t["epochs"] == 3            # the stage's own value wins
    assert t["learningRate"] == 0.5    # then spec.defaults
    assert t["zeroStage"] == 3         # then the built-in default
    assert run.spec.retries.maxAttempts == 3 and run.spec.chatTemplate == "vicuna"


@pytest.mark.parametrize("key", sorted(TRAINING_BOUNDS))
def test_training_bounds_are_one_table_for_the_spec_and_the_trainer(key):
    """Either side of every bound of TRAINING_BOUNDS, the spec (and so the CRD) and the
    trainer's own check accept and refuse the same values, the trainer naming the bound."""
    from pydantic import ValidationError

    from xwin_operator.api.spec import Training

    step = 1 if Training.model_fields[key].annotation == Optional[int] else 0.5
    for name, limit in TRAINING_BOUNDS[key].items():
        for value in (limit - step, limit, limit + step):
            try:
                Training(**{key: value})
                spec_ok = True
            except ValidationError:
                spec_ok = False
            try:
                TrainingConfig.from_params({key: value})
                job_ok = True
            except TrainingConfigError as e:
                job_ok = False
                assert str(e).startswith(f"params.training.{key}: must be "), e
            assert spec_ok == job_ok == (bound_error(key, value) is None), (key, value)
    assert bound_error("warmupRatio", 1) == "must be < 1" and bound_error("maxLength", 15) == "must be >= 16"


def test_dpo_defaults_match_design():
    run = parse_run(MINIMAL + "    bestOfN: {from: s3://x/scored/}\n    rejectionSampling: {from: s3://x/rs/}\n    dpo: {}\n")
    dpo = run.spec.stages.dpo
    assert (dpo.init, dpo.beta, dpo.chosen, dpo.rejected, dpo.minMargin, dpo.pairsFrom) == (
        "rejectionSampling", 0.1, "best", "worst", 0.0, "bestOfN")


BAD = [
    ("    dpo: {beta: 0}\n", "spec.stages.dpo.beta", "must be > 0", 10),
    ("    dpo: {init: rejectionSampling}\n", "spec.stages.dpo.init", "must name a stage present", 10),
    ("    dpo: {init: sft, pairsFrom: pairs}\n", "spec.stages.dpo.pairsFrom", "must name a stage present", 10),
    ("    dpo: {init: sft, chosen: first, pairsFrom: s3://p/}\n", "spec.stages.dpo.chosen", "must match", 10),
    ("    dpo: {init: sft, rejectedFloor: 1.0, pairsFrom: s3://p/}\n", "spec.stages.dpo.rejectedFloor", "must be < 1", 10),
    ("    dpo: {init: sft, rpoAlpha: -0.5, pairsFrom: s3://p/}\n", "spec.stages.dpo.rpoAlpha", "must be >= 0", 10),
    ("      training: {zeroStage: 4}\n", "spec.stages.sft.training.zeroStage", "must be <= 3", 10),
    ("      extra: 1\n", "spec.stages.sft.extra", "unknown field", 10),
    # a DeepSpeed batch geometry the settings cannot produce: refused at validate, not at step 0
    ("      training: {zeroStage: 3, globalBatchSize: 12, microBatchSize: 4}\n      resources: {gpusPerNode: 8}\n",
     "spec.stages.sft.training.globalBatchSize", "not a multiple of microBatchSize 4 x 8 rank(s)", 10),
    ("    pairs: {prompts: s3://p.jsonl}\n", "spec.judge", "required when the pairs stage runs", None),
    ("    bestOfN: {policy: sft, rewardModel: s3://rm/}\n", "spec.stages.bestOfN.prompts", "required unless", 10),
    ("    evaluate: {models: [sft, dpo], mtBench: {questions: s3://q}}\n  judge: {}\n",
     "spec.stages.evaluate.models[1]", "'dpo' must name a stage", 10),
    # reference: a stage that is not evaluated (so has no answers to compare with)
    ("    rejectionSampling: {from: s3://m/}\n    evaluate: {models: [rejectionSampling], "
     "alpacaEval: {prompts: s3://a, reference: sft}}\n  judge: {}\n",
     "spec.stages.evaluate.alpacaEval.reference", "'sft' must be one of evaluate.models", 11),
    ("    evaluate: {models: [sft], alpacaEval: {prompts: s3://a, reference: gpt4}}\n  judge: {}\n",
     "spec.stages.evaluate.alpacaEval.reference", "must match", 10),
    ("    evaluate: {models: [sft], mtBench: {questions: s3://q}, passGrade: 11}\n  judge: {}\n",
     "spec.stages.evaluate.passGrade", "must be <= 10", 10),
]


@pytest.mark.parametrize("extra,path,message,line", BAD, ids=[b[1] for b in BAD])
def test_bad_spec_names_field_and_line(tmp_path, extra, path, message, line):
    f = tmp_path / "run.yaml"
    f.write_text(MINIMAL + extra)
    with pytest.raises(SpecError) as e:
        load_run(f)
    errors = {p: (ln, msg) for ln, p, msg in e.value.errors}
    assert path in errors, str(e.value)
    assert message in errors[path][1]
    if line:
        assert errors[path][0] == line
    res = xwin("validate", str(f))
    assert res.returncode == 1 and f"{f}:" in res.stderr and path in res.stderr


def test_every_error_reported_at_once(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(MINIMAL.replace("s3://models/base/", "models/base") + "      training: {epochs: 0, seed: -1}\n")
    res = xwin("validate", str(f))
    assert res.returncode == 1
    for p in ("spec.baseModel", "spec.stages.sft.training.epochs", "spec.stages.sft.training.seed"):
        assert p in res.stderr


def test_yaml_syntax_error_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("spec: {a: [1, 2}\n")
    with pytest.raises(SpecError, match=r"broken.yaml:1: <yaml>"):
        load_run(f)
    with pytest.raises(SpecError, match="No such file"):
        load_run(tmp_path / "absent.yaml")


def test_cycle_is_refused():
    text = MINIMAL + ("    pairs: {prompts: s3://p, policy: dpo}\n    rewardModel: {}\n"
                      "    dpo: {init: sft, pairsFrom: pairs}\n  judge: {}\n")
    with pytest.raises(SpecError, match="cycle"):
        parse_run(text)


def test_crd_in_manifests_is_current():
    on_disk = (ROOT / "manifests/crd/alignmentruns.xwin.ai.yaml").read_text()
    assert on_disk == crd_yaml(), "run `make crd` to regenerate manifests/crd/"


def test_crd_is_structural_with_printer_columns():
    doc = crd()
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["names"]["shortNames"] == ["ar"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Stage", "Progress", "ETA", "Cost", "Age"]
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in schema_nodes(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "const"):
            assert banned not in node, (path, banned)
        if "properties" in node:
            assert "additionalProperties" not in node, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
    spec = schema["properties"]["spec"]
    assert spec["properties"]["stages"]["properties"]["dpo"]["properties"]["beta"] == {
        "description": spec["properties"]["stages"]["properties"]["dpo"]["properties"]["beta"]["description"],
        "default": 0.1, "exclusiveMinimum": True, "maximum": 100, "minimum": 0, "type": "number"}
    # nested training settings must not be defaulted by the API server: spec.defaults fills them
    training = spec["properties"]["stages"]["properties"]["sft"]["properties"]["training"]
    assert all("default" not in v for v in training["properties"].values())
    assert spec["properties"]["stages"]["properties"]["sft"]["properties"]["from"]["type"] == "string"


# The CRD's CEL rules and `xwin validate` must agree: evaluate the CEL with cel-python on
# specs as the API server sees them (defaults applied) and compare with the model's verdict.
CEL_CASES = [
    MINIMAL,
    MINIMAL + "    dpo: {init: rejectionSampling, pairsFrom: s3://p/}\n",
    MINIMAL + "    dpo: {init: sft, pairsFrom: s3://p/}\n",
    MINIMAL + "    dpo: {init: base, pairsFrom: bestOfN}\n",
    MINIMAL + "    dpo: {from: s3://m/}\n",
    MINIMAL.replace("      data: s3://data/sft.jsonl\n", "      from: s3://m/\n"),
    MINIMAL.replace("      data: s3://data/sft.jsonl\n", "      training: {epochs: 1}\n"),
    MINIMAL + "    pairs: {prompts: s3://p}\n",
    MINIMAL + "    pairs: {prompts: s3://p}\n  judge: {}\n",
    MINIMAL + "    evaluate: {models: [sft, s3://x/], alpacaEval: {prompts: s3://a, reference: s3://b}}\n  judge: {}\n",
    MINIMAL + "    evaluate: {models: [sft, dpo], alpacaEval: {prompts: s3://a, reference: s3://b}}\n  judge: {}\n",
    MINIMAL + "    evaluate: {models: [sft]}\n  judge: {}\n",
    MINIMAL + "    evaluate: {models: [sft], alpacaEval: {prompts: s3://a, reference: sft}}\n  judge: {}\n",
    MINIMAL + "    evaluate: {models: [sft, s3://m/], alpacaEval: {prompts: s3://a, reference: dpo}}\n  judge: {}\n",
    MINIMAL + "    dpo: {init: sft, pairsFrom: s3://p/}\n    evaluate: {alpacaEval: {prompts: s3://a, reference: base}}\n  judge: {}\n",
    MINIMAL + "    rewardModel: {pairs: s3://p/}\n    bestOfN: {prompts: s3://p}\n    rejectionSampling: {}\n",
    MINIMAL + "    bestOfN: {prompts: s3://p}\n",
]


def _cel_violations(spec_dict):
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    rules = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"]
    out = []
    for r in rules:
        if not env.program(env.compile(r["rule"])).evaluate({"self": celpy.json_to_cel(spec_dict)}):
            out.append(r["fieldPath"])
    return out


@pytest.mark.parametrize("text", CEL_CASES)
def test_cel_rules_agree_with_validate(text):
    data = yaml.safe_load(text)
    try:
        run = AlignmentRun.model_validate(data)
        model_ok, spec_dict = True, run.spec.model_dump(by_alias=True, exclude_none=True)
    except Exception:
        model_ok = False
        # what the API server would hold: the user's fields plus schema defaults of present objects
        spec_dict = copy.deepcopy(data["spec"])
        for key, stage in (spec_dict.get("stages") or {}).items():
            from xwin_operator.api import spec as S
            cls = {"sft": S.SFTStage, "pairs": S.PairsStage, "rewardModel": S.RewardModelStage,
                   "bestOfN": S.BestOfNStage, "rejectionSampling": S.RejectionSamplingStage,
                   "dpo": S.DPOStage, "evaluate": S.EvaluateStage}[key]
            filled = cls.model_validate(stage).model_dump(by_alias=True, exclude_none=True)
            spec_dict["stages"][key] = filled
    violations = _cel_violations(spec_dict)
    assert (not violations) == model_ok, violations


def test_import_operator_is_still_the_stdlib():
    res = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "xwin" not in res.stdout and "lib" in res.stdout


def test_import_xwin_jobs_is_light():
    code = ("import sys, xwin_jobs, xwin_jobs.task; "
            "heavy = [m for m in ('torch', 'transformers', 'boto3', 'kopf', 'openai', 'datasets') if m in sys.modules]; "
            "print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_validate_refuses_a_bare_n_key_that_kubectl_reads_as_false(tmp_path):
    """kubectl and Helm read YAML 1.1: a bare `n:` key is the boolean false there, and the API
    server refuses `spec.stages.bestOfN.false`; `xwin validate` says so with the line."""
    body = MINIMAL + "    bestOfN: {prompts: s3://p, rewardModel: s3://rm/, n: 4}\n"
    f = tmp_path / "run.yaml"
    f.write_text(body)
    res = xwin("validate", str(f))
    assert res.returncode == 1
    assert f'{f}:10: spec.stages.bestOfN.n: write the key as "n" (quoted)' in res.stderr, res.stderr
    f.write_text(body.replace(" n: 4", ' "n": 4'))
    assert xwin("validate", str(f)).returncode == 0
    assert parse_run(body).spec.stages.bestOfN.n == 4  # `xwin run` reads the file as it is
