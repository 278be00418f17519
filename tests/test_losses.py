"""The training losses against values worked out by hand, and masking."""

import math

import pytest
import torch

from reference import sequence_logprobs, sft_loss
from xwin_jobs.losses import bradley_terry_loss, dpo_sigmoid_loss, length_normalised_nll

LN3 = math.log(3.0)


def two_token_logits():
    """[1, 3, vocab 2] logits. Position 0: [0, 0] -> p = (1/2, 1/2).
    Position 1: [ln 3, 0] -> p = (3/4, 1/4). Position 2 predicts nothing after the shift."""
    return torch.tensor([[[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]]])


def test_sft_loss_is_token_mean_of_nll_over_labelled_tokens():
    # labels[1] = 1 is predicted by position 0: -log(1/2) = ln 2
    # labels[2] = 0 is predicted by position 1: -log(3/4) = ln(4/3)
    # mean over the 2 labelled tokens: (ln 2 + ln(4/3)) / 2 = ln(8/3) / 2
    loss = sft_loss(two_token_logits(), torch.tensor([[5, 1, 0]]))  # labels[0] is never predicted
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-6)


def test_masked_tokens_do_not_contribute():
    # only labels[2] = 0 counts: -log(3/4) = ln(4/3)
    labels = torch.tensor([[-100, -100, 0]])
    logits = two_token_logits()
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    # changing the logits that predict the masked token changes nothing, and gets no gradient
    changed = logits.clone()
    changed[0, 0] = torch.tensor([7.0, -3.0])
    changed.requires_grad_(True)
    loss = sft_loss(changed, labels)
    assert loss.item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    loss.backward()
    assert torch.all(changed.grad[0, 0] == 0)
    assert torch.all(changed.grad[0, 2] == 0)  # the last position predicts nothing
    assert torch.any(changed.grad[0, 1] != 0)


def test_sft_loss_of_a_batch_without_labels_is_zero_not_nan():
    loss = sft_loss(two_token_logits(), torch.full((1, 3), -100))
    assert loss.item() == 0.0


def test_sft_loss_averages_over_tokens_of_the_whole_batch():
    # row 0 labels two tokens (ln 2 and ln(4/3)); row 1 labels one (ln(4/3)):
    # token mean = (ln 2 + 2 ln(4/3)) / 3, not the mean of the row means
    logits = two_token_logits().repeat(2, 1, 1)
    labels = torch.tensor([[0, 1, 0], [0, -100, 0]])
    expected = (math.log(2) + 2 * math.log(4 / 3)) / 3
    assert sft_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logprobs_sum_and_average_per_row():
    logits = two_token_logits().repeat(2, 1, 1)
    labels = torch.tensor([[0, 1, 0], [0, -100, 1]])
    # row 0: log(1/2) + log(3/4) = ln(3/8); row 1: only labels[2] = 1: log(1/4)
    total = sequence_logprobs(logits, labels)
    assert total.tolist() == pytest.approx([math.log(3 / 8), math.log(1 / 4)], rel=1e-6)
    # average: row 0 over 2 tokens, row 1 over 1 token
    mean = sequence_logprobs(logits, labels, average=True)
    assert mean.tolist() == pytest.approx([math.log(3 / 8) / 2, math.log(1 / 4)], rel=1e-6)


def test_bradley_terry_loss_and_accuracy():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    # differences 2, 0, -2: -log sigmoid(d) = log(1 + e^-d)
    # = ln(1 + e^-2), ln 2, ln(1 + e^2); accuracy counts d > 0 only: 1 of 3
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == pytest.approx(1 / 3)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d/dc [-log sigmoid(c - r)] = -sigmoid(r - c) = -1/2 at c = r
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


