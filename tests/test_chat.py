"""Chat templates: what is rendered, and exactly which tokens are trained on."""

import pytest
from tiny_files import tiny_model_module

from xwin_jobs.chat import (IGNORE_INDEX, VICUNA_SYSTEM, ChatFormatError, encode_conversation,
                            encode_prompt, render_prompt, render_with_spans)


CONVERSATION = [
    {"role": "user", "content": "what is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 4 plus 1?"},
    {"role": "assistant", "content": "also 5, as before"},
]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [m["content"] for m in CONVERSATION] + [VICUNA_SYSTEM, "USER: ASSISTANT: hello there"]
    return tiny_model_module().build_tiny_tokenizer(corpus * 5, vocab_size=400)


def labelled_runs(labels):
    """Maximal runs of consecutive labelled positions, as lists of token ids."""
    runs, current = [], []
    for label in labels:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_vicuna_renders_xwin_lm_format():
    text, _ = render_with_spans(CONVERSATION, "vicuna", None)
    assert text == (VICUNA_SYSTEM + " USER: what is 2 plus 3? ASSISTANT: 5</s>"
                    "USER: and 4 plus 1? ASSISTANT: also 5, as before</s>")


def test_vicuna_uses_a_given_system_message():
    text, _ = render_with_spans([{"role": "system", "content": "Be brief."}] + CONVERSATION[:2],
                                "vicuna", None)
    assert text == "Be brief. USER: what is 2 plus 3? ASSISTANT: 5</s>"


def test_vicuna_multi_turn_labels_exactly_the_assistant_tokens(tokenizer):
    enc = encode_conversation(CONVERSATION, "vicuna", tokenizer)
    assert len(enc.input_ids) == len(enc.labels)
    # every labelled position keeps its own token id
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(enc.input_ids, enc.labels))
    runs = labelled_runs(enc.labels)
    # one run per assistant turn, each closed by the eos token
    assert len(runs) == 2
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)
    assert tokenizer.decode(runs[0]) == " 5</s>"
    assert tokenizer.decode(runs[1]) == " also 5, as before</s>"
    # and everything else is the unlabelled rest of the text: system, user turns, role tags
    unlabelled = [t for t, l in zip(enc.input_ids, enc.labels) if l == IGNORE_INDEX]
    assert tokenizer.decode(unlabelled, skip_special_tokens=True) == (
        VICUNA_SYSTEM + " USER: what is 2 plus 3? ASSISTANT:USER: and 4 plus 1? ASSISTANT:")
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX


def test_label_from_trains_only_on_the_response(tokenizer):
    # a DPO / reward-model pair: the prompt's own assistant turn is context, not target
    enc = encode_conversation(CONVERSATION, "vicuna", tokenizer, label_from=3)
    runs = labelled_runs(enc.labels)
    assert [tokenizer.decode(r) for r in runs] == [" also 5, as before</s>"]


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    full = encode_conversation(CONVERSATION, "vicuna", tokenizer)
    cut = encode_conversation(CONVERSATION, "vicuna", tokenizer, max_length=len(full.input_ids) - 3)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-3]
    assert cut.labels == full.labels[:-3]


def test_vicuna_prompt_is_the_training_prefix(tokenizer):
    prompt = render_prompt(CONVERSATION[:3], "vicuna", tokenizer)
    assert prompt.endswith("USER: and 4 plus 1? ASSISTANT:")
    full_text, _ = render_with_spans(CONVERSATION, "vicuna", tokenizer)
    assert full_text.startswith(prompt)
    # the sampler's tokens are exactly the tokens the model saw before the answer in training
    prompt_ids = encode_prompt(CONVERSATION[:3], "vicuna", tokenizer)
    full = encode_conversation(CONVERSATION, "vicuna", tokenizer)
    assert full.input_ids[: len(prompt_ids)] == prompt_ids
    assert full.labels[len(prompt_ids)] != IGNORE_INDEX  # the answer starts right after


def test_tokenizer_template_labels_assistant_turns(tokenizer):
    enc = encode_conversation(CONVERSATION, "tokenizer", tokenizer)
    runs = labelled_runs(enc.labels)
    # the tiny tokenizer's template closes an assistant turn with "</s>\n"
    assert [tokenizer.decode(r) for r in runs] == [" 5</s>\n", " also 5, as before</s>\n"]
    assert enc.input_ids.count(tokenizer.bos_token_id) == 1  # the template's own BOS only
    prompt_ids = encode_prompt(CONVERSATION[:3], "tokenizer", tokenizer)
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("messages, message", [
    ([], "no messages"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "messages[1]"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
])
def test_bad_conversations_are_named(messages, message):
    with pytest.raises(ChatFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render_with_spans(messages, "vicuna", None)


def test_unknown_template_and_prompt_ending_with_assistant():
    with pytest.raises(ChatFormatError, match="unknown chat template"):
        render_prompt(CONVERSATION[:1], "chatml", None)
    with pytest.raises(ChatFormatError, match="must not end with an assistant"):
        render_prompt(CONVERSATION[:2], "vicuna", None)


def test_training_examples_do_not_depend_on_the_order_records_were_written(tokenizer):
    """A judge or sampler writes its records as requests finish, so the same pairs come in
    another order on every run: the encoded examples (what the seeded shuffle orders) are the
    same, in id order."""
    import random

    from xwin_jobs.training.data import encode_conversations, encode_pairs

    pairs = [{"id": f"p-{i}", "prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
              "chosen": [{"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}],
              "rejected": [{"role": "assistant", "content": "I do not know."}]} for i in range(12)]
    shuffled = pairs[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != pairs
    first, _ = encode_pairs(pairs, "vicuna", tokenizer, 64)
    second, _ = encode_pairs(shuffled, "vicuna", tokenizer, 64)
    assert [(e.chosen.input_ids, e.rejected.input_ids) for e in first] == \
        [(e.chosen.input_ids, e.rejected.input_ids) for e in second]
    conversations = [{"id": p["id"], "messages": p["prompt"] + p["chosen"]} for p in pairs]
    a, _ = encode_conversations(conversations, "vicuna", tokenizer, 64)
    b, _ = encode_conversations(list(reversed(conversations)), "vicuna", tokenizer, 64)
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert tokenizer.decode(a[0].input_ids, skip_special_tokens=True).endswith("0 plus 1 is 1.")
