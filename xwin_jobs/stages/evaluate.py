"""`evaluate`: AlpacaEval-style win rates and MT-bench-style grades for each listed model.

Task: inputs {"model:<name>": model URI for each name in params.models, alpacaPrompts (prompt
records), alpacaReference ({"id", "output"}), mtBenchQuestions ({"id", "turns":
[q1, q2]})}; params {models, sampling, serving, judge, referenceModel, passGrade,
recipeStages}. Either benchmark may be absent. With `referenceModel` (one of models) the
reference outputs are that model's own answers instead of an alpacaReference file; every
alpaca prompt id must have a reference, checked before anything is sampled or judged.

Steps (each its own process; the last writes the marker):

- `evaluate-sample` (`sample_step`), once per model with XWIN_MODEL_INPUT=model:<name> and
  a vLLM server of that model at XWIN_SERVER_URL (else OPENAI_BASE_URL): one answer per
  AlpacaEval prompt (`answers/<name>/alpaca/`), then MT-bench turn 1 (`mtbench-1/`) and turn
  2 asked after the model's own turn-1 answer (`mtbench-2/`). Resumable like every sampler.
- `evaluate-judge` (`judge_step`, the stage `evaluate`): AlpacaEval: each answer against the
  reference output, both orders, the model's share of the two orders (tie = half) averaged
  over prompts; MT-bench: a 1-10 grade of each turn's answer in its conversation. Judgments
  are cached like the pairs stage's (`judge/cache/`). Every figure has a 95% bootstrap
  interval (xwin_jobs.judge.table). Writes `data/report.json` and `data/report.md` (the
  paper's table: one row per model; the reward model's held-out accuracy and the best-of-N
  statistics read from the markers of `recipeStages`; the cost of every stage upstream, by
  stage and in total: `run_cost`), `data/details-*.jsonl` (every item's
  verdicts), `data/pipeline.png` (the figures along the pipeline with error bars) and
  `data/mtbench.png` (grade histograms; matplotlib, Agg backend).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from ..judge.core import JudgeError, JudgeRequest, redact
from ..judge.cost import BudgetExceeded
from ..judge.templates import PAIRWISE, SINGLE, pairwise_messages, single_messages
from ..records import RecordError, iter_records
from ..store import Store, as_folder, join_uri
from ..task import StageTask
from . import StageContext, StageError, StageResult, run_stage, upstream_digests
from .pairs import judge_request, judge_settings, sample_from_server, sampling_server_url
from .sampling_common import (done_marker, folder_complete, input_states, json_digest, load_prompts,
                              model_stage_digest, scratch_dir)

log = logging.getLogger("xwin_jobs.stage.evaluate")
ANSWERS, DATA, JUDGE = "answers/", "data/", "judge/"
PARTS = ("alpaca", "mtbench-1", "mtbench-2")


def model_names(task: StageTask) -> list[str]:
    names = task.params.get("models") or [k.split(":", 1)[1] for k in task.inputs if k.startswith("model:")]
    if not names:
        raise StageError("params.models: no model to evaluate")
    for name in names:
        if not task.inputs.get(f"model:{name}"):
            raise StageError(f"task.inputs.model:{name} is required (params.models lists {name!r})")
    return [str(n) for n in names]


def model_slug(name: str, index: int) -> str:
    """A folder name for a model: its name when simple, else m<index>."""
    return name if re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,40}", name) else f"m{index}"


def answers_folder(task: StageTask, name: str, part: str) -> str:
    slug = model_slug(name, model_names(task).index(name))
    return join_uri(as_folder(task.output), ANSWERS, slug, f"{part}/")


def part_digest(task: StageTask, name: str, part: str, upstream: Mapping[str, str]) -> str:
    model = task.inputs[f"model:{name}"]
    source = task.inputs.get("alpacaPrompts") if part == "alpaca" else task.inputs.get("mtBenchQuestions")
    own = json_digest({"model": model, "source": source, "part": part,
                       "sampling": task.params.get("sampling"), "chat_template": task.chat_template,
                       "upstream": model_stage_digest(model, upstream),
                       "contents": input_states(upstream, source)})
    if part == "mtbench-2":   # turn 2 follows the model's own turn-1 answers
        return json_digest({"turn1": part_digest(task, name, "mtbench-1", upstream), "own": own})
    return own


# ----------------------------------------------------------------------------- inputs


def _json_lines(store: Store, uri: str):
    """(shard, line number, parsed JSON) of every line of the shards behind `uri`."""
    import json

    from ..records import open_lines, shard_uris

    for shard in shard_uris(store, uri):
        for number, raw in open_lines(store, shard):
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise RecordError(shard, number, "<json>", f"invalid JSON: {e.msg}") from None
            yield shard, number, obj


def read_mt_bench(store: Store, uri: str) -> list[dict[str, Any]]:
    """MT-bench questions: {"id", "turns": [q1, q2]} (two non-empty strings)."""
    out, seen = [], set()
    for shard, number, obj in _json_lines(store, uri):
        if not isinstance(obj, dict):
            raise RecordError(shard, number, "<record>", "must be a JSON object")
        qid = obj.get("id", obj.get("question_id"))
        if qid is None or str(qid) == "":
            raise RecordError(shard, number, "id", "is required")
        turns = obj.get("turns")
        if not isinstance(turns, list) or len(turns) != 2 or \
                not all(isinstance(t, str) and t.strip() for t in turns):
            raise RecordError(shard, number, "turns", "must be a list of two non-empty strings")
        if str(qid) in seen:
            raise RecordError(shard, number, "id", f"{qid!r} appears more than once")
        seen.add(str(qid))
        out.append({"id": str(qid), "turns": turns})
    if not out:
        raise RecordError(uri, None, None, "no MT-bench questions there")
    return out


def reference_source(task: StageTask) -> str:
    """What the alpaca answers are compared with, as the user named it."""
    return str(task.params.get("referenceModel") or task.inputs.get("alpacaReference"))


def check_references(task: StageTask, prompt_ids: list[str], references: Mapping[str, str]) -> None:
    """Every alpaca prompt has a reference output, else a StageError naming the field and the
    first prompt id without one (raised before anything is judged)."""
    missing = [pid for pid in prompt_ids if pid not in references]
    if missing:
        raise StageError(f"alpacaEval.reference ({reference_source(task)}): no reference output "
                         f"for prompt id {missing[0]!r} ({len(missing)} of {len(prompt_ids)} "
                         f"prompts have none)")


def load_references(task: StageTask, store: Store) -> dict[str, str]:
    """Reference outputs by prompt id: the reference model's answers, or the reference file."""
    ref = task.params.get("referenceModel")
    if ref:
        if ref not in model_names(task):
            raise StageError(f"params.referenceModel: {ref!r} is not one of the models evaluated "
                             f"({', '.join(model_names(task))})")
        return {pid: r["responses"][0]["content"]
                for pid, r in _answers(store, answers_folder(task, ref, "alpaca")).items()}
    if not task.inputs.get("alpacaReference"):
        raise StageError("task.inputs.alpacaReference is required with alpacaPrompts "
                         "(or params.referenceModel)")
    return read_references(store, task.inputs["alpacaReference"])


