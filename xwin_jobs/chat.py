"""Chat templates: turning messages into training tokens and sampling prompts.

Two templates (the `chatTemplate` field of an AlignmentRun):

- `vicuna`: Xwin-LM's prompt format (FastChat's vicuna_v1.1)::

      <system> USER: <u1> ASSISTANT: <a1></s>USER: <u2> ASSISTANT: <a2></s>

  with the default system line below when the conversation has no system message.
  A prompt for sampling ends with "ASSISTANT:" (no trailing space: the model writes the
  space as part of its first token, exactly as it saw in training).
- `tokenizer`: the tokenizer's own `chat_template` (tokenizer.apply_chat_template).

`encode_conversation` returns token ids plus labels in which only the tokens of assistant
turns (every turn, including the end-of-sequence marker closing each) keep their id; all
other positions are -100. It renders the conversation to text while recording the character
spans of assistant turns, tokenizes once with offsets, and labels the tokens that overlap a
span, so multi-turn masks are exact and the same code serves both templates.

`render_prompt` / `encode_prompt` give the prompt part (ending where the assistant starts)
rendered exactly as in training, for the sampler; `chat_format` pairs that encoder with
`to_content`, which turns a sampled completion back into message content.

Pure: the tokenizer is passed in; nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

TEMPLATES = ("vicuna", "tokenizer")
IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_VICUNA_ROLES = {"user": "USER", "assistant": "ASSISTANT"}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (bad role, misplaced system message, ...)."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_labelled(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise ChatFormatError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}]: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ChatFormatError(f"messages[{i}].role: expected system|user|assistant, got {role!r}")
        if role == "system" and i != 0:
            raise ChatFormatError(f"messages[{i}]: a system message may only come first")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"messages[{i}].content: expected a string")


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ChatFormatError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")


def _eos_text(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    return eos or "</s>"


def _vicuna_render(messages: Sequence[dict[str, Any]], eos: str, label_from: int,
                   generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """FastChat vicuna_v1.1: system + " " then "ROLE: msg" + (" " after user, eos after assistant)."""
    if messages and messages[0]["role"] == "system":
        text, rest, offset = messages[0]["content"] + " ", messages[1:], 1
    else:
        text, rest, offset = VICUNA_SYSTEM + " ", messages, 0
    spans: list[tuple[int, int]] = []
    for j, m in enumerate(rest):
        role = _VICUNA_ROLES[m["role"]]
        if m["role"] == "assistant":
            text += role + ":"
            start = len(text)  # the space before the content is the content's first token
            text += " " + m["content"] + eos
            if j + offset >= label_from:
                spans.append((start, len(text)))
        else:
            text += role + ": " + m["content"] + " "
    if generation_prompt:
        text += "ASSISTANT:"
    return text, spans


def _apply(tokenizer: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("chat template 'tokenizer' needs a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _tokenizer_render(messages: Sequence[dict[str, Any]], tokenizer: Any,
                      label_from: int) -> tuple[str, list[tuple[int, int]]]:
    """Assistant turn i spans from the end of render(messages[:i], generation prompt) to the
    end of render(messages[:i+1]); this needs a prefix-consistent template (most are)."""
    text = _apply(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < label_from:
            continue
        before = _apply(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _apply(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ChatFormatError(
                "the tokenizer's chat_template is not prefix-consistent (rendering a conversation "
                f"does not extend the rendering of its first {i} messages); use chatTemplate: vicuna")
        spans.append((len(before), len(through)))
    return text, spans


def render_with_spans(messages: Sequence[dict[str, Any]], template: str, tokenizer: Any,
                      label_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as text plus the [start, end) character spans of the assistant
    messages at index >= label_from (each span includes the text closing the turn)."""
    _check_template(template)
    _check_messages(messages)
    if template == "vicuna":
        return _vicuna_render(messages, _eos_text(tokenizer), label_from, generation_prompt=False)
    return _tokenizer_render(messages, tokenizer, label_from)


def render_prompt(messages: Sequence[dict[str, Any]], template: str, tokenizer: Any = None) -> str:
    """The prompt text for sampling the next assistant turn, rendered as in training.

    For `vicuna` it ends with "ASSISTANT:"; tokenize it with the tokenizer's usual special
    tokens (BOS added). For `tokenizer` the template writes its own special tokens; tokenize
    it with add_special_tokens=False. `encode_prompt` does exactly that.
    """
    _check_template(template)
    _check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise ChatFormatError("a prompt must not end with an assistant message")
    if template == "vicuna":
        return _vicuna_render(messages, _eos_text(tokenizer), 0, generation_prompt=True)[0]
    return _apply(tokenizer, messages, generation_prompt=True)


def adds_special_tokens(template: str) -> bool:
    """Whether rendered text is tokenized with the tokenizer's own BOS/EOS handling."""
    return template == "vicuna"


def encode_prompt(messages: Sequence[dict[str, Any]], template: str, tokenizer: Any) -> list[int]:
    text = render_prompt(messages, template, tokenizer)
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(template))["input_ids"])


def labels_from_offsets(input_ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                        spans: Sequence[tuple[int, int]]) -> list[int]:
    """Label a token with its id iff its character range overlaps an assistant span."""
    labels = []
    for tok, (s, e) in zip(input_ids, offsets):
        inside = e > s and any(s < span_end and e > span_start for span_start, span_end in spans)
        labels.append(int(tok) if inside else IGNORE_INDEX)
    return labels


def encode_conversation(messages: Sequence[dict[str, Any]], template: str, tokenizer: Any,
                        max_length: int | None = None, label_from: int = 0) -> Encoded:
    """Token ids and labels (-100 outside assistant turns at index >= label_from).

    Truncation keeps the first max_length tokens of both, so they stay aligned.
    Needs a fast tokenizer (character offsets).
    """
    text, spans = render_with_spans(messages, template, tokenizer, label_from)
    if not getattr(tokenizer, "is_fast", False):
        raise ChatFormatError("training needs a fast tokenizer (tokenizer.json) for offsets")
    enc = tokenizer(text, add_special_tokens=adds_special_tokens(template),
                    return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = labels_from_offsets(ids, enc["offset_mapping"], spans)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated)


def assistant_separator(messages: Sequence[dict], template: str, tokenizer: Any) -> str:
    """The text the chat template puts between the sampling prompt and the content of the
    assistant message that follows it (" " for vicuna's "ASSISTANT: <content>"). A model
    trained on that template generates it as part of its first token."""
    marker = "\x00xwin-content\x00"
    prompt = render_prompt(messages, template, tokenizer)
    full, _ = render_with_spans([*messages, {"role": "assistant", "content": marker}], template,
                                tokenizer)
    at = full.find(marker)
    if at < 0 or not full.startswith(prompt) or at < len(prompt):
        return ""
    return full[len(prompt):at]


def chat_format(template: str, tokenizer: Any) -> tuple[Callable, Callable]:
    """(encode, to_content) for `sample_responses`: prompt token ids exactly as in training
    (`chat.encode_prompt`), and a completion turned back into message content (the
    template's separator removed), so a sampled answer renders in training as it was
    generated."""
    def encode(messages: Sequence[dict]) -> list[int]:
        return encode_prompt(messages, template, tokenizer)

    last: list = [None, ""]  # the n completions of a prompt come one after another

    def to_content(messages: Sequence[dict], text: str) -> str:
        if last[0] is not messages:
            last[:] = [messages, assistant_separator(messages, template, tokenizer)]
        sep = last[1]
        return text[len(sep):] if sep and text.startswith(sep) else text

    return encode, to_content
