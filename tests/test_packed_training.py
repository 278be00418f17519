"""Grouped / packed micro-batches and the labelled-positions-only head give the losses and
gradients of the plain path: one padded batch of the whole optimizer step, full logits,
fp32 log-softmax over every position (what the stages did before, and what TRL does).

Tolerances (float32 on CPU, a random tiny Llama): losses within 1e-5 relative; every
parameter's gradient within 1e-4 of the largest gradient entry (relative to max |grad|);
reference log-probabilities and rewards within 1e-4 absolute.
"""

import random

import pytest
import torch

from reference import collate_pairs, collate_sft, sequence_logprobs, sft_loss
from xwin_jobs.losses import bradley_terry_loss, dpo_sigmoid_loss
from xwin_jobs.training.batching import step_plan
from xwin_jobs.training.config import TrainingConfig
from xwin_jobs.training.data import PairExample, SftExample
from xwin_jobs.training.engine import DdpEngine
from xwin_jobs.training.loop import Trainer
from xwin_jobs.training.objectives import DpoObjective, RewardObjective, SftObjective
from xwin_jobs.training.packing import collate_rows, hidden_states, packing_supported
from xwin_jobs.training.varlen import VARLEN, use_varlen

VOCAB, PAD = 97, 0
LOSS_REL, GRAD_REL, VALUE_ABS = 1e-5, 1e-4, 1e-4


def llama(kind="causal"):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, num_labels=1, attn_implementation="sdpa")
    cls = LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification
    return cls(config).float()


def sequence(rng, length, prompt):
    ids = [rng.randrange(1, VOCAB) for _ in range(length)]
    return SftExample(ids, [-100] * prompt + ids[prompt:])


def conversations(n=12, seed=0):
    rng = random.Random(seed)
    return [sequence(rng, n_, rng.randrange(1, n_ - 1)) for n_ in
            (rng.choice([5, 8, 13, 21, 40, 70]) for _ in range(n))]


def pairs(n=10, seed=1):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randrange(2, 12)
        out.append(PairExample(sequence(rng, prompt + rng.randrange(2, 50), prompt),
                               sequence(rng, prompt + rng.randrange(2, 50), prompt)))
    return out


def engine_for(model):
    return DdpEngine(model, TrainingConfig(learning_rate=1e-3, max_grad_norm=0), total_steps=1, device="cpu")


def grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(ours, reference):
    assert ours.keys() == reference.keys()
    scale = max(g.abs().max().item() for g in reference.values())
    for name in reference:
        assert torch.allclose(ours[name], reference[name], rtol=0, atol=GRAD_REL * scale), name


def run_step(engine, objective, step, tokens, packed):
    """One optimizer step's accumulation as the loop does it: micro-batches by length,
    each weighted by its share of the step's loss units."""
    workload = objective.workload(packed)
    plan = step_plan([[step]], workload.lengths, 3, tokens, packed)[0]
    total = workload.weight(step)
    loss = 0.0
    for mb in plan:
        value, _ = objective.micro_step(engine, mb, packed)
        weighted = value * (workload.weight(mb) / total)
        weighted.backward()
        loss += float(weighted.detach())
    return loss, len(plan)


def test_packing_is_available_for_the_default_attention():
    assert packing_supported(llama())


@pytest.mark.parametrize("varlen", [False, True])
def test_packed_rows_keep_sequences_apart(varlen):
    model = llama().eval()
    seqs = conversations(6)
    with torch.no_grad():
        padded = hidden_states(model, collate_rows(seqs, PAD, packed=False))
        packed_batch = collate_rows(seqs, PAD, packed=True)
        if varlen:  # attention per sequence (training/varlen.py) instead of a block-causal mask
            assert use_varlen(model, "cpu") and model.config._attn_implementation == VARLEN
        packed = hidden_states(model, packed_batch)
    assert packed.shape[0] < padded.shape[0]  # several sequences share a row
    flat_p = packed.reshape(-1, packed.shape[-1])
    index = packed_batch["seq_index"].reshape(-1)
    for j, s in enumerate(seqs):
        alone = flat_p[index == j]
        assert torch.allclose(alone, padded[j, : len(s.input_ids)], atol=VALUE_ABS)


@pytest.mark.parametrize("packed,tokens,varlen", [(False, 0, False), (True, 0, False), (True, 150, False),
                                                  (True, 150, True)])
