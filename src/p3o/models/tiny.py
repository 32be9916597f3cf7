"""Tiny models built locally from a config, with a word-level tokenizer: for tests, the demo and
anyone without hub access. Nothing here downloads anything."""
from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_word_tokenizer(words: Iterable[str]):
    """A word-level `PreTrainedTokenizerFast`: special tokens first, then the words, split on
    whitespace and punctuation; decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS.values(), *words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def words_of(texts: Iterable[str]) -> list[str]:
    """Distinct words of `texts` in first-seen order, split as the word tokenizer splits them."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    seen: dict[str, None] = {}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text):
            seen.setdefault(word)
    return list(seen)


def build_tiny_model(tokenizer, arch: str = "llama", num_layers: int = 2, hidden_size: int = 64,
                     num_heads: int = 4, max_positions: int = 256, seed: int = 0):
    """A randomly initialised GPT-2 or Llama causal LM sized for the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=num_layers, n_embd=hidden_size, n_head=num_heads,
                            n_positions=max_positions, **ids)
    elif arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=num_layers, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, num_attention_heads=num_heads,
                             num_key_value_heads=num_heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=True, **ids)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use gpt2 or llama")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
