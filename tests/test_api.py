"""The Python API: `P3OTrainer` takes objects (models, `datasets.Dataset`, reward callables, a
`peft.LoraConfig`, callbacks) and runs the same code path as `p3o train`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import pytest
import torch
import yaml
from conftest import REWARD_FILE, prompt_rows, write_jsonl

from p3o import P3OConfig, P3OTrainer
from p3o.cli import main
from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.errors import UsageError

REWARDS = {}
exec(REWARD_FILE, REWARDS)  # the same functions the CLI tests import from a file
fruit, shifted_fruit = REWARDS["fruit"], REWARDS["shifted_fruit"]


def length(prompts, completions, **kwargs):
    return [-len(c.split()) / 8 for c in completions]


def shifted_length(prompts, completions, **kwargs):  # a per-prompt shift, exact in float64
    return [r + 4096.0 * (len(p) % 5) for r, p in zip(length(prompts, completions), prompts)]


def args(tmp_path, name="run", **overrides):
    base = dict(output_dir=str(tmp_path / name), max_steps=3, pairs_per_step=8, minibatch_pairs=4, epochs=2,
                max_new_tokens=6, learning_rate=1e-3, seed=0, disable_progress_bar=True)
    return P3OConfig(**{**base, **overrides})


def weights(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_the_cli_and_the_api_give_bit_identical_weights(assets, tmp_path):
    """One code path: `p3o train` with paths, and P3OTrainer with a model object, a datasets.Dataset
    and a reward callable, end on the same weights."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
                 "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(tmp_path / "cli"), "--max_steps",
                 "3", "--pairs_per_step", "8", "--minibatch_pairs", "4", "--epochs", "2", "--max_new_tokens", "6",
                 "--learning_rate", "1e-3", "--seed", "0", "--disable_progress_bar"]) == 0
    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    dataset = datasets.Dataset.from_list(prompt_rows())
    metrics = P3OTrainer(model, fruit, args=args(tmp_path, "api"), train_dataset=dataset,
                         processing_class=tokenizer).train()
    cli, api = weights(tmp_path / "cli"), weights(tmp_path / "api")
    assert cli.keys() == api.keys() and all(torch.equal(cli[n], api[n]) for n in cli)
    assert metrics["step"] == 3
    cli_lines = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    api_lines = (tmp_path / "api" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["reward"] for line in cli_lines] == [json.loads(line)["reward"] for line in api_lines]


