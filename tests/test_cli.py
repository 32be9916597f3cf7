"""`p3o train` end to end through the command line: run directory, config files, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import prompt_rows, write_jsonl

from p3o.cli import COMMANDS, main

REQUIRED_METRICS = {"step", "reward", "kl", "loss", "clipfrac", "pairs_per_s"}


def train_args(assets, out, *extra):
    return ["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out), "--max_steps", "2",
            "--pairs_per_step", "4", "--max_new_tokens", "4", "--epochs", "1", "--learning_rate", "1e-3",
            "--disable_progress_bar", *extra]


@pytest.mark.parametrize("arch, algo", [("llama", "p3o-v2"), ("gpt2", "p3o-v1")])
def test_train_writes_a_run_directory_that_transformers_loads(assets, tmp_path, arch, algo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    args = train_args(assets, out, "--algo", algo)
    args[args.index("--model_name_or_path") + 1] = str(assets[arch])
    assert main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and REQUIRED_METRICS <= lines[0].keys()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["algo"] == algo and config["max_steps"] == 2 and config["learning_rate"] == 1e-3
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(assets[arch])
    changed = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values())]
    assert any(changed)
    assert not list(out.glob(".saving-*"))  # no temporary directory left behind


def test_yaml_config_sets_options_and_flags_override_it(assets, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"algo": "p3o-v1", "max_steps": 1, "beta": 0.2, "learning_rate": "2e-3",
                                      "clip_eps": 0.1}))
    out = tmp_path / "run"
    assert main(train_args(assets, out, "--config", str(config), "--beta", "0.3")[:] ) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    # flags given on the command line beat the file; the file beats the defaults
    assert resolved["beta"] == 0.3 and resolved["max_steps"] == 2 and resolved["clip_eps"] == 0.1
    assert resolved["algo"] == "p3o-v1" and resolved["learning_rate"] == 1e-3


def test_chat_prompts_are_rendered_and_columns_reach_the_reward(assets, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "topic": r["topic"]} for r in prompt_rows(8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    args = train_args(assets, out, "--dataset", str(data))
    args[args.index("--reward_fn") + 1] = f"{assets['rewards']}:echo_columns"  # a second --reward_fn would add one
    assert main(args) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reward"] == 1.0  # the reward saw chat messages, not text


def test_reward_model_directory(assets, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rm = tmp_path / "rm"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               num_labels=1)).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    args = train_args(assets, tmp_path / "run")
    i = args.index("--reward_fn")
    args[i:i + 2] = ["--reward_model", str(rm)]
    assert main(args) == 0


def error_of(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_non_empty_output_dir_is_refused_and_left_untouched(assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    message = error_of(capsys, train_args(assets, out))
    assert "--overwrite" in message and "not empty" in message
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("change, message", [
    (["--dataset", "nope/missing.jsonl"], "dataset file nope/missing.jsonl does not exist"),
    (["--reward_fn", "nope.py:fn"], "file nope.py does not exist"),
    (["--model_name_or_path", "./no/such/model"], "does not exist"),
    (["--pairs_per_step", "6", "--minibatch_pairs", "4"], "must be a multiple of --minibatch_pairs 4"),
    (["--learning_rate", "fast"], "learning_rate must be float"),
    (["--reward_weights", "1", "2"], "--reward_weights has 2 weights for 1 rewards"),
    (["--max_new_tokens", "500"], "leaves no room for a prompt"),
])
def test_bad_input_gives_one_clear_line(assets, tmp_path, capsys, change, message):
    assert message in error_of(capsys, train_args(assets, tmp_path / "run", *change))


def test_malformed_and_incomplete_datasets(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "cat"}\n{"prompt": "dog"\n')
    assert f"{bad}:2: malformed JSON" in error_of(capsys, train_args(assets, tmp_path / "a", "--dataset", str(bad)))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "cat", "id": 1}])
    message = error_of(capsys, train_args(assets, tmp_path / "b", "--dataset", str(wrong)))
    assert "no column 'prompt'; columns found: question, id" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "has no rows" in error_of(capsys, train_args(assets, tmp_path / "c", "--dataset", str(empty)))


def test_a_misbehaving_reward_function_stops_the_run(assets, tmp_path, capsys):
    message = error_of(capsys, train_args(assets, tmp_path / "run", "--reward_fn", f"{assets['rewards']}:nan_reward"))
    assert "nan_reward" in message and "non-finite" in message


def test_other_data_formats(assets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = prompt_rows(8)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("prompt,topic\n" + "".join(f"\"{r['prompt']}\",{r['topic']}\n" for r in rows))
    for name in ("p.parquet", "p.csv"):
        assert main(train_args(assets, tmp_path / f"run-{name}", "--dataset", str(tmp_path / name), "--max_steps", "1")) == 0


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "p3o", "train", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--algo", "--pairs_per_step", "--minibatch_pairs", "--clip_eps", "--beta", "--reward_model",
                 "--warmup_steps", "--max_grad_norm", "--overwrite", "--config"):
        assert flag in out.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_p3o_and_of_every_command(command, capsys):
    """`p3o --help` is the first command a newcomer types, and every error line points to it."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: p3o") and ("95%" in out if command in (None, "winrate") else True)
    assert "%%" not in out  # argparse's escape never shows


