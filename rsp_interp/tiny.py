"""Tiny randomly initialised models and an offline byte-level tokenizer, for fast tests.

Nothing here downloads: the tokenizer is built in memory from the 256 byte values plus a few
special tokens, and the models come from small configs with a fixed seed.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# The same shape of template as SmolLM2-Instruct, so chat formatting and injection positions are
# exercised on tiny models exactly as on the real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIGS = {
    "tiny-llama": "rotary positions (Llama): 2 layers, d_model 64, 4 heads, 2 KV heads",
    "tiny-gpt2": "learned absolute positions (GPT-2): 2 layers, d_model 64, 4 heads",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizers emit)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte, ids 0..255, then the special tokens."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>" if not chat else "<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(name: str, vocab_size: int, seed: int = 0, n_ctx: int = 512) -> PreTrainedModel:
    """Build one of ``TINY_CONFIGS`` with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    if name == "tiny-llama":
        cfg = LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=64,
            intermediate_size=128,
            vocab_size=vocab_size,
            max_position_embeddings=n_ctx,
            tie_word_embeddings=True,
        )
        cls = LlamaForCausalLM
    elif name == "tiny-gpt2":
        cfg = GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=64,
            vocab_size=vocab_size,
            n_positions=n_ctx,
            bos_token_id=256,  # GPT-2's default 50256 is outside our vocabulary (and warns)
            eos_token_id=256,
        )
        cls = GPT2LMHeadModel
    else:
        raise KeyError(name)
    cfg.architectures = [cls.__name__]
    # ids of <|endoftext|> and <|pad|> in byte_tokenizer(): 256 + index in SPECIAL_TOKENS
    cfg.bos_token_id = cfg.eos_token_id = 256
    cfg.pad_token_id = 256 + SPECIAL_TOKENS.index("<|pad|>")
    model = cls(cfg)
    # Random init leaves the embedding table with a tiny scale; give it a realistic spread so
    # RSP statistics are non-degenerate.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.1)
    return model.eval()