def test_weighted_rewards_are_summed_logged_by_part_and_a_callback_stops_the_run(assets, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class StopAtTwo(TrainerCallback):  # an ordinary transformers callback, unchanged
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(("begin", state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(("log", state.global_step, logs["reward"]))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(("evaluate", state.global_step, metrics["eval_n"]))  # named as transformers names them

        def on_save(self, args, state, control, checkpoint=None, **kwargs):
            seen.append(("save", checkpoint.name))

        def on_train_end(self, args, state, control, **kwargs):
            seen.append(("end", state.global_step))

    class Meddler(TrainerCallback):  # given as a class, as transformers.Trainer allows; empties what it is handed
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs.clear()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics.clear()

    trainer = P3OTrainer(str(assets["llama"]), [fruit, length], train_dataset=prompt_rows(),
                         eval_dataset=prompt_rows(6, seed=9), callbacks=[StopAtTwo(), Meddler],
                         args=args(tmp_path, max_steps=10, reward_weights=[1.0, 0.5], save_steps=1))
    metrics = trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and metrics["step"] == 2
    for m in lines:
        assert m["reward"] == pytest.approx(m["reward/fruit"] + 0.5 * m["reward/length"], abs=1e-12)
    assert seen[0] == ("begin", 0) and seen[-1] == ("end", 2)
    assert [s[1:] for s in seen if s[0] == "log"] == [(m["step"], m["reward"]) for m in lines]
    assert [s for s in seen if s[0] in ("evaluate", "save")] == [  # the stop's step is evaluated and checkpointed
        ("evaluate", 0, 6), ("save", "checkpoint-1"), ("evaluate", 2, 6), ("save", "checkpoint-2")]
    assert metrics["eval_n"] == 6 and "eval_reward" in metrics
    held_out = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in held_out] == [0, 2] and all("reward" in e for e in held_out)  # the Meddler changed no file
    assert (tmp_path / "run" / "model.safetensors").is_file()  # stopped cleanly, outputs written
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_a_per_prompt_shift_of_any_reward_part_changes_nothing(assets, tmp_path):
    """P3O takes differences first: shifting one part of a weighted sum per prompt changes no weight."""
    plain = P3OTrainer(str(assets["llama"]), [fruit, length], train_dataset=str(assets["prompts"]),
                       args=args(tmp_path, "plain", reward_weights=[1.0, 0.25]))
    plain.train()
    shifted = P3OTrainer(str(assets["llama"]), [fruit, shifted_length], train_dataset=str(assets["prompts"]),
                         args=args(tmp_path, "shifted", reward_weights=[1.0, 0.25]))
    shifted.train()
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "shifted")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_several_rewards_from_the_command_line(assets, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
                 "--reward_fn", f"{assets['rewards']}:fruit", "--reward_fn", f"{assets['rewards']}:shifted_fruit",
                 "--reward_weights", "2", "0.5", "--output_dir", str(out), "--max_steps", "1", "--pairs_per_step",
                 "4", "--max_new_tokens", "4", "--disable_progress_bar"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/fruit", "reward/shifted_fruit"} <= m.keys()
    assert m["reward"] == pytest.approx(2 * m["reward/fruit"] + 0.5 * m["reward/shifted_fruit"], rel=1e-12)


def test_lora_from_a_peft_config_and_save_model(assets, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    trainer = P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(), args=args(tmp_path, max_steps=2),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    saved = trainer.save_model(tmp_path / "again")
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if "lora_" not in n)  # not merged in place
    first, again = weights(tmp_path / "run"), weights(saved)
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    merged = AutoModelForCausalLM.from_pretrained(saved)  # a plain causal LM: adapters merged
    original = AutoModelForCausalLM.from_pretrained(assets["llama"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], original.state_dict()[q])
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("case, message", [
    ("signature", "reward_funcs[0] bad(x) must accept (prompts, completions, **kwargs)"),
    ("weights", "--reward_weights has 3 weights for 1 rewards"),
    ("column", "train_dataset has no column 'prompt'; columns found: text"),
    ("meta", "model has weights on the meta device"),
    ("no-reward", "give a reward"),
    ("no-args", "P3OTrainer needs args=P3OConfig(output_dir=...)"),
    ("early-stopping", "EarlyStoppingCallback needs transformers' load_best_model_at_end"),
])
def test_bad_arguments_are_one_clear_line_and_nothing_is_written(assets, tmp_path, case, message):
    def bad(x):
        return x

    kw = dict(model=str(assets["llama"]), reward_funcs=fruit, train_dataset=prompt_rows(), args=args(tmp_path))
    if case == "signature":
        kw["reward_funcs"] = bad
    elif case == "weights":
        kw["args"] = args(tmp_path, reward_weights=[1.0, 2.0, 3.0])
    elif case == "column":
        kw["train_dataset"] = [{"text": "story : the cat ."}]
    elif case == "meta":
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            kw["model"] = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["llama"]))
    elif case == "no-reward":
        kw["reward_funcs"] = None
    elif case == "early-stopping":
        from transformers import EarlyStoppingCallback

        kw["callbacks"] = [EarlyStoppingCallback]
    else:
        kw["args"] = None
    with pytest.raises(UsageError) as info:
        P3OTrainer(**kw).train()
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_abbreviated_flags_are_refused_and_max_steps_wins_over_epochs(assets, tmp_path, capsys, caplog):
    with pytest.raises(SystemExit):
        main(["train", "--model", str(assets["llama"]), "--dataset", str(assets["prompts"])])
    assert "unrecognized arguments: --model" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="p3o"):
        cfg = P3OConfig(output_dir=str(tmp_path), max_steps=7, num_train_epochs=2, reward_fn="x.py:f")
    assert cfg.max_steps == 7 and cfg.num_train_epochs is None and "max_steps wins" in caplog.text
    assert P3OConfig(output_dir=str(tmp_path), max_completion_length=12).max_new_tokens == 12  # TRL's name