def test_dpo_sigmoid_loss_by_hand():
    # chosen log-ratio: -1 - (-2) = 1; rejected: -3 - (-2) = -1
    # beta = 0.5: z = 0.5 * (1 - (-1)) = 1; loss = -log sigmoid(1) = ln(1 + e^-1)
    # implicit rewards: 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5
    loss, chosen_r, rejected_r = dpo_sigmoid_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.5])
    assert rejected_r.tolist() == pytest.approx([-0.5])
    assert not chosen_r.requires_grad


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    # z = 0 for every pair, whatever the log-probabilities: -log sigmoid(0) = ln 2
    pol_c, pol_r = torch.tensor([-4.0, -1.5]), torch.tensor([-2.0, -7.0])
    loss, chosen_r, rejected_r = dpo_sigmoid_loss(pol_c, pol_r, pol_c.clone(), pol_r.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert chosen_r.tolist() == [0.0, 0.0] and rejected_r.tolist() == [0.0, 0.0]


def test_dpo_gradient_scales_with_beta():
    # d loss / d pi_c = -beta * sigmoid(-z); at z = 0: -beta / 2
    pol_c = torch.tensor([-1.0], requires_grad=True)
    loss, _, _ = dpo_sigmoid_loss(pol_c, torch.tensor([-1.0]), torch.tensor([-1.0]),
                                  torch.tensor([-1.0]), beta=0.2)
    loss.backward()
    assert pol_c.grad.item() == pytest.approx(-0.1)


def rpo_case():
    """Two pairs: chosen log-probs -4 (2 tokens) and -9 (3 tokens); their per-token NLLs
    are 2 and 3, mean 2.5."""
    return (torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0]), torch.tensor([-5.0, -8.0]),
            torch.tensor([-5.0, -6.0]), torch.tensor([2, 3]))


def test_rpo_alpha_zero_is_plain_dpo():
    pol_c, pol_r, ref_c, ref_r, tokens = rpo_case()
    plain = dpo_sigmoid_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5)
    rpo0 = dpo_sigmoid_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5, rpo_alpha=0.0, chosen_tokens=tokens)
    assert all(torch.equal(a, b) for a, b in zip(plain, rpo0))


def test_rpo_adds_alpha_times_the_chosen_answers_mean_token_nll():
    pol_c, pol_r, ref_c, ref_r, tokens = rpo_case()
    plain, _, _ = dpo_sigmoid_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5)
    rpo, chosen_r, _ = dpo_sigmoid_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5, rpo_alpha=0.4,
                                        chosen_tokens=tokens)
    assert length_normalised_nll(pol_c, tokens).tolist() == pytest.approx([2.0, 3.0])
    assert rpo.item() == pytest.approx(plain.item() + 0.4 * 2.5, rel=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.5 * 1.0, 0.5 * -1.0])  # rewards unchanged


def test_rpo_pulls_chosen_log_probability_up_where_dpo_alone_does_not():
    # policy == reference: DPO's gradient on pi_c is -beta/2 per pair / N; RPO adds
    # -alpha / (tokens * N): a stronger push up on the chosen answer, more for short ones
    pol_c, pol_r, _, _, tokens = rpo_case()
    grads = {}
    for alpha in (0.0, 1.0):
        c = pol_c.clone().requires_grad_(True)
        loss, _, _ = dpo_sigmoid_loss(c, pol_r, pol_c, pol_r, beta=0.1, rpo_alpha=alpha, chosen_tokens=tokens)
        loss.backward()
        grads[alpha] = c.grad.tolist()
    assert grads[0.0] == pytest.approx([-0.025, -0.025])
    assert grads[1.0] == pytest.approx([-0.025 - 1 / 4, -0.025 - 1 / 6])
    # a gradient step on the loss raises log p(chosen) by more with RPO
    assert all(g1 < g0 < 0 for g0, g1 in zip(grads[0.0], grads[1.0]))


def test_rpo_needs_the_chosen_token_counts():
    pol_c, pol_r, ref_c, ref_r, _ = rpo_case()
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_sigmoid_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5, rpo_alpha=1.0)