def read_references(store: Store, uri: str) -> dict[str, str]:
    """AlpacaEval reference outputs by prompt id: {"id", "output"} records."""
    refs: dict[str, str] = {}
    for shard, number, obj in _json_lines(store, uri):
        if not isinstance(obj, dict) or obj.get("id") in (None, ""):
            raise RecordError(shard, number, "id", "is required")
        if not isinstance(obj.get("output"), str):
            raise RecordError(shard, number, "output", "must be a string")
        refs[str(obj["id"])] = obj["output"]
    if not refs:
        raise RecordError(uri, None, None, "no reference outputs there")
    return refs


# ----------------------------------------------------------------------------- sampling


def sample_model(task: StageTask, store: Store, name: str, server_url: str | None,
                 workdir: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every answer of one model that is not written yet."""
    upstream = upstream_digests(store, task)
    model_input = f"model:{name}"
    done: dict[str, Any] = {}
    if task.inputs.get("alpacaPrompts"):
        prompts = load_prompts(store, task.inputs["alpacaPrompts"])
        done["alpaca"] = sample_from_server(
            task, store, answers_folder(task, name, "alpaca"), prompts, 1,
            part_digest(task, name, "alpaca", upstream), model_input, workdir, server_url, env)
    if task.inputs.get("mtBenchQuestions"):
        questions = read_mt_bench(store, task.inputs["mtBenchQuestions"])
        first = answers_folder(task, name, "mtbench-1")
        done["mtbench-1"] = sample_from_server(
            task, store, first, [{"id": q["id"], "messages": [{"role": "user", "content": q["turns"][0]}]}
                                 for q in questions], 1,
            part_digest(task, name, "mtbench-1", upstream), model_input, workdir, server_url, env)
        answers = {r["id"]: r["responses"][0]["content"] for r in iter_records(store, first, "scored")}
        second = [{"id": q["id"], "messages": [
            {"role": "user", "content": q["turns"][0]},
            {"role": "assistant", "content": answers[q["id"]]},
            {"role": "user", "content": q["turns"][1]}]} for q in questions]
        done["mtbench-2"] = sample_from_server(
            task, store, answers_folder(task, name, "mtbench-2"), second, 1,
            part_digest(task, name, "mtbench-2", upstream), model_input, workdir, server_url, env)
    return done


def _needed_parts(task: StageTask) -> list[str]:
    parts = ["alpaca"] if task.inputs.get("alpacaPrompts") else []
    return parts + (["mtbench-1", "mtbench-2"] if task.inputs.get("mtBenchQuestions") else [])


def answers_complete(task: StageTask, store: Store, name: str) -> bool:
    upstream = upstream_digests(store, task)
    return all(folder_complete(store, answers_folder(task, name, p),
                               part_digest(task, name, p, upstream))
               for p in _needed_parts(task))


def samples_done(task: StageTask, store: Store, model_input: str) -> bool:
    """Whether the answers of the model input `model:<name>` are all in (a serve step need not
    start a server)."""
    return model_input.startswith("model:") and answers_complete(task, store, model_input.split(":", 1)[1])


def sample_step(task: StageTask, store: Store) -> dict[str, Any]:
    """`python -m xwin_jobs evaluate-sample` for the model named by XWIN_MODEL_INPUT."""
    upstream = upstream_digests(store, task)
    marker = done_marker(store, task, upstream)
    if marker is not None:
        log.info("stage evaluate already done; nothing to sample")
        return {**marker, "skipped": True}
    names = model_names(task)
    chosen = os.environ.get("XWIN_MODEL_INPUT", "")
    if chosen:
        name = chosen.split(":", 1)[1] if chosen.startswith("model:") else chosen
        if name not in names:
            raise StageError(f"XWIN_MODEL_INPUT={chosen!r}: not one of the models evaluated "
                             f"({', '.join(names)})")
    elif len(names) == 1:
        name = names[0]
    else:
        raise StageError("set XWIN_MODEL_INPUT=model:<name> to say which model the server "
                         f"serves (one of {', '.join(names)})")
    if task.inputs.get("alpacaPrompts") and not task.params.get("referenceModel"):
        check_references(task, [p["id"] for p in load_prompts(store, task.inputs["alpacaPrompts"])],
                         load_references(task, store))
    with scratch_dir("xwin-evaluate-sample-") as tmp:
        done = sample_model(task, store, name, sampling_server_url(os.environ, True), Path(tmp))
    return {"metrics": {part: p.get("lastAttempt", {}) for part, p in done.items()}}


def judge_step(task: StageTask, store: Store) -> dict[str, Any]:
    """`python -m xwin_jobs evaluate-judge`: the stage itself (marker last)."""
    return run_stage(task, store)


# ----------------------------------------------------------------------------- judging


def _answers(store: Store, folder: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in iter_records(store, folder, "scored")}


def plan_model(task: StageTask, store: Store, name: str, judge_model: str,
               references: Mapping[str, str], questions: list[dict[str, Any]]
               ) -> dict[str, list[tuple[str, JudgeRequest, JudgeRequest | None]]]:
    """The judge requests of one model: alpaca items (forward: model first, backward) and
    MT-bench turns (a single grade each)."""
    plan: dict[str, list] = {"alpaca": [], "mtbench": []}
    if task.inputs.get("alpacaPrompts"):
        answers = _answers(store, answers_folder(task, name, "alpaca"))
        check_references(task, list(answers), references)
        for pid, r in answers.items():
            answer, ref = r["responses"][0]["content"], references[pid]
            if answer == ref:   # the same text: a tie, not worth paying a judge for
                plan["alpaca"].append((pid, None, None))
                continue
            plan["alpaca"].append((pid, judge_request(judge_model, PAIRWISE, pairwise_messages(r["prompt"], answer, ref)),
                                   judge_request(judge_model, PAIRWISE, pairwise_messages(r["prompt"], ref, answer))))
    if questions:
        turn1 = _answers(store, answers_folder(task, name, "mtbench-1"))
        turn2 = _answers(store, answers_folder(task, name, "mtbench-2"))
        for q in questions:
            a1 = turn1[q["id"]]["responses"][0]["content"]
            a2 = turn2[q["id"]]["responses"][0]["content"]
            convo = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a1}]
            plan["mtbench"].append((f"{q['id']}:1", judge_request(judge_model, SINGLE, single_messages(convo)), None))
            convo2 = convo + [{"role": "user", "content": q["turns"][1]}, {"role": "assistant", "content": a2}]
            plan["mtbench"].append((f"{q['id']}:2", judge_request(judge_model, SINGLE, single_messages(convo2)), None))
    return plan


def run_cost(task: StageTask, store: Store, judge_usd: float) -> dict[str, Any]:
    """The report's cost: every stage up the marker graph from the evaluated models and the
    recipe's stages (their markers' `cost`), this stage's own steps so far and judge USD, and
    the total (xwin_jobs.cost)."""
    from ..cost import stage_cost, step_costs, totals, upstream_costs

    costs = upstream_costs(store, [*task.markers, *(task.params.get("recipeStages") or {}).values()])
    costs[task.stage] = stage_cost(step_costs(store, task.output), {"estimatedCostUSD": judge_usd})
    return {"stages": costs, "total": totals(costs)}


def run(ctx: StageContext) -> StageResult:
    from ..judge.runner import check_complete, judge_all
    from ..records import write_records
    from ..judge.report import render_markdown, write_plots
    from ..judge.table import paper_table, recipe_figures, summarize_model
    from ..store import read_marker

    task, store = ctx.task, ctx.store
    settings = judge_settings(task)
    names = model_names(task)
    if not _needed_parts(task):
        raise StageError("evaluate: give alpacaPrompts + alpacaReference, mtBenchQuestions, or both")
    for name in names:
        if not answers_complete(task, store, name):
            raise StageError(f"the answers of model {name!r} are incomplete in "
                             f"{ctx.output(ANSWERS)}: run evaluate-sample for it first "
                             f"(XWIN_MODEL_INPUT=model:{name})")
    references = load_references(task, store) if task.inputs.get("alpacaPrompts") else {}
    questions = read_mt_bench(store, task.inputs["mtBenchQuestions"]) \
        if task.inputs.get("mtBenchQuestions") else []
    plans = {n: plan_model(task, store, n, settings.model, references, questions) for n in names}
    requests = [r for p in plans.values() for items in p.values() for _, a, b in items
                for r in (a, b) if r is not None]
    log.info("evaluate: %d model(s), %d judge request(s)", len(names), len(requests))
    try:
        judged, budget = judge_all(requests, settings, store, ctx.output(JUDGE))
        check_complete(judged, budget)
    except (JudgeError, BudgetExceeded) as e:
        raise StageError(redact(str(e))) from None

    report: dict[str, Any] = {"judge": {"model": settings.model, "mode": settings.mode,
                                        "templates": [PAIRWISE.version, SINGLE.version],
                                        "estimatedCostUSD": round(budget.spent_usd, 6)},
                              "reference": reference_source(task) if references else None,
                              "passGrade": task.params.get("passGrade"), "models": {}}
    details: list[dict] = []
    metrics: dict[str, Any] = {}
    for name in names:
        summary, items = summarize_model(plans[name], judged.judgments, task.params.get("passGrade"))
        report["models"][name] = {"uri": task.inputs[f"model:{name}"], **summary}
        details += [{"model": name, **d} for d in items]
        if summary["alpacaEval"]:
            metrics[f"{name}.alpacaWinRate"] = summary["alpacaEval"]["winRate"]
        if summary["mtBench"]:
            metrics[f"{name}.mtBench"] = summary["mtBench"]["mean"]
            if "accuracy" in summary["mtBench"]:
                metrics[f"{name}.accuracy"] = summary["mtBench"]["accuracy"]
    report["table"] = paper_table(report)
    report["recipe"] = recipe_figures({k: read_marker(store, uri) for k, uri in
                                       (task.params.get("recipeStages") or {}).items()})
    report["cost"] = run_cost(task, store, budget.spent_usd)
    metrics.update(judgeRequests=len(requests), judgeAsks=judged.stats.get("asks", 0),
                   judgeCached=judged.stats.get("cached", 0),
                   estimatedCostUSD=round(budget.spent_usd, 6), judgeModel=settings.model)
    ctx.clear(DATA)
    data = ctx.output(DATA)
    store.write_json(join_uri(data, "report.json"), report)
    store.write_text(join_uri(data, "report.md"), render_markdown(report))
    write_records(store, data, [{"id": f"{d['model']}/{d['benchmark']}/{d['id']}", **d}
                                for d in details], prefix="details", max_records=10**9)
    for local in write_plots(report, ctx.workdir):
        store.upload_file(local, join_uri(data, local.name))
    return StageResult(counts={"models": len(names), "judgeRequests": len(requests)},
                       metrics=metrics, outputs={"report": join_uri(data, "report.md")})