def test_the_python_api_example_runs_and_its_callback_stops_it_early(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "python_api.py"
    spec = importlib.util.spec_from_file_location("python_api_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "40"])
    assert metrics["step"] < 40 and metrics["reward/mentions_the_wanted_fruit"] >= 0.5  # learned, then stopped
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_run_directory_has_a_model_card(assets, tmp_path):
    import yaml

    from p3o.utils.model_card import hub_name

    assert [hub_name(n) for n in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", str(tmp_path), "./x", None)] == [
        "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", None, None, None]

    trainer = P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(), eval_dataset=prompt_rows(8, seed=3),
                         args=args(tmp_path, max_steps=2, eval_max_prompts=4))
    metrics = trainer.train()
    card = (tmp_path / "run" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"library_name": "transformers", "tags": ["p3o", "rlhf", "p3o-v2"]}  # a path is no Hub id
    assert f"`{assets['llama']}` fine-tuned with **p3o-v2**" in card
    assert "| `algo` | p3o-v2 |" in card and "arXiv:2310.00212" in card and "from_pretrained" in card
    assert "| `lora_r` |" not in card and "| `importance_clamp` |" in card  # what this run used, not LoRA's rank
    assert f"| kl | {metrics['kl']:.4f} | {metrics['eval_kl']:.4f} ± {metrics['eval_kl_stderr']:.4f} |" in card


def test_every_flag_is_a_config_field_in_one_help_section_and_choices_are_shown(capsys):
    import dataclasses

    from p3o.cli import build_parser

    fields = [f.name for f in dataclasses.fields(P3OConfig)]
    sectioned = [name for names in P3OConfig.SECTIONS.values() for name in names]
    assert sorted(sectioned) == sorted(fields)  # each field in exactly one section
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions} - {"help", "debug", "config", "module"}
    assert flags == set(fields) | {"num_processes", "accelerate_config"}  # those two start a launcher (p3o.cli.launch)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.endswith(" options:")]
    assert headings == [f"{section} options:" for section in P3OConfig.SECTIONS]  # one heading a section
    assert "{p3o-v2,p3o-v1,ppo,rloo,grpo,remax,online-dpo,dpo}" in out


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_sft_and_rm_flags_are_grouped_by_section_too(command, capsys):
    import dataclasses

    from p3o import RewardConfig, SFTConfig

    cls = SFTConfig if command == "sft" else RewardConfig
    sectioned = {name for names in cls.SECTIONS.values() for name in names}
    assert {f.name for f in dataclasses.fields(cls)} <= sectioned
    with pytest.raises(SystemExit):
        main([command, "--help"])
    headings = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" options:")]
    assert headings == ["model options:", "data options:", "optimisation options:", "logging options:",
                        "checkpoints options:"]


def sft_rows(n: int = 24) -> list[dict]:
    return [{"prompt": row["prompt"], "completion": " the cat eats a pear ."} for row in prompt_rows(n)]


def pref_rows(n: int = 24) -> list[dict]:
    return [{"prompt": row["prompt"], "chosen": " a pear .", "rejected": " the dog ."} for row in prompt_rows(n)]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_reward_trainers_match_their_commands_bit_for_bit(assets, tmp_path, stage):
    """SFTTrainer and RewardTrainer with objects (a model, a datasets.Dataset) end where `p3o sft` and
    `p3o rm` with paths end."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from p3o import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    rows = sft_rows() if stage == "sft" else pref_rows()
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    common = ["--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
              "--seed", "0", "--disable_progress_bar"]
    assert main([stage, "--model_name_or_path", str(assets["llama"]), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "cli"), *common]) == 0
    config = dict(output_dir=str(tmp_path / "api"), num_train_epochs=1, per_device_train_batch_size=4,
                  learning_rate=1e-3, seed=0, disable_progress_bar=True)
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(assets["llama"])
        trainer = SFTTrainer(model, SFTConfig(**config), datasets.Dataset.from_list(rows), processing_class=tokenizer)
    else:
        torch.manual_seed(0)  # `p3o rm` seeds its new score head with --seed before loading
        model = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1)
        trainer = RewardTrainer(model, RewardConfig(**config), datasets.Dataset.from_list(rows),
                                processing_class=tokenizer)
    evaluations = trainer.train()
    assert evaluations and "eval_loss" in evaluations[-1]
    cli, api = weights(tmp_path / "cli"), weights(tmp_path / "api")
    assert cli.keys() == api.keys() and all(torch.equal(cli[n], api[n]) for n in cli)


def test_stage_trainers_name_their_bad_arguments(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from p3o import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    with pytest.raises(UsageError, match="train_dataset: row 1 has no column 'completion'"):
        SFTTrainer(str(assets["llama"]), SFTConfig(output_dir=str(tmp_path / "a")), [{"prompt": "x"}]).train()
    with pytest.raises(UsageError, match="one-label sequence-classification model or a path, got LlamaForCausalLM$"):
        RewardTrainer(AutoModelForCausalLM.from_pretrained(assets["llama"]), RewardConfig(output_dir=str(tmp_path)),
                      pref_rows())
    with pytest.raises(UsageError, match="needs args=SFTConfig"):
        SFTTrainer(str(assets["llama"]), None, sft_rows())
    assert not (tmp_path / "a").exists()


def test_trl_names_carry_over_on_the_command_line(assets, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(assets["llama"]), "--dataset_name", str(assets["prompts"]),
                 "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out), "--max_steps", "1",
                 "--pairs_per_step", "4", "--max_completion_length", "3", "--disable_progress_bar"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert m["response_length"] <= 3 and m["reward/fruit"] == m["reward"]  # one reward is logged by name too
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_new_tokens"] == 3 and saved["max_completion_length"] is None  # one spelling kept
    assert saved["dataset"] == str(assets["prompts"]) and saved["dataset_name"] is None


def test_a_trl_reward_function_works_unchanged(assets, tmp_path):
    """TRL calls reward functions by keyword, so its `fn(completions, **kwargs)` takes the prompts among
    the keywords; p3o calls a function that names `completions` the same way."""
    seen = {}

    def reward_len(completions, **kwargs):  # TRL's documentation example
        seen.update(kwargs)
        return [-abs(20 - len(completion)) for completion in completions]

    def reversed_names(completions, prompts, **kwargs):  # by name, so the order of the parameters is free
        return [float(len(c) > len(p)) for p, c in zip(prompts, completions)]

    metrics = P3OTrainer(str(assets["llama"]), [reward_len, reversed_names], train_dataset=prompt_rows(),
                         args=args(tmp_path, max_steps=1)).train()
    assert {"prompts", "completion_ids", "topic"} <= seen.keys() and len(seen["prompts"]) == 16  # 8 pairs
    assert metrics["reward/reward_len"] <= 0 and 0 <= metrics["reward/reversed_names"] <= 1


def test_a_flag_overrides_the_config_file_under_either_spelling(assets, tmp_path):
    """A file written with TRL's names (or by an older p3o, which kept both) is overridden by a flag
    under p3o's name, and the other way round."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"max_completion_length": 4, "max_new_tokens": 4, "dataset_name": "a.jsonl",
                                      "output_dir": str(tmp_path / "o"), "reward_fn": "r.py:f",
                                      "model_name_or_path": "m"}))
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_dataclass_arguments(parser, P3OConfig)
    cfg = build_config(P3OConfig, parser.parse_args(["--config", str(config), "--max_new_tokens", "7",
                                                     "--dataset", "b.jsonl"]))
    assert (cfg.max_new_tokens, cfg.dataset) == (7, "b.jsonl")
    cfg = build_config(P3OConfig, parser.parse_args(["--config", str(config), "--max_completion_length", "9"]))
    assert (cfg.max_new_tokens, cfg.dataset) == (9, "a.jsonl")
    assert dataclasses.replace(cfg, max_new_tokens=5).max_new_tokens == 5  # Python's override too


