"""`p3o pipeline`: recipes are checked whole before anything runs; the shipped recipes load without
downloading anything; a small recipe runs SFT -> RM -> P3O on local data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from p3o.cli import main
from p3o.pipeline.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load_and_chain_their_stages(path):
    recipe = load_recipe(str(path))
    out = recipe["output_dir"]
    sft, _ = recipe["sft"]
    rm, rm_format = recipe["rm"]
    train, _ = recipe["train"]
    assert sft.model_name_or_path.startswith("EleutherAI/pythia-1b")
    assert rm.model_name_or_path == str(out / "sft") and rm_format in ("tldr", "hh-text")
    assert train.model_name_or_path == str(out / "sft") and train.reward_model == [str(out / "rm")]
    assert train.algo == "p3o-v2" and train.beta == 0.05 and train.clip_eps == 0.2 and train.epochs == 4
    assert train.learning_rate <= 8e-6  # the paper's range for 1B-6B models


def test_recipe_mistakes_are_reported_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "sft": {"model_name_or_path": "m", "dataset": "d",
                                                                              "learnin_rate": 1e-3}}))
    assert main(["pipeline", "--config", str(bad)]) == 2
    assert "unknown option 'learnin_rate' in section sft" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "rl": {}}))
    assert main(["pipeline", "--config", str(bad)]) == 2
    assert "unknown section 'rl'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_local_recipe_runs_every_stage(tmp_path, assets, capsys):
    from conftest import write_jsonl

    rows = [{"prompt": f"story : the {n} is hungry . answer :", "chosen": f" the {n} eats a pear .",
             "rejected": f" the {n} eats a dog ."} for n in ("cat", "dog", "bird", "fish", "cow", "goat") * 4]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "sft": {"model_name_or_path": str(assets["llama"]), "dataset": str(sft), "learning_rate": 1e-3,
                "eval_fraction": 0.2, "disable_progress_bar": True},
        "rm": {"dataset": str(prefs), "learning_rate": 1e-3, "eval_fraction": 0.2, "disable_progress_bar": True},
        "train": {"dataset": str(sft), "max_steps": 2, "pairs_per_step": 4, "max_new_tokens": 4,
                  "learning_rate": 1e-4, "disable_progress_bar": True},
    }))
    assert main(["pipeline", "--config", str(recipe), "--check"]) == 0
    assert "rm: " + str(tmp_path / "run" / "sft") in capsys.readouterr().out
    assert main(["pipeline", "--config", str(recipe)]) == 0
    for stage in ("sft", "rm", "train"):
        assert (tmp_path / "run" / stage / "model.safetensors").is_file(), stage


@pytest.mark.parametrize("section, mistake, message", [
    ("sft", {"dataset": "missing.jsonl"}, "--dataset missing.jsonl does not exist"),
    ("sft", {"model_name_or_path": "/no/such/model"}, "sft: --model_name_or_path /no/such/model does not exist"),
    ("train", {"reward_fn": "nope.py:f"}, "nope.py does not exist"),
    ("train", {"reward_model": "./runs/nope_rm"}, "train: --reward_model ./runs/nope_rm does not exist"),
    ("train", {"ref_model_name_or_path": "./runs/nope"}, "train: --ref_model_name_or_path ./runs/nope does not"),
    ("train", {"prompt_column": "question"}, "has no column 'question'"),  # found before SFT runs
    ("sft", {"completion_column": "answer"}, "no column 'answer'"),
    ("train", {"model_name_or_path": "{run}_missing/sft"}, "_missing/sft does not exist"),  # not an earlier stage's
    ("train", {"mixed_precision": "bf17"}, "section train: --mixed_precision must be"),
    ("train", {"algo": "dpo"}, "row 1 has no column 'chosen'"),  # DPO's data: pairs (its held-out set: prompts)
    ("train", {"pairs_per_step": 5, "minibatch_pairs": 2}, "--pairs_per_step 5 must be a multiple of --minibatch_pairs 2")])
def test_check_finds_what_the_run_would_refuse_before_running_anything(tmp_path, assets, capsys, section, mistake,
                                                                        message):
    """`--check` checks the recipe as a run does first: missing files, models, reward functions, sizes."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    stages = {"sft": {"model_name_or_path": str(assets["llama"]), "dataset": str(data)},
              "train": {"dataset": str(data), "reward_fn": f"{assets['rewards']}:fruit"}}
    stages[section].update({k: v.format(run=tmp_path / "run") if isinstance(v, str) else v for k, v in mistake.items()})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), **stages}))
    assert main(["pipeline", "--config", str(recipe), "--check"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fail_at", [1, 3], ids=["first-step", "after-metrics"])
def test_resume_keeps_finished_stages_after_a_later_one_failed(tmp_path, assets, capsys, fail_at):
    """The train stage fails (its reward raises at step `fail_at`, with no checkpoint yet) after SFT
    finished; the recipe is fixed and run again with --resume: SFT is kept as it was (its max_length
    capped to the tiny model's context, as recorded), train starts again. A finished stage with other
    settings is refused before anything runs, --check included."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"story : the {n} is", "completion": " a cat ."}
                                               for n in ("cat", "dog", "cow", "fish")])
    (tmp_path / "flaky.py").write_text(
        "calls = []\n"
        "def flaky(prompts, completions, **kw):\n"
        f"    calls.append(1)\n    if len(calls) >= {fail_at}:\n        raise ValueError('broken')\n"
        "    return [0.0] * len(prompts)\n")
    sections = {"output_dir": str(tmp_path / "run"),
                "sft": {"model_name_or_path": str(assets["llama"]), "dataset": str(data), "max_length": 512,
                        "eval_fraction": 0.25, "disable_progress_bar": True},
                "train": {"dataset": str(data), "reward_fn": f"{tmp_path / 'flaky.py'}:flaky", "max_steps": 4,
                          "pairs_per_step": 2, "max_new_tokens": 2, "disable_progress_bar": True}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sections))
    assert main(["pipeline", "--config", str(recipe)]) == 2
    sft_model = tmp_path / "run" / "sft" / "model.safetensors"
    stamp = sft_model.stat().st_mtime_ns
    sections["train"]["reward_fn"] = f"{assets['rewards']}:fruit"  # fixed
    recipe.write_text(yaml.safe_dump(sections))
    assert main(["pipeline", "--config", str(recipe)]) == 2  # without --resume: the finished stage is not redone
    assert "not empty" in capsys.readouterr().err
    assert main(["pipeline", "--config", str(recipe), "--check", "--resume"]) == 0
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 0
    assert sft_model.stat().st_mtime_ns == stamp and (tmp_path / "run" / "train" / "model.safetensors").is_file()
    assert "sft finished already" in capsys.readouterr().out
    # An earlier stage that runs again (its folder removed) makes every later one run again: train is
    # not kept, since it was trained from the SFT model that is gone.
    import shutil

    train_model = tmp_path / "run" / "train" / "model.safetensors"
    trained_at = train_model.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "run" / "sft")
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 0
    assert "finished already" not in capsys.readouterr().out and train_model.stat().st_mtime_ns != trained_at
    stamp = sft_model.stat().st_mtime_ns
    sections["sft"]["learning_rate"] = 0.5
    recipe.write_text(yaml.safe_dump(sections))
    for check in (["--check"], []):
        assert main(["pipeline", "--config", str(recipe), "--resume", *check]) == 2
        assert "stage sft finished" in capsys.readouterr().err and sft_model.stat().st_mtime_ns == stamp


def test_a_moved_pipeline_resumes(tmp_path, assets, capsys):
    """A pipeline folder moved elsewhere resumes there: its train stage, interrupted after a checkpoint,
    continues from it although its config.yaml names the SFT model at the old place, and a finished
    stage is kept although its stamp does too. Before, both were refused as changed settings. A copy
    whose original is still in place is refused: its SFT model could be another one."""
    import shutil

    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"story : the {n} is", "completion": " a cat ."}
                                               for n in ("cat", "dog", "cow", "fish")])
    broken = tmp_path / "broken"  # while it exists, the reward fails from its third call
    broken.touch()
    (tmp_path / "flaky.py").write_text(
        "import os\ncalls = []\n"
        "def flaky(prompts, completions, **kw):\n"
        f"    calls.append(1)\n    if len(calls) >= 3 and os.path.exists({str(broken)!r}):\n"
        "        raise ValueError('broken')\n"
        "    return [0.0] * len(prompts)\n")
    sections = {"sft": {"model_name_or_path": str(assets["llama"]), "dataset": str(data), "max_length": 512,
                        "eval_fraction": 0.25, "disable_progress_bar": True},
                "train": {"dataset": str(data), "reward_fn": f"{tmp_path / 'flaky.py'}:flaky", "max_steps": 4,
                          "save_steps": 2, "pairs_per_step": 2, "max_new_tokens": 2, "disable_progress_bar": True}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "old" / "run"), **sections}))
    assert main(["pipeline", "--config", str(recipe)]) == 2  # the reward fails at step 3, after checkpoint-2
    assert (tmp_path / "old" / "run" / "train" / "checkpoint-2").is_dir()
    shutil.move(tmp_path / "old", tmp_path / "new")
    broken.unlink()  # fixed
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "new" / "run"), **sections}))
    capsys.readouterr()
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "sft finished already" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "new" / "run" / "train" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]  # continued from checkpoint-2 (a fresh start would log 1 and 2 again)
    assert (tmp_path / "new" / "run" / "train" / "model.safetensors").is_file()
    shutil.copytree(tmp_path / "new", tmp_path / "copy")  # copied: the original's SFT model is still there,
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "copy" / "run"), **sections}))
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 2  # so the copy's is another model
    assert "stage train finished" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "copy")
    shutil.move(tmp_path / "new", tmp_path / "moved")  # moved again, finished this time
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "moved" / "run"), **sections}))
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 0, capsys.readouterr().err
    assert "train finished already" in capsys.readouterr().out
    sections["train"]["max_new_tokens"] = 3  # a real change is still refused
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "moved" / "run"), **sections}))
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 2
    assert "stage train finished" in capsys.readouterr().err


def test_a_train_section_with_a_reward_function_keeps_the_sft_model(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "sft": {"model_name_or_path": "m", "dataset": "d"},
                                      "train": {"dataset": "p.jsonl", "reward_fn": "p3o.tasks.dialogue:gold_reward"}}))
    train, _ = load_recipe(str(recipe))["train"]
    assert train.model_name_or_path == str(tmp_path / "o" / "sft") and train.reward_model is None


def test_a_signal_during_a_stages_final_save_keeps_the_stage_and_stops_the_pipeline(tmp_path, assets, capsys,
                                                                                   monkeypatch):
    """The stage finished its save, so it is kept; the pipeline stops there (it went on to the next
    stage before) and --resume continues with the next one."""
    from conftest import write_jsonl

    import p3o.pipeline.recipe as recipe_module
    from p3o.utils.checkpoints import StopRequest

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"story : the {n} is", "completion": " a cat ."}
                                               for n in ("cat", "dog", "cow", "fish")])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"),
                                      "sft": {"model_name_or_path": str(assets["llama"]), "dataset": str(data),
                                              "max_steps": 1, "disable_progress_bar": True},
                                      "train": {"dataset": str(data), "reward_fn": f"{assets['rewards']}:fruit",
                                                "max_steps": 1, "pairs_per_step": 4, "max_new_tokens": 4,
                                                "disable_progress_bar": True}}))
    run_sft = recipe_module.run_sft

    def signalled(cfg):  # as run_stage ends when SIGTERM came during its final save
        run_sft(cfg)
        stop = StopRequest()
        stop.requested = "SIGTERM"
        stop.finished_anyway(cfg.output_dir)

    monkeypatch.setattr(recipe_module, "run_sft", signalled)
    assert main(["pipeline", "--config", str(recipe)]) == 130
    assert "stopped by SIGTERM as stage sft finished; continue with the same command plus --resume" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run" / "train").exists()
    monkeypatch.setattr(recipe_module, "run_sft", run_sft)
    assert main(["pipeline", "--config", str(recipe), "--resume"]) == 0
    assert "sft finished already" in capsys.readouterr().out
    assert (tmp_path / "run" / "train" / "model.safetensors").is_file()


def test_check_takes_a_dpo_section_with_pairs_and_held_out_prompts(tmp_path, assets):
    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "train": {
        "model_name_or_path": str(assets["llama"]), "algo": "dpo", "dataset": str(pairs), "eval_dataset": str(prompts),
        "reward_model": None}}))
    assert main(["pipeline", "--config", str(recipe), "--check"]) == 0


def test_a_converted_dataset_keeps_its_pairs_for_dpo_and_only_prompts_for_sampling(tmp_path):
    """dataset_format converts a train section's data to prompts, which DPO cannot learn from."""
    import dataclasses

    from conftest import FIXTURES

    from p3o.pipeline.recipe import _with_converted_data
    from p3o.rl.config import TrainConfig

    base = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(FIXTURES / "hh.jsonl"), reward_fn="m:f")
    for algo, columns in (("p3o-v2", {"prompt"}), ("dpo", {"prompt", "chosen", "rejected"})):
        cfg = _with_converted_data(dataclasses.replace(base, algo=algo), "hh", "train", tmp_path / algo)
        first = json.loads(Path(cfg.dataset).read_text().splitlines()[0])
        assert set(first) == columns, algo