def test_sft_step_matches_one_padded_full_logits_batch(packed, tokens, varlen):
    examples = conversations()
    step = list(range(len(examples)))
    model = llama()
    engine = engine_for(model)
    batch = collate_sft(examples, PAD)
    reference_loss = sft_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
    reference_loss.backward()
    reference = grads(model)
    assert use_varlen(model, "cpu") if varlen else True
    loss, micro_batches = run_step(engine, SftObjective(examples, PAD), step, tokens, packed)
    assert micro_batches > 1
    assert loss == pytest.approx(float(reference_loss.detach()), rel=LOSS_REL)
    assert_same_grads(grads(model), reference)


def full_logits_pair_logprobs(model, chunk):
    batch = collate_pairs(chunk, PAD)
    logps = sequence_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
    return logps[: len(chunk)], logps[len(chunk):]


@pytest.mark.parametrize("packed,tokens,varlen", [(False, 0, False), (True, 200, False), (True, 200, True)])
def test_dpo_reference_and_step_match_the_full_logits_path(packed, tokens, varlen):
    data = pairs()
    model = llama()
    engine = engine_for(model)
    with torch.no_grad():
        c, r = full_logits_pair_logprobs(model.eval(), data)
    model.train()
    full = model.config._attn_implementation
    assert use_varlen(model, "cpu") if varlen else True
    objective = DpoObjective(data, PAD, TrainingConfig(micro_batch_size=3, micro_batch_tokens=tokens), beta=0.1)
    assert objective.prepare(engine, packed) == {}  # no store: computed with the policy as it is
    ref = objective.reference
    assert torch.allclose(ref, torch.stack([c, r], -1), atol=VALUE_ABS)
    ref = ref + torch.randn_like(ref) * 0.5  # a reference that differs from the policy
    model.config._attn_implementation = full
    pol_c, pol_r = full_logits_pair_logprobs(model, data)
    reference_loss, _, _ = dpo_sigmoid_loss(pol_c, pol_r, ref[:, 0], ref[:, 1], 0.1)
    reference_loss.backward()
    reference = grads(model)
    assert use_varlen(model, "cpu") if varlen else True
    objective.reference = ref
    loss, _ = run_step(engine, objective, list(range(len(data))), tokens, packed)
    assert loss == pytest.approx(float(reference_loss.detach()), rel=LOSS_REL)
    assert_same_grads(grads(model), reference)


@pytest.mark.parametrize("packed,tokens,varlen", [(False, 0, False), (True, 200, False), (True, 200, True)])
def test_reward_step_reads_the_last_token_like_the_sequence_classifier(packed, tokens, varlen):
    data = pairs(seed=2)
    model = llama("rm")
    engine = engine_for(model)
    batch = collate_pairs(data, PAD)
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    reference_loss, _ = bradley_terry_loss(rewards[: len(data)], rewards[len(data):])
    reference_loss.backward()
    reference = grads(model)
    assert use_varlen(model, "cpu") if varlen else True
    objective = RewardObjective(data, PAD, data, TrainingConfig(micro_batch_size=4, micro_batch_tokens=tokens))
    loss, _ = run_step(engine, objective, list(range(len(data))), tokens, packed)
    assert loss == pytest.approx(float(reference_loss.detach()), rel=LOSS_REL)
    assert_same_grads(grads(model), reference)
    held = objective.held_out_metrics(engine, packed)
    assert held["heldOutLoss"] == pytest.approx(float(reference_loss.detach()), abs=VALUE_ABS)


@pytest.mark.parametrize("packing", [False, True])
def test_the_trainer_settles_packing_before_the_workload_and_prepares_before_training(packing):
    calls = []

    class Recorded(SftObjective):
        def workload(self, packed):
            calls.append(("workload", packed))
            return super().workload(packed)

        def prepare(self, engine, packed):
            calls.append(("prepare", packed))
            return {"prepared": 1.0}

        def micro_step(self, engine, indices, packed):
            calls.append(("step", packed))
            return super().micro_step(engine, indices, packed)

    config = TrainingConfig(learning_rate=1e-3, global_batch_size=6, micro_batch_size=3,
                            packing=packing, gradient_checkpointing=False, checkpoint_every=0)
    engine = DdpEngine(llama(), config, total_steps=2, device="cpu")
    trainer = Trainer(engine, Recorded(conversations(), PAD), config)
    assert (trainer.packed, trainer.workload.packed, calls) == (packing, packing, [("workload", packing)])
    metrics = trainer.fit()
    assert calls[1] == ("prepare", packing) and set(calls[2:]) == {("step", packing)}
    assert metrics["steps"] == 2 and metrics["prepared"] == 1.0 and metrics["microBatchSize"] == 3


def test_varlen_attention_only_on_cpu_with_full_attention():
    assert not use_varlen(llama(), "cuda")  # flash-attention varlen is the GPU path
    model = llama()
    model.config._attn_implementation = "flex_attention"
    assert not use_varlen(model, "cpu")