def test_p3o_help_lists_the_commands_without_importing_torch():
    """`p3o --help`, `--version` and a mistyped command read no command's options, so they import
    neither torch nor transformers (about 2 s on 2 cores); `p3o train --help` reads train's alone (torch, not sft)."""
    probe = ("import sys\nfrom p3o.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'p3o.rl.config', 'p3o.sft.train') if m in sys.modules))")
    for argv, imported in ((["--help"], "[]"), (["--version"], "[]"), (["tran"], "[]"),
                           (["train", "--help"], "['p3o.rl.config', 'torch']")):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert done.stdout.strip().splitlines()[-1] == imported, (argv, done.stdout, done.stderr)


def test_a_mistyped_command_is_named_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tran", "--max_steps", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "p3o: error: unknown command 'tran' (did you mean 'train'?) (see p3o --help)\n"


def test_an_unknown_flag_is_reported_by_the_command_it_was_given_to(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --model x (see p3o train --help)")


def test_tiny_model_command(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat .")
    assert main(["tiny-model", "--corpus", str(corpus), "--arch", "gpt2", "--output_dir", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.decode(tok("the cat sat").input_ids) == "the cat sat"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "gpt2"


def test_datasets_directories_offline(assets, tmp_path):
    """A `save_to_disk` directory and a directory of data files both go through `datasets`."""
    import datasets

    rows = prompt_rows(8)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "saved")
    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", rows)
    for name in ("saved", "files"):
        assert main(train_args(assets, tmp_path / f"run-{name}", "--dataset", str(tmp_path / name), "--max_steps", "1")) == 0


def test_completions_log_and_vocabulary_check(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(assets, out, "--log_completions", "1")) == 0
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert len(records[0]["completions"]) == 2 and len(records[0]["rewards"]) == 2
    from p3o.models.tiny import build_word_tokenizer

    big = tmp_path / "big-tokenizer"
    build_word_tokenizer([f"w{i}" for i in range(500)]).save_pretrained(big)
    message = error_of(capsys, train_args(assets, tmp_path / "b", "--tokenizer_name_or_path", str(big)))
    assert "embedding table" in message


def test_two_cli_runs_with_one_seed_write_identical_weight_files(assets, tmp_path):
    for name in ("a", "b"):
        assert main(train_args(assets, tmp_path / name, "--seed", "7")) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert main(train_args(assets, tmp_path / "c", "--seed", "8")) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_report_to_tensorboard_and_clear_errors_for_other_trackers(assets, tmp_path, capsys):
    import importlib.util

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(train_args(assets, out, "--report_to", "tensorboard")) == 0
    events = EventAccumulator(str(next(out.glob("p3o/events.out.tfevents.*"))), size_guidance={"tensors": 0})
    events.Reload()
    assert "reward" in events.Tags()["scalars"] and "completions/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("completions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | reward |") and "story :" in text  # the sampled completions
    assert "not a tracker" in error_of(capsys, train_args(assets, tmp_path / "x", "--report_to", "carrier-pigeon"))
    if importlib.util.find_spec("wandb") is None:  # installed on a user's machine, the run would just log to it
        assert "wandb package is not installed" in error_of(capsys, train_args(assets, tmp_path / "y", "--report_to", "wandb"))


def test_a_run_that_fails_before_its_first_step_leaves_no_debris(assets, tmp_path, capsys):
    out = tmp_path / "run"
    error_of(capsys, train_args(assets, out, "--reward_fn", f"{assets['rewards']}:raises"))
    assert not out.exists()  # the rerun is not blocked by our own half-made directory
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    error_of(capsys, train_args(assets, out, "--overwrite", "--reward_fn", f"{assets['rewards']}:raises"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # The held-out evaluation at step 0 wrote eval.jsonl before the first rollout failed: it goes too.
    second = tmp_path / "second_call_raises.py"
    second.write_text("calls = []\n"
                      "def f(prompts, completions, **kwargs):\n"
                      "    calls.append(1)\n"
                      "    if len(calls) > 1:\n"
                      "        raise ValueError('broken')\n"
                      "    return [0.0] * len(completions)\n")
    error_of(capsys, train_args(assets, out, "--overwrite", "--reward_fn", f"{second}:f", "--eval_dataset",
                                str(assets["prompts"]), "--eval_max_prompts", "2"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_output_dir_may_not_be_an_input(assets, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets["llama"], model)
    before = (model / "model.safetensors").read_bytes()
    args = train_args(assets, model, "--overwrite")
    args[args.index("--model_name_or_path") + 1] = str(model)
    assert "same directory as --model_name_or_path" in error_of(capsys, args)
    assert (model / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("name", ["as_text", "as_dict"])
def test_rewards_that_are_not_a_list_of_numbers(assets, tmp_path, capsys, name):
    message = error_of(capsys, train_args(assets, tmp_path / "run", "--reward_fn", f"{assets['rewards']}:{name}"))
    assert "must return a list of numbers" in message and name in message


def test_encodings_and_empty_prompts(assets, tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    assert "not UTF-8" in error_of(capsys, train_args(assets, tmp_path / "a", "--dataset", str(latin)))
    bom = tmp_path / "bom.csv"
    bom.write_text("prompt\nstory : the cat\nstory : a dog\n", encoding="utf-8-sig")
    assert main(train_args(assets, tmp_path / "b", "--dataset", str(bom), "--max_steps", "1")) == 0
    empty = write_jsonl(tmp_path / "empty-prompt.jsonl", [{"prompt": "cat"}, {"prompt": "  "}])
    assert "row 2: the prompt is empty" in error_of(capsys, train_args(assets, tmp_path / "c", "--dataset", str(empty)))


@pytest.mark.parametrize("extra, message", [
    (["--words", "a b", "--num_heads", "3"], "multiple of --num_heads 3"),
    (["--words", "a b", "--num_layers", "0"], "--num_layers must be at least 1, got 0"),
    (["--corpus", "{empty}"], "no vocabulary"), ([], "no vocabulary")])
def test_tiny_model_refuses_shapes_and_corpora_it_cannot_build(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("")
    extra = [a.format(empty=tmp_path / "empty.txt") for a in extra]
    assert main(["tiny-model", *extra, "--output_dir", str(tmp_path / "m")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_progress_bar_shows_step_reward_and_kl(assets, tmp_path, capsys):
    args = [a for a in train_args(assets, tmp_path / "run") if a != "--disable_progress_bar"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "reward=" in err and "kl=" in err and "pairs_s=" in err


def test_debug_shows_the_traceback(assets, tmp_path):
    with pytest.raises(Exception, match="learning_rate must be float"):
        main(train_args(assets, tmp_path / "run", "--learning_rate", "fast", "--debug"))


def test_a_choice_outside_the_list_is_one_line_that_lists_the_choices(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(train_args(assets, tmp_path / "run", "--algo", "ppo-ish"))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "argument --algo: invalid choice: 'ppo-ish' (choose from 'p3o-v2', 'p3o-v1', 'ppo'" in err[0]
    assert not (tmp_path / "run").exists()


def test_chat_template_errors_and_mixed_formats(assets, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets["llama"], model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    rows = [{"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "cat"}]}]
    data = write_jsonl(tmp_path / "sys.jsonl", rows)
    args = train_args(assets, tmp_path / "a", "--dataset", str(data))
    args[args.index("--model_name_or_path") + 1] = str(model)
    message = error_of(capsys, args)
    assert "row 1: the tokenizer's chat template refused" in message and "System role not supported" in message
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "cat"}, {"prompt": [{"role": "user", "content": "dog"}]}])
    assert "row 2: mixes plain-text and chat-message prompts" in error_of(
        capsys, train_args(assets, tmp_path / "b", "--dataset", str(mixed)))


def test_saved_model_stops_where_training_stopped_and_long_prompts_are_reported(assets, tmp_path, caplog):
    import logging

    from transformers import GenerationConfig

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="p3o"):
        assert main(train_args(assets, out, "--max_prompt_length", "4")) == 0
    saved = GenerationConfig.from_pretrained(out)
    assert saved.eos_token_id == 2 and saved.pad_token_id == 0  # </s> and <pad> of the test tokenizer
    assert "responses end at '</s>' (2)" in caplog.text
    assert "48 of 48 prompts are longer than 4 tokens" in caplog.text


def test_an_empty_optional_flag_means_unset(assets, tmp_path):
    assert main(train_args(assets, tmp_path / "run", "--reward_model", "")) == 0


@pytest.mark.parametrize("command", ["train", "eval", "winrate"])
def test_held_out_prompts_are_cut_as_training_cuts_them(assets, tmp_path, monkeypatch, command):
    """--max_prompt_length reaches every evaluation: before, held-out prompts kept context - max_new_tokens
    tokens while training kept --max_prompt_length, so the evaluated prompts were not the trained ones."""
    import p3o.rl.rollout

    budgets = []
    real = p3o.rl.rollout.pad_prompts

    def recording(tokenizer, token_ids, max_length):
        budgets.append(max_length)
        return real(tokenizer, token_ids, max_length)

    monkeypatch.setattr("p3o.eval.policy.pad_prompts", recording)
    monkeypatch.setattr("p3o.eval.winrate.pad_prompts", recording)
    common = ["--max_prompt_length", "3", "--max_new_tokens", "4", "--disable_progress_bar"]
    if command == "train":
        args = [*train_args(assets, tmp_path / "run", "--eval_dataset", str(assets["prompts"]),
                            "--eval_max_prompts", "4", "--max_steps", "1"), *common]
    elif command == "eval":
        args = ["eval", "--model_name_or_path", str(assets["llama"]), "--ref_model", str(assets["llama"]),
                "--dataset", str(assets["prompts"]), "--max_prompts", "4", "--reward_fn",
                f"{assets['rewards']}:fruit", "--output_file", str(tmp_path / "eval.json"), *common]
    else:
        args = ["winrate", "--model_a", str(assets["llama"]), "--model_b", str(assets["llama"]), "--dataset",
                str(assets["prompts"]), "--max_prompts", "4", "--judge", f"reward_fn:{assets['rewards']}:fruit",
                "--output_file", str(tmp_path / "winrate.json"), *common]
    assert main(args) == 0
    assert budgets and set(budgets) == {3}


def test_trls_names_get_p3os_name_not_a_near_spelling(assets, tmp_path, capsys):
    """TRL's epsilon is the clipping range: difflib's nearest, adam_epsilon, would have changed the
    optimiser instead. The same hint on the command line, in a YAML file and in Python."""
    from p3o import P3OConfig
    from p3o.sft.train import SFTConfig

    for flag, hint in [("--epsilon", "(TRL's epsilon is 'clip_eps' here: the clipping range)"),
                       ("--learnin_rate=1", "(did you mean 'learning_rate'?)")]:
        with pytest.raises(SystemExit) as exit_info:
            main(train_args(assets, tmp_path / "a", flag))
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().endswith(f"{hint} (see p3o train --help)")
    config = tmp_path / "trl.yaml"
    config.write_text("loss_type: dapo\n")
    message = error_of(capsys, [*train_args(assets, tmp_path / "c"), "--config", str(config)])
    assert "unknown option 'loss_type'" in message and "'loss_aggregation'" in message and "token-mean" in message
    with pytest.raises(TypeError, match="P3OConfig has no option 'num_iterations' .*'epochs'"):
        P3OConfig(output_dir="x", num_iterations=1)
    with pytest.raises(TypeError, match="SFTConfig has no option 'bf16' .*'mixed_precision' here: set it to bf16"):
        SFTConfig(output_dir="x", bf16=True)
    with pytest.raises(TypeError, match=r"has no option 'epsilon'$"):  # no clip_eps in SFT: no hint
        SFTConfig(output_dir="x", epsilon=0.2)
    # TRL's options with no counterpart say what to do; a far spelling is not offered as a near one
    # (use_cpu was "did you mean 'use_peft'?", rpo_alpha "'lora_alpha'", bf16=False "set it to bf16")
    for option, hint in [("use_cpu", "(TRL's use_cpu: p3o trains where accelerate finds a device"),
                         ("rpo_alpha", "(TRL's rpo_alpha: p3o's dpo is the sigmoid DPO loss alone)"),
                         ("bf16", "(TRL's bf16=False is p3o's default, mixed_precision 'no': leave it out)"),
                         ("num_completions_to_print", "'log_completions' here")]:
        with pytest.raises(TypeError) as info:
            P3OConfig(output_dir="x", **{option: False})
        assert hint in str(info.value)
    with pytest.raises(TypeError) as info:
        P3OConfig(output_dir="x", shuffle_dataset=True)
    assert str(info.value) == "P3OConfig has no option 'shuffle_dataset'"


def test_a_python_config_reads_values_as_a_flag_would_and_names_a_wrong_one(tmp_path):
    """A config built in Python checks each value's type as a flag or YAML value is checked: TRL's
    list of LoRA target modules (an AttributeError before), report_to=None, log_completions=True, a
    string learning rate are read as meant; a list beta (OnlineDPOConfig's), a boolean learning rate
    and transformers' fractions of the run for step counts are one line each (a TypeError deep in
    the run, or a fraction read as a count, before)."""
    from p3o import P3OConfig
    from p3o.errors import UsageError
    from p3o.sft.train import SFTConfig

    cfg = P3OConfig(output_dir="x", use_peft=True, lora_target_modules=["q_proj", "v_proj"], report_to=None,
                    log_completions=True, learning_rate="1e-5")
    assert (cfg.lora_target_modules, cfg.report_to, cfg.log_completions, cfg.learning_rate) == (
        "q_proj,v_proj", "none", 2, 1e-5)
    assert P3OConfig(output_dir="x", log_completions=False).log_completions == 0
    import numpy as np
    from transformers import SchedulerType

    assert SFTConfig(output_dir="x", lr_scheduler_type=SchedulerType.COSINE).lr_scheduler_type == "cosine"
    assert P3OConfig(output_dir="x", reward_fn=["a.py:f", "b.py:g"],
                     reward_weights=np.array([1.0, 0.5])).reward_weights == [1.0, 0.5]
    assert SFTConfig(output_dir="x", use_peft=True, lora_target_modules=("q_proj",)).lora_target_modules == "q_proj"
    for values, message in [({"beta": [0.1]}, "P3OConfig: beta must be float, got [0.1]"),
                            ({"learning_rate": True}, "P3OConfig: learning_rate must be float, got True"),
                            ({"max_new_tokens": None}, "P3OConfig: max_new_tokens cannot be None"),
                            ({"warmup_steps": 0.1}, "warmup_steps must be int, got 0.1 (transformers reads a "
                                                    "fraction below 1 as a share of the run; p3o counts steps: "
                                                    "give warmup_ratio"),
                            ({"save_steps": 0.3}, "save_steps must be int, got 0.3 (transformers reads"),
                            ({"model_name_or_path": print}, "model_name_or_path must be str, got a builtin")]:
        with pytest.raises(UsageError) as info:
            P3OConfig(output_dir="x", **values)
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError, match="SFTConfig: eval_steps must be int, got 0.5 \\(transformers"):
        SFTConfig(output_dir="x", eval_steps=0.5)
    recipe = tmp_path / "r.yaml"  # a YAML list of target modules: one comma list, as on the command line
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "train": {
        "model_name_or_path": "m", "dataset": "p.jsonl", "reward_fn": "r.py:f", "use_peft": True,
        "lora_target_modules": ["q_proj", "v_proj"]}}))
    from p3o.pipeline.recipe import load_recipe

    assert load_recipe(str(recipe))["train"][0].lora_target_modules == "q_proj,v_proj"


def test_trls_report_to_list_and_max_steps_minus_one_are_read_as_trl_means_them(assets, tmp_path):
    from p3o import P3OConfig
    from p3o.sft.train import SFTConfig

    assert P3OConfig(output_dir="x", report_to=["tensorboard", "none"]).report_to == "tensorboard,none"
    assert SFTConfig(output_dir="x", report_to=("none",)).report_to == "none"
    trl_dump = P3OConfig(output_dir="x", max_steps=-1, num_train_epochs=2)  # transformers' "unset"
    assert trl_dump.max_steps is None and trl_dump.num_train_epochs == 2
    assert SFTConfig(output_dir="x", max_steps=-1).num_train_epochs == 1
    config = tmp_path / "trl.yaml"
    config.write_text("report_to: [tensorboard]\nmax_steps: -1\nnum_train_epochs: 1\n")
    out = tmp_path / "run"
    args = train_args(assets, out, "--config", str(config))
    del args[args.index("--max_steps"):args.index("--max_steps") + 2]  # the file's -1 and epochs decide
    assert main(args) == 0
    assert next(out.glob("p3o/events.out.tfevents.*")).is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["report_to"] == "tensorboard"
