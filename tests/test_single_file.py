"""examples/p3o_single_file.py (torch + transformers only) trains to the weights `p3o train` trains to.

p3o runs each pair's shared prompt once, in a packed [prompt, y1, y2] forward (`group_token_logprobs`);
the single file runs the two sequences apart, which gives the same log-probs up to float32 rounding.
With p3o's packing switched off (the path it takes itself for architectures that cannot pack) the two
are bit-identical after 10 steps. With packing on, the gradients agree to float32 rounding (~3e-7
relative), and the weights to max |dw| ~1e-6..2.4e-6 at lr 1e-3 (seeds 0-3): the gap is set in the
first rollout by Adam's early steps on the few gradient entries of size ~eps (1e-8), where
lr * g / (|g| + eps) turns a rounding-level change of g into ~1e-3 lr, and it does not grow over the
10 steps. Hence the bound of 1% of one step's lr.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_config
from transformers import AutoModelForCausalLM

from p3o.rl.train import build_trainer

SINGLE_FILE = Path(__file__).resolve().parents[1] / "examples" / "p3o_single_file.py"
SETTINGS = dict(max_steps=10, pairs_per_step=8, minibatch_pairs=4, epochs=2, max_new_tokens=5, seed=3,
                learning_rate=1e-3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~30x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single_file():
    spec = importlib.util.spec_from_file_location("p3o_single_file", SINGLE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


# Every other option the single file has, away from its default.
OPTIONS = dict(delta_normalization="rms", delta_clip=1.5, kl_target=0.05, kl_horizon=50, loss_aggregation="token-mean",
               weight_decay=0.1, warmup_steps=3, lr_scheduler_type="linear", temperature=0.8, max_grad_norm=0.5,
               clip_eps=0.1, importance_clamp=2.0, beta=0.2, max_prompt_length=6)  # prompts are 8 tokens


def p3o_weights(assets, tmp_path, settings: dict, packed: bool) -> dict[str, torch.Tensor]:
    trainer = build_trainer(train_config(assets, tmp_path, **settings))
    assert trainer.prompt_group == 2  # the default for the tiny llama: pairs run packed
    trainer.prompt_group = 2 if packed else 1
    trainer.train()
    return trainer.unwrapped_policy.state_dict()


def test_the_single_file_imports_nothing_but_torch_and_transformers():
    source = SINGLE_FILE.read_text()
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert {name.split(".")[0] for name in imports} <= {"__future__", "argparse", "copy", "hashlib", "importlib",
                                                        "json", "math", "dataclasses", "torch", "transformers"}
    assert len(source.splitlines()) < 350


@pytest.mark.parametrize("algo, options", [("p3o-v2", {}), ("p3o-v1", {}), ("p3o-v2", OPTIONS)],
                         ids=["p3o-v2", "p3o-v1", "p3o-v2-options"])
def test_single_file_ends_on_the_weights_p3o_train_ends_on(assets, tmp_path, capsys, algo, options):
    settings = {**SETTINGS, "algo": algo, **options}
    argv = ["--model", str(assets["llama"]), "--prompts", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit"]
    argv += [arg for name, value in settings.items() for arg in (f"--{name}", str(value))]
    got = single_file().main(argv).state_dict()
    assert "step 10:" in capsys.readouterr().out
    initial = AutoModelForCausalLM.from_pretrained(assets["llama"]).state_dict()
    assert max((got[name] - initial[name]).abs().max().item() for name in got) > 0.01  # it did train

    unpacked = p3o_weights(assets, tmp_path, settings, packed=False)
    assert got.keys() == unpacked.keys()
    for name in got:
        assert torch.equal(got[name], unpacked[name]), f"{name} differs from p3o's unpacked run"

    packed = p3o_weights(assets, tmp_path, settings, packed=True)
    worst = max((got[name] - packed[name]).abs().max().item() for name in got)
    assert worst <= 0.01 * SETTINGS["learning_rate"], f"max |dw| {worst:.3g} against p3o's packed run"
