"""A tiny tokenizer + Llama-style model, built offline, saved as a Hugging Face folder.

Nothing can be downloaded from a model hub here, so the demo and the tests build their base
model themselves:

- a byte-level BPE tokenizer trained with `tokenizers` on the given corpus (special tokens
  <s>, </s>, <unk>, <pad>; BOS added like Llama's; a chat_template so `chatTemplate:
  tokenizer` works too), wrapped as PreTrainedTokenizerFast;
- a randomly initialised LlamaForCausalLM (hidden 128, 2 layers, 4 heads of 32, intermediate
  256, 512 positions), saved with safetensors: a standard architecture vLLM can serve.

    python examples/tiny_model.py OUT_DIR [CORPUS.txt]   # one text a line
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]

# Same shape as the vicuna format, through the tokenizer's own template machinery.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE PreTrainedTokenizerFast trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                      special_tokens=[("<s>", bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=512, padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, corpus: list[str], seed: int = 0,
                     vocab_size: int = 512) -> Path:
    """Train the tokenizer on `corpus`, initialise the model with `seed`, save both to out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from xwin_jobs.modeling import make_tokenizer_portable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_tokenizer_portable(out)  # loadable by the older transformers of a vLLM image too
    return out


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    if len(argv) == 2:
        corpus = [line for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    else:
        corpus = ["USER: hello ASSISTANT: hello there</s>", "A chat between a user and an assistant."]
    print(build_tiny_model(argv[0], corpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
