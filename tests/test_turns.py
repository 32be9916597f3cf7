"""Where a reply ends: SFT labels, DPO's given replies and sampling stop at the same token.

A ChatML template writes `<|im_end|>\\n` after a reply; sampling stops at `<|im_end|>`, so the `\\n`
(and an EOS after it) must never be trained on or scored. Byte-level BPE, as real chat models use:
a word-level tokenizer would hide the `\\n`.
"""
from __future__ import annotations

import copy

import pytest
from conftest import bot, user, write_jsonl

from p3o.data.prompts import load_preference_pairs, load_prompts
from p3o.data.turns import ReplyEnds, end_of_turn_id, stop_token_ids
from p3o.errors import UsageError
from p3o.sft.train import IGNORE, tokenize_example

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml():
    """A byte-level BPE tokenizer with ChatML's special tokens; EOS `<|endoftext|>` as in base models,
    so the end of turn must be read off the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["the cat sat on the mat.\n", "hello there, how are you?\n"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def trained_tokens(tokenizer, example):
    return tokenizer.convert_ids_to_tokens([label for label in example["labels"] if label != IGNORE])


def test_the_end_of_turn_is_read_off_the_template_and_stops_sampling(chatml):
    im_end, eos = chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert end_of_turn_id(chatml) == im_end
    assert stop_token_ids(chatml) == sorted([eos, im_end])


def test_sft_labels_end_at_the_first_end_of_turn(chatml):
    example = tokenize_example(chatml, [user("hello")], [bot("the cat sat")], 64, "row 1")
    assert trained_tokens(chatml, example) == ["the", "Ġcat", "Ġsat", "<|im_end|>"]  # not "Ċ", not EOS
    assert chatml.decode(example["input_ids"]).endswith("<|im_start|>assistant\nthe cat sat<|im_end|>")


def test_plain_text_ends_with_eos(chatml):
    example = tokenize_example(chatml, "hello", " the cat sat", 64, "row 1")
    assert trained_tokens(chatml, example) == ["Ġthe", "Ġcat", "Ġsat", "<|endoftext|>"]


def test_a_completion_that_writes_its_stop_token_is_cut_there(chatml):
    ends = ReplyEnds.of(chatml)
    example = tokenize_example(chatml, "hello", " the cat<|endoftext|> sat", 64, "row 1", ends)
    assert trained_tokens(chatml, example) == ["Ġthe", "Ġcat", "<|endoftext|>"]


def test_dpo_replies_end_at_the_first_end_of_turn(chatml, tmp_path):
    rows = [{"prompt": [user("hello")], "chosen": [bot("the cat sat")], "rejected": [bot("how are you?")]}]
    pairs = load_preference_pairs(str(write_jsonl(tmp_path / "prefs.jsonl", rows)), chatml)
    chosen, rejected = (chatml.convert_ids_to_tokens(ids) for ids in pairs.responses[0])
    assert chosen == ["the", "Ġcat", "Ġsat", "<|im_end|>"]
    assert rejected[-1] == "<|im_end|>" and "Ċ" not in rejected and "<|endoftext|>" not in rejected


def test_a_tokenizer_whose_replies_could_never_end_is_refused(chatml):
    endless = copy.deepcopy(chatml)
    endless.chat_template = CHATML.replace("<|im_end|>", "")
    endless.eos_token = None
    with pytest.raises(UsageError, match="has no EOS token and no chat template that ends a turn"):
        tokenize_example(endless, [user("hello")], [bot("the cat sat")], 64, "row 1")


def test_a_chat_template_without_a_generation_prompt_is_refused(chatml, tmp_path):
    mute = copy.deepcopy(chatml)
    mute.chat_template = CHATML.split("{% if add_generation_prompt %}")[0]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [user("hello")]}])
    with pytest.raises(UsageError, match="row 1: the tokenizer's chat template writes no generation prompt"):
        load_prompts(str(data), mute)


def test_a_template_whose_user_turn_opens_the_reply_needs_no_generation_prompt(chatml, tmp_path):
    """Mistral's `[INST] ... [/INST]` ignores add_generation_prompt and needs none: nothing stands
    between the prompt and the reply."""
    inst = copy.deepcopy(chatml)
    inst.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                          "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [user("hello")]}])
    assert load_prompts(str(data), inst).texts == ["[INST] hello [/INST]"]
