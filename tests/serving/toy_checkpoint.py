"""The small local checkpoint the serving and evaluation tests run: a random tiny model whose greedy tokens are
printable ASCII (so text names its tokens one to one), saved with the byte tokenizer and, optionally, a chat
template."""

from pathlib import Path

import torch
from conftest import make_model

from openmythos import MythosTokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_toy_checkpoint(folder: Path, attn_type: str, chat_template: str | None = None):
    model = make_model(attn_type, vocab_size=260, eos_token_id=2, pad_token_id=0)
    printable = range(MythosTokenizer.byte_offset + 0x20, MythosTokenizer.byte_offset + 0x7F)
    with torch.no_grad():
        # A zero row scores 0, below the best of ~95 random printable scores, so no special, control or non-ASCII token
        # is ever the greedy choice. The rows of printable bytes keep their random values.
        for token in range(model.config.vocab_size):
            if token not in printable:
                model.model.embed_tokens.weight[token] = 0
                model.lm_head.weight[token] = 0
    model.save_pretrained(folder)
    tokenizer = MythosTokenizer()
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder
