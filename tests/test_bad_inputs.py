"""Bad-input audit across the commands: one line on stderr (what is wrong, how to fix it), exit code 2,
no traceback (unless --debug), and the output directory or file left as it was.

Cases already tested elsewhere for the same command (tests/test_cli.py, test_eval.py, test_winrate.py,
test_supervised.py, test_pipeline.py, test_converters.py, test_frontier.py) are not repeated here.
Also: a tokenizer without a pad token works, and a prompt longer than the context is reported.
"""
from __future__ import annotations

import logging
import shutil

import pytest
import yaml
from conftest import NOUNS, VOCAB, prompt_rows, write_jsonl

from p3o.cli import main
from p3o.errors import UsageError

# ~240 tokens of the test vocabulary: longer than the tiny models' 128-position context.
LONG_PROMPT = "story : " + " ".join(["the big cat sees a small dog ."] * 30)


@pytest.fixture(scope="module")
def paths(assets, tmp_path_factory):
    """Inputs, good and bad, named for the `{placeholders}` of the argument templates below."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, ViTConfig

    from p3o.models.tiny import build_word_tokenizer

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "malformed.jsonl").write_text('{"prompt": "cat"}\n{"prompt": "dog"\n')
    (root / "empty.jsonl").write_text("")
    (root / "bad.yaml").write_text("a: [1, 2\n")
    rows = [{"prompt": f"story : the {n} sees", "completion": " the cat .", "chosen": " the apple .",
             "rejected": " the dog ."} for n in NOUNS]
    write_jsonl(root / "sft.jsonl", [{k: r[k] for k in ("prompt", "completion")} for r in rows])
    write_jsonl(root / "prefs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    short = [r["prompt"] for r in prompt_rows(7)]
    write_jsonl(root / "long_prompts.jsonl", [{"prompt": p} for p in [LONG_PROMPT, *short]])
    write_jsonl(root / "long_sft.jsonl", [{"prompt": p, "completion": " the cat ."} for p in [LONG_PROMPT, *short]])
    write_jsonl(root / "long_prefs.jsonl", [{"prompt": p, "chosen": " the apple .", "rejected": " a dog ."}
                                            for p in [LONG_PROMPT, *short]])

    tokenizer = build_word_tokenizer(VOCAB)
    vit = root / "vit"  # a model directory, with a tokenizer, that is no language model at all
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    tokenizer.save_pretrained(vit)
    rm = root / "rm"  # a reward model (sequence classifier): not a causal LM either
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               num_labels=1, pad_token_id=tokenizer.pad_token_id)).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    nopad = shutil.copytree(assets["llama"], root / "nopad")
    no_pad_tokenizer = build_word_tokenizer(VOCAB)
    no_pad_tokenizer.pad_token = None
    no_pad_tokenizer.save_pretrained(nopad)

    truncated = shutil.copytree(assets["llama"], root / "truncated")  # a download or copy cut short
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    no_weights = shutil.copytree(assets["llama"], root / "no_weights")
    next(no_weights.glob("*.safetensors")).unlink()
    (root / "fake.gguf").write_text("not a gguf file")
    write_jsonl(root / "usr.jsonl", [{"prompt": [{"role": "usr", "content": "story : the cat"}]}])  # near "user"
    write_jsonl(root / "no_content.jsonl", [{"prompt": [{"role": "user"}]}])

    sft_section = {"model_name_or_path": str(assets["llama"]), "dataset": str(root / "sft.jsonl"), "max_length": 32,
                   "learning_rate": 1e-3, "eval_fraction": 0.2, "disable_progress_bar": True}
    train_section = {"dataset": str(assets["prompts"]), "reward_fn": f"{assets['rewards']}:fruit", "max_steps": 1,
                     "pairs_per_step": 2, "max_new_tokens": 2, "disable_progress_bar": True}
    recipes = {"ok": {}, "algo": {"algo": "ppo-ish"}, "train_data": {"dataset": str(root / "missing.jsonl")},
               "sizes": {"pairs_per_step": 6, "minibatch_pairs": 4}, "reward_fn": {"reward_fn": f"{assets['rewards']}:nope"}}
    for name, change in recipes.items():
        (root / f"recipe_{name}.yaml").write_text(yaml.safe_dump({"sft": sft_section, "train": {**train_section, **change}}))
    return {"F": str(root), "llama": str(assets["llama"]), "gpt2": str(assets["gpt2"]), "prompts": str(assets["prompts"]),
            "rewards": str(assets["rewards"])}


# --- argument templates: `{name}` is filled from `paths`, `{out}` is the output directory ------------------------

def train(*extra):
    return ["train", "--model_name_or_path", "{llama}", "--dataset", "{prompts}", "--reward_fn", "{rewards}:fruit",
            "--output_dir", "{out}", "--overwrite", "--max_steps", "1", "--pairs_per_step", "2", "--max_new_tokens", "2",
            "--disable_progress_bar", *extra]


def sft(*extra):
    return ["sft", "--model_name_or_path", "{llama}", "--dataset", "{F}/sft.jsonl", "--output_dir", "{out}", "--overwrite",
            "--max_length", "32", "--disable_progress_bar", *extra]


def rm(*extra):
    return ["rm", "--model_name_or_path", "{llama}", "--dataset", "{F}/prefs.jsonl", "--output_dir", "{out}", "--overwrite",
            "--max_length", "32", "--disable_progress_bar", *extra]


def evaluate(*extra):
    return ["eval", "--model_name_or_path", "{llama}", "--ref_model", "{llama}", "--dataset", "{prompts}",
            "--reward_fn", "{rewards}:fruit", "--max_new_tokens", "2", "--max_prompts", "4",
            "--output_file", "{out}/results.json", "--disable_progress_bar", *extra]


def winrate(*extra):
    return ["winrate", "--model_a", "{llama}", "--model_b", "{gpt2}", "--dataset", "{prompts}",
            "--judge", "reward_fn:{rewards}:fruit", "--max_new_tokens", "2", "--max_prompts", "4",
            "--output_file", "{out}/winrate.json", "--disable_progress_bar", *extra]


def frontier(*extra):
    return ["frontier", "--task", "", "--model_name_or_path", "{llama}", "--dataset", "{prompts}",
            "--eval_dataset", "{prompts}", "--reward_fn", "{rewards}:fruit", "--algos", "p3o-v2", "--betas", "0.05",
            "--seeds", "0", "--max_steps", "1", "--eval_steps", "1", "--pairs_per_step", "2", "--max_new_tokens", "2",
            "--eval_max_prompts", "2", "--num_workers", "1", "--output_dir", "{out}", "--disable_progress_bar", *extra]


def pipeline(recipe):
    return ["pipeline", "--config", f"{{F}}/recipe_{recipe}.yaml", "--output_dir", "{out}"]


def convert(*extra):
    return ["convert", "--format", "hh", "--input", "{F}/prefs.jsonl", "--output", "{out}/converted.jsonl", *extra]


def with_(args, flag, value):
    """`args` with `flag` set to `value` (replacing it where present); value None drops the flag."""
    args = list(args)
    if flag in args:
        i = args.index(flag)
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        del args[i:i + 1 + takes_value]
        if value is not None:
            args[i:i] = [flag, value]
    elif value is not None:
        args += [flag, value]
    return args



CASES = [
    pytest.param(with_(train(), "--model_name_or_path", "{F}/truncated"), ["could not read the weights", "truncated"],
                 id="train-truncated-weights"),
    pytest.param(with_(sft(), "--model_name_or_path", "{F}/no_weights"), ["could not read the weights", "no_weights"],
                 id="sft-no-weights"),
    pytest.param(with_(evaluate(), "--model_name_or_path", "{F}/truncated"), ["could not read the weights"],
                 id="eval-truncated-weights"),
    pytest.param(["fetch-model", "{F}/fake.gguf", "--output_dir", "{out}/m"], ["fake.gguf", "not a GGUF file"],
                 id="fetch-model-not-gguf"),
    pytest.param(with_(train(), "--reward_fn", "{rewards}"), ["name the function too"], id="train-reward-fn-no-function"),
    pytest.param(with_(winrate("--overwrite"), "--output_file", "{prompts}"), ["would overwrite --dataset"],
                 id="winrate-output-is-the-dataset"),
    pytest.param(with_(winrate(), "--judge", "reward_model:{llama}"), ["was saved as LlamaForCausalLM"],
                 id="winrate-reward-model-judge-is-a-causal-lm"),
    pytest.param(with_(winrate(), "--output_file", "{F}/sft.jsonl/winrate.json"), ["sft.jsonl is a file, not a folder"],
                 id="winrate-output-under-a-file"),
    pytest.param(with_(with_(winrate(), "--judge", "llm:x"), "--judge_cache", "{F}/sft.jsonl/cache.jsonl"),
                 ["--judge_cache", "sft.jsonl is a file, not a folder"], id="winrate-judge-cache-under-a-file"),
    pytest.param(with_(evaluate(), "--output_file", "{F}/sft.jsonl/results.json"), ["sft.jsonl is a file, not a folder"],
                 id="eval-output-under-a-file"),
    pytest.param(with_(train(), "--dataset", "{F}/usr.jsonl"), ["row 1", "role 'usr'", "did you mean 'user'"],
                 id="train-chat-role-typo"),
    pytest.param(with_(train(), "--dataset", "{F}/no_content.jsonl"), ["row 1", "message 0 has no content"],
                 id="train-chat-message-without-content"),
    pytest.param(train("--adam_beta1", "1.5"), ["--adam_beta1 and --adam_beta2 must be in [0, 1)"], id="train-adam-beta"),
    pytest.param(train("--adam_epsilon", "-1"), ["--adam_epsilon must be > 0"], id="train-adam-epsilon"),
    pytest.param(train("--weight_decay", "-0.1"), ["--weight_decay must be >= 0"], id="train-weight-decay"),
    pytest.param(train("--warmup_steps", "-1"), ["--warmup_steps must be >= 0"], id="train-warmup-steps"),
    pytest.param(sft("--weight_decay", "-0.1"), ["--weight_decay must be >= 0"], id="sft-weight-decay"),
    # p3o train (its missing files, malformed/missing-column/empty data, unknown --algo, pairs/minibatch, NaN and
    # raising rewards, a non-empty --output_dir are in test_cli.py)
    pytest.param(with_(train(), "--reward_fn", "p3o.no_such_module:fn"), ["cannot import module 'p3o.no_such_module'"],
                 id="train-reward-module-missing"),
    pytest.param(train("--use_peft", "--lora_target_modules", "no_such_proj"), ["--lora_target_modules", "no_such_proj"],
                 id="train-lora-target-missing"),
    pytest.param(train("--use_peft", "--lora_r", "0"), ["--lora_r must be at least 1"], id="train-lora-rank-zero"),
    pytest.param(with_(train(), "--reward_fn", "{rewards}:no_such_fn"), ["has no attribute 'no_such_fn'"],
                 id="train-reward-name-missing"),
    pytest.param(with_(train(), "--reward_fn", "{rewards}:wrong_length"),
                 ["wrong_length", "returned 3 values for 4 completions", "one float per completion"],
                 id="train-reward-wrong-length"),
    pytest.param(with_(train(), "--monitor_reward_fn", "{F}/missing.py:fn"), ["file", "missing.py does not exist"],
                 id="train-monitor-reward-missing"),
    pytest.param(with_(with_(train(), "--reward_fn", None), "--reward_model", "./no/such/rm"),
                 ["reward model ./no/such/rm does not exist"], id="train-reward-model-missing"),
    pytest.param(with_(train(), "--model_name_or_path", "{F}/vit"), ["not a causal language model"], id="train-model-not-lm"),
    pytest.param(with_(train(), "--model_name_or_path", "{F}/rm"), ["causal"], id="train-model-is-a-reward-model"),
    pytest.param(with_(train(), "--ref_model_name_or_path", "./no/such/ref"), ["reference model ./no/such/ref does not exist"],
                 id="train-ref-model-missing"),
    pytest.param(with_(train(), "--tokenizer_name_or_path", "./no/such/tok"), ["tokenizer ./no/such/tok does not exist"],
                 id="train-tokenizer-missing"),
    pytest.param(with_(train(), "--eval_dataset", "{F}/missing.jsonl"), ["dataset file", "missing.jsonl does not exist"],
                 id="train-eval-dataset-missing"),
    pytest.param(with_(train("--algo", "dpo"), "--reward_fn", None), ["no column 'chosen'", "columns found: prompt, topic"],
                 id="train-dpo-missing-column"),
    pytest.param(train("--pairs_per_step", "4", "--minibatch_pairs", "4", "--gradient_accumulation_steps", "3"),
                 ["--minibatch_pairs 4 must be a multiple of --gradient_accumulation_steps 3"], id="train-accumulation-not-dividing"),
    pytest.param(train("--config", "{F}/missing.yaml"), ["config file", "missing.yaml does not exist"], id="train-config-missing"),
    pytest.param(train("--config", "{F}/bad.yaml"), ["bad.yaml is not valid YAML"], id="train-config-malformed"),
    # p3o sft
    pytest.param(with_(sft(), "--dataset", "{F}/missing.jsonl"), ["dataset file", "missing.jsonl does not exist"],
                 id="sft-dataset-missing"),
    pytest.param(with_(sft(), "--dataset", "{F}/malformed.jsonl"), ["malformed.jsonl:2: malformed JSON"], id="sft-malformed-json"),
    pytest.param(sft("--completion_column", "answer"), ["no column 'answer'", "columns found: prompt, completion"],
                 id="sft-missing-column"),
    pytest.param(with_(sft(), "--dataset", "{F}/empty.jsonl"), ["empty.jsonl has no rows"], id="sft-empty-dataset"),
    pytest.param(sft("--eval_dataset", "{F}/missing.jsonl"), ["dataset file", "missing.jsonl does not exist"],
                 id="sft-eval-dataset-missing"),
    pytest.param(with_(sft(), "--model_name_or_path", "./no/such/dir"), ["model ./no/such/dir does not exist"],
                 id="sft-model-missing"),
    pytest.param(with_(sft(), "--model_name_or_path", "{F}/vit"), ["not a causal language model"], id="sft-model-not-lm"),
    pytest.param(with_(sft(), "--model_name_or_path", "{F}/rm"), ["causal"], id="sft-model-is-a-reward-model"),
    # p3o rm
    pytest.param(with_(rm(), "--dataset", "{F}/missing.jsonl"), ["dataset file", "missing.jsonl does not exist"],
                 id="rm-dataset-missing"),
    pytest.param(with_(rm(), "--dataset", "{F}/malformed.jsonl"), ["malformed.jsonl:2: malformed JSON"], id="rm-malformed-json"),
    pytest.param(with_(rm(), "--dataset", "{F}/empty.jsonl"), ["empty.jsonl has no rows"], id="rm-empty-dataset"),
    pytest.param(with_(rm(), "--model_name_or_path", "./no/such/dir"), ["model ./no/such/dir does not exist"],
                 id="rm-model-missing"),
    pytest.param(with_(rm(), "--model_name_or_path", "{F}/vit"), ["could not load", "as a sequence classifier"],
                 id="rm-model-not-a-classifier-trunk"),
    # p3o eval (missing model/dataset, no reward, NaN reward, existing output are in test_eval.py)
    pytest.param(with_(evaluate(), "--dataset", "{F}/malformed.jsonl"), ["malformed.jsonl:2: malformed JSON"],
                 id="eval-malformed-json"),
    pytest.param(evaluate("--prompt_column", "question"), ["no column 'question'", "columns found: prompt, topic"],
                 id="eval-missing-column"),
    pytest.param(with_(evaluate(), "--dataset", "{F}/empty.jsonl"), ["empty.jsonl has no rows"], id="eval-empty-dataset"),
    pytest.param(with_(evaluate(), "--reward_fn", "{rewards}:no_such_fn"), ["has no attribute 'no_such_fn'"],
                 id="eval-reward-name-missing"),
    pytest.param(with_(evaluate(), "--reward_fn", "{rewards}:raises"), ["raises raised RuntimeError: reward server is down"],
                 id="eval-reward-raises"),
    pytest.param(with_(evaluate(), "--reward_fn", "{rewards}:wrong_length"), ["returned 3 values for 4 completions"],
                 id="eval-reward-wrong-length"),
    pytest.param(evaluate("--gold_reward_fn", "{F}/missing.py:fn"), ["missing.py does not exist"], id="eval-gold-reward-missing"),
    pytest.param(with_(evaluate(), "--ref_model", "./no/such/ref"), ["./no/such/ref does not exist"], id="eval-ref-missing"),
    pytest.param(with_(evaluate(), "--model_name_or_path", "{F}/vit"), ["not a causal language model"], id="eval-model-not-lm"),
    # p3o winrate (unknown judge, missing model_a, missing reward file, existing output are in test_winrate.py)
    pytest.param(with_(winrate(), "--dataset", "{F}/missing.jsonl"), ["dataset file", "missing.jsonl does not exist"],
                 id="winrate-dataset-missing"),
    pytest.param(with_(winrate(), "--dataset", "{F}/malformed.jsonl"), ["malformed.jsonl:2: malformed JSON"],
                 id="winrate-malformed-json"),
    pytest.param(winrate("--prompt_column", "question"), ["no column 'question'", "columns found: prompt, topic"],
                 id="winrate-missing-column"),
    pytest.param(with_(winrate(), "--dataset", "{F}/empty.jsonl"), ["empty.jsonl has no rows"], id="winrate-empty-dataset"),
    pytest.param(with_(winrate(), "--judge", "reward_fn:{rewards}:no_such_fn"), ["has no attribute 'no_such_fn'"],
                 id="winrate-reward-name-missing"),
    pytest.param(with_(winrate(), "--judge", "reward_fn:{rewards}:raises"), ["raised RuntimeError: reward server is down"],
                 id="winrate-reward-raises"),
    pytest.param(with_(winrate(), "--judge", "reward_fn:{rewards}:wrong_length"), ["returned 3 values for 4 completions"],
                 id="winrate-reward-wrong-length"),
    pytest.param(with_(winrate(), "--judge", "reward_fn:{rewards}:nan_reward"), ["nan_reward", "non-finite"],
                 id="winrate-reward-nan"),
    pytest.param(with_(winrate(), "--model_b", "./no/such/b"), ["--model_b ./no/such/b does not exist"], id="winrate-model-b-missing"),
    pytest.param(with_(winrate(), "--model_b", "{F}/vit"), ["--model_b", "not a causal language model"], id="winrate-model-not-lm"),
    # p3o frontier (a failing run and a missing --model_name_or_path without --task are in test_frontier.py)
    pytest.param(with_(frontier(), "--algos", "p3o-v2,ppo-ish"), ["unknown --algos entry 'ppo-ish'; known: p3o-v1"],
                 id="frontier-unknown-algo"),
    pytest.param(with_(frontier(), "--betas", "0.05,x"), ["--betas must be", "separated by commas, got '0.05,x'"], id="frontier-betas-not-numbers"),
    pytest.param(with_(frontier(), "--dataset", "{F}/missing.jsonl"), ["missing.jsonl does not exist"],
                 id="frontier-dataset-missing"),
    pytest.param(with_(frontier(), "--reward_fn", "{F}/missing.py:fn"), ["missing.py does not exist"],
                 id="frontier-reward-missing"),
    pytest.param(frontier("--train_config", "{F}/missing.yaml"), ["config file", "missing.yaml does not exist"],
                 id="frontier-train-config-missing"),
    # p3o pipeline (unknown option and unknown section are in test_pipeline.py)
    pytest.param(with_(pipeline("ok"), "--config", "{F}/missing.yaml"), ["config file", "missing.yaml does not exist"],
                 id="pipeline-recipe-missing"),
    pytest.param(with_(pipeline("ok"), "--config", "{F}/bad.yaml"), ["bad.yaml is not valid YAML"], id="pipeline-recipe-malformed"),
    pytest.param(pipeline("algo"), ["unknown --algo 'ppo-ish'; known algorithms: p3o-v1"], id="pipeline-unknown-algo"),
    pytest.param(pipeline("train_data"), ["missing.jsonl does not exist"], id="pipeline-train-dataset-missing"),
    pytest.param(pipeline("sizes"), ["--pairs_per_step 6 must be a multiple of --minibatch_pairs 4"],
                 id="pipeline-sizes-not-dividing"),
    pytest.param(pipeline("reward_fn"), ["has no attribute 'nope'"], id="pipeline-reward-name-missing"),
    # p3o convert (output exists, input is output, nothing convertible, missing field are in test_converters.py)
    pytest.param(with_(convert(), "--input", "{F}/missing.jsonl"), ["dataset file", "missing.jsonl does not exist"],
                 id="convert-input-missing"),
    pytest.param(with_(convert(), "--input", "{F}/malformed.jsonl"), ["malformed.jsonl:2: malformed JSON"],
                 id="convert-malformed-json"),
    pytest.param(with_(convert(), "--input", "{F}/empty.jsonl"), ["empty.jsonl has no rows"], id="convert-empty-input"),
    pytest.param(with_(convert(), "--format", "shp"), ["--format", "shp", "hh", "tldr"], id="convert-unknown-format"),
]

# A non-empty output directory without --overwrite/--resume: refused, nothing touched (train's is in test_cli.py).
NON_EMPTY = [
    pytest.param(with_(sft(), "--overwrite", None), "keep.txt", id="sft"),
    pytest.param(with_(rm(), "--overwrite", None), "keep.txt", id="rm"),
    pytest.param(pipeline("ok"), "train/keep.txt", id="pipeline-stage-dir"),
]


def fill(template, paths, out):
    return [arg.format(**paths, out=out) for arg in template]


def run_cli(argv, capsys):
    """(exit code, stderr lines) of `p3o ARGV` run in-process; argparse exits through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_one_line_and_untouched(argv, capsys, tmp_path, marker, expected_words=()):
    """Exit 2, one stderr line `p3o CMD: error: ...` holding the expected words, and tmp_path holding only
    the output directory with its marker file, unchanged."""
    marker_file = tmp_path / "out" / marker
    marker_file.parent.mkdir(parents=True)
    marker_file.write_text("keep me")
    before = files_under(tmp_path)
    code, err = run_cli(argv, capsys)
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert err[0].startswith(f"p3o {argv[0]}: error: ") and "Traceback" not in err[0], err
    for words in expected_words:
        assert words in err[0], (words, err[0])
    assert files_under(tmp_path) == before and marker_file.read_text() == "keep me"


@pytest.mark.parametrize("template, expected", CASES)
def test_bad_input_is_one_clear_line_exit_2_and_nothing_written(paths, tmp_path, capsys, template, expected):
    assert_one_line_and_untouched(fill(template, paths, tmp_path / "out"), capsys, tmp_path, "keep.txt", expected)


@pytest.mark.parametrize("template, marker", NON_EMPTY)
def test_a_non_empty_output_dir_is_refused_and_left_untouched(paths, tmp_path, capsys, template, marker):
    assert_one_line_and_untouched(fill(template, paths, tmp_path / "out"), capsys, tmp_path, marker,
                                  ["not empty", "--overwrite"])


def test_debug_shows_the_traceback_for_other_commands_too(paths, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="missing.jsonl does not exist"):
        main(fill(with_(sft("--debug"), "--dataset", "{F}/missing.jsonl"), paths, out))
    assert not out.exists()


@pytest.mark.parametrize("template, produced", [
    pytest.param(train(), "model.safetensors", id="train"),
    pytest.param(sft(), "model.safetensors", id="sft"),
    pytest.param(rm(), "model.safetensors", id="rm"),
    pytest.param(evaluate(), "results.json", id="eval"),
])
def test_a_tokenizer_without_a_pad_token_is_handled(paths, tmp_path, caplog, template, produced):
    args = template
    for flag in ("--model_name_or_path", "--ref_model"):
        if flag in args:
            args = with_(args, flag, "{F}/nopad")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(fill(args, paths, out)) == 0
    assert (out / produced).is_file()
    assert "has no pad token; padding with '</s>'" in caplog.text




@pytest.mark.parametrize("template", [
    pytest.param(with_(train(), "--dataset", "{F}/long_prompts.jsonl"), id="train-default-context"),
    pytest.param(with_(train("--eval_dataset", "{F}/long_prompts.jsonl"), "--model_name_or_path", "{gpt2}"),
                 id="train-held-out-prompts"),
    pytest.param(with_(evaluate("--model_name_or_path", "{gpt2}", "--ref_model", "{gpt2}"), "--dataset",
                       "{F}/long_prompts.jsonl"), id="eval"),
    pytest.param(with_(winrate(), "--dataset", "{F}/long_prompts.jsonl"), id="winrate"),
    pytest.param(with_(sft(), "--dataset", "{F}/long_sft.jsonl"), id="sft-max-length"),
    pytest.param(with_(rm(), "--dataset", "{F}/long_prefs.jsonl"), id="rm-max-length"),
    pytest.param(with_(with_(with_(sft(), "--dataset", "{F}/long_sft.jsonl"), "--max_length", None),
                       "--model_name_or_path", "{gpt2}"), id="sft-context"),
    pytest.param(with_(with_(with_(rm(), "--dataset", "{F}/long_prefs.jsonl"), "--max_length", None),
                       "--model_name_or_path", "{gpt2}"), id="rm-context"),
])
def test_a_prompt_longer_than_the_context_is_reported(paths, tmp_path, capsys, caplog, template):
    """Either the run goes on and a warning says how many prompts were cut and how, or it stops with one line."""
    with caplog.at_level(logging.INFO):
        code, err = run_cli(fill(template, paths, tmp_path / "out"), capsys)
    if code == 0:
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("longer than" in w and ("keep their last tokens" in w or "lose" in w or "cut" in w)
                   for w in warnings), warnings
    else:
        assert code == 2 and len(err) == 1 and "context" in err[0], (code, err)


@pytest.mark.parametrize("template", [train(), sft(), winrate()], ids=["train", "sft", "winrate"])
def test_an_output_place_this_user_cannot_write_is_refused_before_the_work(paths, tmp_path, capsys, monkeypatch, template):
    """(The tests run as root, who may write anywhere: the check answers as for another user.)"""
    import p3o.utils.io

    monkeypatch.setattr(p3o.utils.io, "_writable", lambda folder: False)
    assert_one_line_and_untouched(fill(template, paths, tmp_path / "out"), capsys, tmp_path, "keep.txt",
                                  ["is not writable by this user"])


def test_an_output_dir_under_a_file_is_refused_before_the_work(paths, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run_cli(fill(with_(train(), "--output_dir", str(tmp_path / "notes.txt" / "run")), paths, tmp_path), capsys)
    assert code == 2 and len(err) == 1 and "notes.txt is a file, not a folder" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_permission_error_the_checks_did_not_foresee_is_one_line(monkeypatch, capsys):
    import p3o.cli

    def refused(args):
        raise PermissionError(13, "Permission denied", "/runs/x/metrics.jsonl")

    monkeypatch.setattr(p3o.cli, "run_command", refused)
    code, err = run_cli(["tiny-model", "--output_dir", "/runs/x"], capsys)
    assert code == 2 and err == ["p3o tiny-model: error: Permission denied: /runs/x/metrics.jsonl; check that "
                                 "path's permissions (--debug shows where)"]
