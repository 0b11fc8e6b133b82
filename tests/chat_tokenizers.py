"""Tokenizers with chat templates, built in-process (no hub): the shapes of the templates users bring.

- llama3: a BOS the tokenizer adds itself and the template writes, header tokens, `<|eot_id|>`.
- chatml: Qwen2.5's layout (`<|im_start|>role ... <|im_end|>`, a default system prompt), no BOS.
- markers: Llama 3's template with `{% generation %}` markers (as TRL's llama3_training.jinja), so
  `return_assistant_tokens_mask` gives transformers' own assistant mask to compare with.
- reasoning: Qwen3's habit: only the last assistant turn carries its (empty) `<think>` block, so a
  conversation rendered up to an earlier turn is not the start of the whole one; reasoning_markers:
  the same with `{% generation %}` markers.
- header: a generation prompt (`<|assistant|>\n`) that differs from how an assistant turn is written.
"""

from __future__ import annotations

from typing import Any

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_MARKERS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
REASONING = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- if loop.last %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# The same with each assistant turn in a `{% generation %}` block (as TRL's qwen3_training.jinja).
REASONING_MARKERS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{%- generation %}"
    "{%- if loop.last %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\n' }}{%- endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
HEADER = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|assistant|> ' + message.content + '<|end|>\n' }}"
    "{%- else %}{{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)

CORPUS = [
    "What is the zorble of 12? The zorble of 12 is 38. Hello there, how are you today?",
    "You are a helpful assistant. The quick brown fox jumps over the lazy dog. 0123456789",
    "system user assistant think answer question",
]


def build(specials: list[str], bos: str | None, eos: str, template: str, adds_bos: bool = False) -> Any:
    """A byte-level BPE trained on a few lines, with `specials` as special tokens and `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=eos,
                                   chat_template=template)


def llama3(template: str = LLAMA3) -> Any:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return build(specials, "<|begin_of_text|>", "<|eot_id|>", template, adds_bos=True)


def chatml(template: str = CHATML) -> Any:
    return build(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", template)


def phi(template: str = HEADER) -> Any:
    return build(["<|endoftext|>", "<|assistant|>", "<|user|>", "<|system|>", "<|end|>"], None, "<|end|>", template)


TOKENIZERS = {
    "llama3": llama3,
    "chatml": chatml,
    "markers": lambda: llama3(LLAMA3_MARKERS),
    "reasoning": lambda: chatml(REASONING),
    "reasoning_markers": lambda: chatml(REASONING_MARKERS),
    "header": phi,
}