def test_a_peft_model_an_iterable_dataset_and_a_loaded_reward_model_are_taken_as_they_are(assets, tmp_path):
    """Objects a TRL user has in a notebook: a PeftModel, a streaming-style IterableDataset and a
    loaded one-label sequence classifier as the reward (here scored from the policy's own trunk)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["llama"]),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    scorer = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1)
    stream = datasets.IterableDataset.from_generator(lambda: iter(prompt_rows(16)))
    trainer = P3OTrainer(policy, [scorer, fruit], train_dataset=stream, args=args(tmp_path, max_steps=1))
    metrics = trainer.train()
    assert trainer.model is policy and {"reward/llama", "reward/fruit"} <= metrics.keys()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert len(trainer.engine.prompts) == 16  # read whole: p3o draws prompts by index


def test_settings_the_run_does_not_use_are_named_in_a_warning(tmp_path, caplog, monkeypatch):
    import p3o.rl.config

    monkeypatch.setattr(p3o.rl.config, "_WARNED", set())  # each message is given once a process
    with caplog.at_level(logging.WARNING, logger="p3o"):
        P3OConfig(output_dir=str(tmp_path), algo="p3o-v2", vf_coef=0.5, gamma=0.9, lora_r=8, reward_fn="r.py:f")
    assert "--vf_coef, --gamma have no effect without --algo ppo" in caplog.text
    assert "--lora_r has no effect without --use_peft" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p3o"):
        P3OConfig(output_dir=str(tmp_path), algo="ppo", vf_coef=0.5, use_peft=True, lora_r=8, reward_fn="r.py:f")
    assert "no effect" not in caplog.text


def test_evaluation_settings_without_an_eval_dataset_are_named_in_a_warning(tmp_path, caplog, assets):
    with caplog.at_level(logging.WARNING, logger="p3o"):
        P3OTrainer(assets["llama"], fruit, train_dataset=prompt_rows(4), args=args(tmp_path, "a", eval_steps=2))
    assert "--eval_steps has no effect without --eval_dataset" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p3o"):
        P3OTrainer(assets["llama"], fruit, train_dataset=prompt_rows(4), eval_dataset=prompt_rows(2),
                   args=args(tmp_path, "b", eval_steps=2))
    assert "no effect" not in caplog.text


def test_the_trainer_offers_trls_evaluate_state_and_callback_methods(assets, tmp_path):
    """A ported TRL script calls trainer.evaluate(), reads trainer.state.log_history and adds
    callbacks after construction."""
    from transformers import TrainerCallback

    class Counter(TrainerCallback):
        steps = []

        def on_step_begin(self, args, state, control, **kwargs):
            Counter.steps.append(("begin", state.global_step))

        def on_step_end(self, args, state, control, **kwargs):
            Counter.steps.append(("end", state.global_step))

    class Evaluations(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.seen.append((state.global_step, dict(metrics)))

    watcher = Evaluations()
    trainer = P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(), callbacks=[watcher],
                         eval_dataset=prompt_rows(6, seed=9), args=args(tmp_path, max_steps=2))
    before = trainer.evaluate()
    assert before["eval_kl"] == 0.0 and before["eval_n"] == 6  # the initial policy is the reference
    assert watcher.seen == [(0, before)]  # evaluate() calls on_evaluate with its eval_* metrics, as transformers
    assert trainer.evaluate(eval_dataset=prompt_rows(4, seed=3))["eval_n"] == 4
    assert not (tmp_path / "run" / "eval.jsonl").exists()  # evaluate() writes nothing
    trainer.add_callback(Counter)
    counter = trainer.pop_callback(Counter)  # the instance made when the class was added, as in transformers
    assert isinstance(counter, Counter)
    trainer.add_callback(counter)
    trainer.add_callback(StopNever := TrainerCallback())
    assert trainer.pop_callback(StopNever) is StopNever and trainer.pop_callback(StopNever) is None
    trainer.train()
    assert Counter.steps == [("begin", 0), ("end", 1), ("begin", 1), ("end", 2)]
    history = trainer.state.log_history
    assert [h["step"] for h in history if "reward" in h] == [1, 2]
    assert [h["step"] for h in history if "eval_reward" in h] == [0, 2]  # the run's held-out points
    after = trainer.evaluate()
    assert after["eval_kl"] > 0 and trainer.state.log_history[-1] == {**after, "step": 2}
    assert [step for step, _ in watcher.seen] == [0, 0, 0, 2, 2]  # evaluate() twice, the run's two points, then
    assert watcher.seen[-1] == (2, after)
    with pytest.raises(UsageError, match="evaluate\\(\\) needs held-out prompts"):
        P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(),
                   args=args(tmp_path, "none")).evaluate()


def test_a_reference_given_as_a_path_is_the_flags_reference(assets, tmp_path):
    """ref_model= takes a path as model= does (it was refused: "must be a causal language model ... or
    a path, got str"), recorded in config.yaml as --ref_model_name_or_path, to the same weights."""
    P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(), ref_model=str(assets["llama"]),
               args=args(tmp_path, "path", max_steps=1)).train()
    P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(),
               args=args(tmp_path, "flag", max_steps=1, ref_model_name_or_path=str(assets["llama"]))).train()
    saved = yaml.safe_load((tmp_path / "path" / "config.yaml").read_text())
    assert saved["ref_model_name_or_path"] == str(assets["llama"])
    a, b = weights(tmp_path / "path"), weights(tmp_path / "flag")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_trls_trainer_arguments_p3o_does_not_take_are_one_line_saying_what_to_do(assets, tmp_path):
    """A ported script passing TRL's judge=, reward_processing_classes=, or peft_config=/callbacks= to
    the stage trainers got a bare TypeError; TRL scripts call trainer.accelerator.print."""
    from p3o import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    for make, message in [
        (lambda: P3OTrainer(str(assets["llama"]), fruit, args=args(tmp_path), judge=object()),
         "P3OTrainer takes no judge (TRL's): score with reward_funcs"),
        (lambda: P3OTrainer(str(assets["llama"]), fruit, args=args(tmp_path), reward_processing_classes=[None, 1]),
         "P3OTrainer takes no reward_processing_classes (TRL's): p3o reads each reward model with its own"),
        (lambda: SFTTrainer(str(assets["llama"]), SFTConfig(output_dir=str(tmp_path / "s")), peft_config=object()),
         "SFTTrainer takes no peft_config (TRL's): set use_peft=True"),
        (lambda: RewardTrainer(str(assets["llama"]), RewardConfig(output_dir=str(tmp_path / "r")), callbacks=[object()]),
         "RewardTrainer takes no callbacks (TRL's)"),
    ]:
        with pytest.raises(UsageError) as info:
            make()
        assert str(info.value).startswith(message)
    SFTTrainer(str(assets["llama"]), SFTConfig(output_dir=str(tmp_path / "s")), train_dataset=prompt_rows(),
               callbacks=[])  # none asked for: taken
    trainer = P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(), args=args(tmp_path, max_steps=1))
    assert trainer.accelerator is trainer.engine.accelerator


def test_a_callback_stops_the_run_from_on_evaluate_after_that_step(assets, tmp_path):
    """The way EarlyStoppingCallback's refusal points to: a stop set in on_evaluate ends the run after
    the step just evaluated (it ran one more step and evaluated again), its outputs written."""
    from transformers import TrainerCallback

    class StopWhenEvaluated(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step >= 2:
                control.should_training_stop = True

    trainer = P3OTrainer(str(assets["llama"]), fruit, train_dataset=prompt_rows(), eval_dataset=prompt_rows(4, seed=9),
                         callbacks=[StopWhenEvaluated], args=args(tmp_path, max_steps=6, eval_steps=2))
    assert trainer.train()["step"] == 2
    points = [json.loads(line)["step"] for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert points == [0, 2] and (tmp_path / "run" / "model.safetensors").is_file()
