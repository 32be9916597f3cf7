"""Baselines on the shared engine (docs/p3o.md section 5): PPO, RLOO, GRPO, ReMax, online and offline DPO."""
from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from conftest import NOUNS, TARGETS, VERBS, prompt_rows, train_config, write_jsonl
from test_engine import assert_bit_identical, gradients_of_first_update, trained_with_and_without_shift

from p3o.cli import main
from p3o.errors import UsageError
from p3o.rl.algorithms import ALGORITHMS
from p3o.rl.rollout import PolicyOutputs
from p3o.rl.train import build_trainer

SAMPLED = ["p3o-v1", "p3o-v2", "ppo", "rloo", "grpo", "remax", "online-dpo"]


def preference_rows(n: int = 96, seed: int = 0) -> list[dict]:
    """Pairs for the fruit task: the chosen completion names fruit, the rejected one does not."""
    rng = random.Random(seed)
    rows = []
    for row in prompt_rows(n, seed):
        plain = [rng.choice(NOUNS + VERBS) for _ in range(6)]
        fruity = [rng.choice(TARGETS) if i % 2 else w for i, w in enumerate(plain)]
        rows.append({"prompt": row["prompt"], "chosen": " " + " ".join(fruity), "rejected": " " + " ".join(plain)})
    return rows


@pytest.fixture()
def preferences(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows())


def dpo_config(assets, tmp_path, preferences, **kw):
    return train_config(assets, tmp_path, algo="dpo", dataset=str(preferences), reward_fn=None, **kw)


def test_every_algorithm_is_registered_and_unknown_ones_are_listed():
    from p3o.rl.config import ALGOS, TrainConfig

    # the package's own (a test may have registered one from outside: tests/test_custom_algorithm.py)
    assert set(SAMPLED + ["dpo"]) == set(ALGOS) and set(ALGOS) <= set(ALGORITHMS)
    assert list(ALGORITHMS)[:len(ALGOS)] == ["p3o-v1", "p3o-v2", "rloo", "grpo", "remax", "ppo", "dpo", "online-dpo"]

    with pytest.raises(UsageError, match="unknown --algo 'ppo2'; known algorithms: p3o-v1, p3o-v2, rloo"):
        TrainConfig(model_name_or_path="m", dataset="d", output_dir="o", reward_fn="r.py:f", algo="ppo2")


@pytest.mark.parametrize("algo", SAMPLED)
def test_each_algorithm_runs_on_the_shared_engine(assets, tmp_path, algo):
    trainer = build_trainer(train_config(assets, tmp_path, algo=algo, max_steps=2))
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(m["loss"]) for m in history)
    assert trainer.state.optimizer_steps == 2 * 2 * 2  # steps x epochs x minibatches, as for P3O
    k = trainer.sizes.num_generations
    assert k == {"grpo": 4, "ppo": 1, "remax": 1}.get(algo, 2)
    assert history[0]["kl"] == 0.0 and "reward" in history[0]
    # only PPO trains a value head, and only its loss reports a value loss
    assert (trainer.trained_module is not trainer.unwrapped_policy) == (algo == "ppo")
    assert ("value_loss" in history[0]) == (algo == "ppo")


def test_settings_left_unset_come_from_the_algorithm(assets, tmp_path, preferences):
    assert train_config(assets, tmp_path, algo="ppo").loss_aggregation == "token-mean"
    rloo = train_config(assets, tmp_path, algo="rloo", epochs=None, beta=None)
    assert (rloo.beta, rloo.epochs, rloo.loss_aggregation, rloo.num_generations) == (0.05, 4, "group-mean", 2)
    dpo = dpo_config(assets, tmp_path, preferences, epochs=None, beta=None)
    assert (dpo.beta, dpo.epochs, dpo.num_generations) == (0.1, 1, 2)
    assert train_config(assets, tmp_path, loss_aggregation="pair-mean").loss_aggregation == "group-mean"


@pytest.mark.parametrize("overrides, message", [
    (dict(algo="p3o-v2", num_generations=3), "takes exactly 2 responses per prompt"),
    (dict(algo="rloo", num_generations=1), "takes at least 2 responses per prompt"),
    (dict(algo="online-dpo", kl_target=3.0), "--kl_target adapts a KL penalty"),
    (dict(algo="dpo"), "learns from the preference pairs of --dataset"),
    (dict(algo="ppo", reward_fn=None), "give a reward: --reward_fn"),
    (dict(algo="grpo", scale_rewards="batch"), "--scale_rewards must be group or none"),
])
def test_settings_an_algorithm_cannot_use_are_refused(assets, tmp_path, overrides, message):
    """Refused before any model loads: by the config, or (rewards, which the Python API may add as
    objects) by the trainer before it loads anything."""
    with pytest.raises(UsageError, match=message):
        build_trainer(train_config(assets, tmp_path, **overrides))


@pytest.mark.parametrize("algo", ["rloo", "grpo", "remax", "online-dpo"])  # P3O: tests/test_engine.py
def test_per_prompt_reward_shift_leaves_comparative_algorithms_bit_identical(assets, tmp_path, algo):
    assert_bit_identical(*trained_with_and_without_shift(assets, tmp_path, algo=algo))


def test_per_prompt_reward_shift_changes_ppo(assets, tmp_path):
    plain, shifted = trained_with_and_without_shift(assets, tmp_path, algo="ppo")
    assert any(not torch.equal(plain[name], shifted[name]) for name in plain)


@pytest.mark.parametrize("aggregation", ["group-mean", "token-mean"])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_rloo_with_two_samples_and_one_on_policy_pass_has_the_p3o_v1_gradient(assets, tmp_path, aggregation):
    kw = dict(max_steps=1, epochs=1, pairs_per_step=8, minibatch_pairs=8, loss_aggregation=aggregation, beta=0.2)
    rloo = gradients_of_first_update(train_config(assets, tmp_path, algo="rloo", num_generations=2, **kw))
    v1 = gradients_of_first_update(train_config(assets, tmp_path, algo="p3o-v1", **kw))
    v2 = gradients_of_first_update(train_config(assets, tmp_path, algo="p3o-v2", **kw))
    assert any(g.abs().max() > 1e-4 for g in v1.values())
    for name in v1:
        assert torch.allclose(rloo[name], v1[name], atol=1e-7, rtol=1e-4), name
        assert torch.allclose(v2[name], v1[name], atol=1e-7, rtol=1e-4), name  # rho = 1: both are the PPG


def test_rloo_with_more_samples_differs_from_p3o(assets, tmp_path):
    kw = dict(max_steps=1, epochs=2, pairs_per_step=8, minibatch_pairs=8)  # epochs 2: advantages before the update
    trainer = build_trainer(train_config(assets, tmp_path, algo="rloo", num_generations=4, **kw))
    rollout, texts, _ = trainer.collect_rollout(0)
    assert rollout.response_ids.shape[0] == 32 and rollout.advantages.shape == (32,)
    assert torch.allclose(rollout.advantages.view(8, 4).sum(-1), torch.zeros(8), atol=1e-5)  # LOO sums to 0


def test_ppo_rollout_has_token_level_advantages_returns_and_values(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, algo="ppo", max_new_tokens=6))
    rollout, _, _ = trainer.collect_rollout(0)
    seq, mask = rollout, rollout.response_mask.bool()
    assert seq.advantages.shape == seq.returns.shape == seq.old_values.shape == mask.shape
    assert not seq.old_values.any()  # the critic starts at zero
    assert seq.advantages[mask].mean().abs() < 1e-5 and not seq.advantages[~mask].any()  # whitened
    # V = 0 and pi_old = pi_ref, so the only reward is the score on the last token n - 1, and with
    # gamma = 1 GAE gives token t the return lambda^(n - 1 - t) * score
    n = mask.sum(-1, keepdim=True)
    expected = 0.95 ** (n - 1 - torch.arange(mask.shape[1])).clamp(min=0) * seq.rewards.float()[:, None]
    assert torch.allclose(seq.returns[mask], expected[mask], atol=1e-6)


def test_ppo_saves_a_plain_policy_and_its_value_head_beside_it(assets, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    args = ["train", "--algo", "ppo", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out), "--max_steps", "2",
            "--pairs_per_step", "4", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--disable_progress_bar"]
    assert main(args) == 0
    head = load_file(str(out / "value_head.safetensors"))
    assert set(head) == {"weight", "bias"} and head["weight"].abs().sum() > 0  # the critic trained
    model = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(assets["llama"])
    assert model.state_dict().keys() == original.state_dict().keys()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"value_loss", "value_clipfrac", "explained_variance", "beta"} <= metrics[0].keys()


@pytest.mark.parametrize("algo", ["ppo", "p3o-v2"])
def test_the_adaptive_kl_controller_sets_each_rollouts_beta(assets, tmp_path, algo):
    fixed = build_trainer(train_config(assets, tmp_path, algo=algo, max_steps=3)).train()
    assert {m["beta"] for m in fixed} == {0.05}
    target, horizon = 0.5, 100
    history = build_trainer(train_config(assets, tmp_path, algo=algo, max_steps=4, kl_target=target,
                                         kl_horizon=horizon)).train()
    responses = 8 * (1 if algo == "ppo" else 2)
    beta = 0.05
    for m in history:  # each rollout's beta follows from the KL of the one before
        assert m["beta"] == pytest.approx(beta, rel=1e-9)
        beta *= 1 + min(max(m["kl"] / target - 1, -0.2), 0.2) * responses / horizon
    assert len({m["beta"] for m in history}) == 4


def test_grpo_with_two_samples_warns_that_only_the_sign_is_kept(assets, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="p3o"):
        build_trainer(train_config(assets, tmp_path, algo="grpo", num_generations=2))
    assert "keeps only the sign" in caplog.text


def test_remax_scores_a_greedy_response_per_prompt(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, algo="remax", num_generations=1))
    rollout, _, _ = trainer.collect_rollout(0)
    base, kl = rollout.baseline_rewards, rollout.baseline_kl
    assert base.shape == kl.shape == (8,) and base.dtype == torch.float64
    expected = (rollout.rewards - base).float() - trainer.cfg.beta * (rollout.kl - kl)
    assert torch.allclose(rollout.advantages, expected)
    # greedy really is deterministic: the same prompts give the same baseline at another sampling seed
    other = build_trainer(train_config(assets, tmp_path, algo="remax", num_generations=1, seed=5))
    other.prompt_indices = trainer.prompt_indices
    assert torch.equal(other.collect_rollout(0)[0].baseline_rewards, base)


def test_remax_greedy_baseline_is_in_the_samples_units_under_running_std(assets, tmp_path):
    """--reward_normalization running_std clips and divides the samples' rewards; the greedy
    baseline subtracted from them must be clipped and divided the same way (it was raw)."""
    words = tmp_path / "words.py"
    words.write_text("def words(prompts, completions, **kw):\n    return [len(c.split()) - 2.0 for c in completions]\n")
    trainer = build_trainer(train_config(assets, tmp_path, algo="remax", num_generations=2, reward_clip=3.0,
                                         reward_fn=f"{words}:words", reward_normalization="running_std"))
    scored, score = [], trainer.score
    trainer.score = lambda *a, **kw: scored.append(score(*a, **kw)) or scored[-1]
    rollout, _, _ = trainer.collect_rollout(0)
    samples, greedy = scored  # the samples' raw scores (16,), then the greedy responses' (8,)
    std = trainer.reward_scale.std
    assert std != 1.0 and samples.abs().max() > 3 and not torch.equal(greedy.clamp(-3, 3) / std, greedy)
    assert torch.equal(rollout.rewards, samples.clamp(-3, 3) / std)
    assert torch.equal(rollout.baseline_rewards, greedy.clamp(-3, 3) / std)
    assert rollout.stats["baseline_reward"] == greedy.mean().item()  # logged raw, as `reward` is


def test_running_std_leaves_rewards_unscaled_until_they_spread():
    from p3o.rl.reward_scaling import RunningRewardScale

    scale = RunningRewardScale(clip=10.0)
    for _ in range(3):  # a constant reward has no spread to divide by (it was divided by 1e-8)
        assert torch.equal(scale(torch.full((4,), 0.1, dtype=torch.float64)), torch.full((4,), 0.1, dtype=torch.float64))
    spread = scale(torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert scale.std == pytest.approx(torch.tensor([0.1] * 12 + [0.0, 2.0], dtype=torch.float64).std().item())
    assert torch.allclose(spread, torch.tensor([0.0, 2.0], dtype=torch.float64) / scale.std)


def test_online_dpo_labels_pairs_by_reward_and_drops_ties(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, algo="online-dpo"))
    rollout, _, _ = trainer.collect_rollout(0)
    r = rollout.rewards.view(-1, 2)
    assert torch.equal(rollout.preference, torch.sign(r[:, 0] - r[:, 1]).float())


def test_offline_dpo_loss_is_log_two_at_the_start(assets, tmp_path, preferences):
    trainer = build_trainer(dpo_config(assets, tmp_path, preferences, max_new_tokens=12))
    rollout, texts, _ = trainer.collect_rollout(0)
    seq = rollout
    assert seq.rewards is None and seq.old_logp is None  # nothing sampled, scored or re-computed
    assert texts.completions[0].split()[1] in TARGETS and not set(texts.completions[1].split()) & set(TARGETS)
    token_logps = trainer.log_probs(seq, {}, old=False)["ref_token_logp"]
    losses, stats = trainer.algorithm.loss(rollout, PolicyOutputs(token_logps), trainer.cfg)
    assert torch.allclose(losses, torch.full((8,), math.log(2)))


def test_offline_dpo_through_the_cli_sizes_the_run_by_epochs(assets, tmp_path, preferences, caplog):
    out = tmp_path / "dpo"
    args = ["train", "--algo", "dpo", "--model_name_or_path", str(assets["llama"]), "--dataset", str(preferences),
            "--output_dir", str(out), "--num_train_epochs", "0.5", "--pairs_per_step", "8", "--max_new_tokens", "12",
            "--learning_rate", "1e-3", "--disable_progress_bar"]
    with caplog.at_level(logging.WARNING, logger="p3o"):
        assert main(args) == 0
    assert "max_steps wins" not in caplog.text  # no --max_steps was given
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6  # ceil(0.5 * 96 / 8)
    assert {"chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"} <= metrics[0].keys()
    assert metrics[-1]["reward_margin"] > metrics[0]["reward_margin"]
    assert (out / "model.safetensors").is_file() and "reward" not in metrics[0]


def test_offline_dpo_refuses_prompt_only_data(assets, tmp_path):
    with pytest.raises(UsageError, match="chosen"):
        build_trainer(train_config(assets, tmp_path, algo="dpo", reward_fn=None))


def held_out_fruit(assets, policy, reference, tokenizer, n=64):
    """The fruit reward of `policy`'s samples on prompts no run trained on."""
    from p3o.data.prompts import load_prompts
    from p3o.eval.policy import evaluate_policy
    from p3o.reward import build_reward

    path = write_jsonl(assets["prompts"].parent / "held_out.jsonl", prompt_rows(n, seed=99))
    prompts = load_prompts(str(path), tokenizer)
    return evaluate_policy(policy, reference, tokenizer, prompts, {"fruit": build_reward(f"{assets['rewards']}:fruit", None)},
                           max_new_tokens=8, seed=0)


@pytest.mark.parametrize("algo", ["ppo", "rloo", "dpo", "grpo", "online-dpo"])
def test_baselines_raise_the_reward_on_the_word_task(assets, tmp_path, preferences, algo):
    """PPO and RLOO on the fruit reward, DPO on fruit preference pairs: 30 steps, judged on held-out prompts."""
    kw = dict(max_steps=30, pairs_per_step=32, minibatch_pairs=8, max_new_tokens=8, learning_rate=1e-3)
    if algo == "dpo":
        cfg = dpo_config(assets, tmp_path, preferences, **{**kw, "max_new_tokens": 12, "max_steps": 12, "epochs": 1})
    else:
        cfg = train_config(assets, tmp_path, algo=algo, epochs=4, **kw)
    trainer = build_trainer(cfg)
    before = held_out_fruit(assets, trainer.unwrapped_policy, trainer.ref_policy, trainer.tokenizer)
    trainer.train()
    after = held_out_fruit(assets, trainer.unwrapped_policy, trainer.ref_policy, trainer.tokenizer)
    gain, stderr = after["fruit"] - before["fruit"], math.hypot(after["fruit_stderr"], before["fruit_stderr"])
    assert gain > 3 * stderr, (before["fruit"], after["fruit"], stderr)  # a rise well beyond sampling noise
    assert after["kl"] > 0 and before["kl"] == 0


def test_chat_preference_pairs_are_tokenized_as_the_policy_continues_its_prompt(bos_tokenizer_model, tmp_path):
    from conftest import bot, user

    from p3o.data.prompts import load_preference_pairs
    from p3o.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(bos_tokenizer_model))
    rows = [{"prompt": [user("story : the cat .")], "chosen": [bot("apple pear")], "rejected": [bot("dog runs")]}]
    data = load_preference_pairs(str(write_jsonl(tmp_path / "chat.jsonl", rows)), tokenizer, max_response_tokens=64)
    prompt_ids, (chosen, rejected) = data.token_ids[0], data.responses[0]
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids[1] != tokenizer.bos_token_id  # BOS once
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id  # each ends where the policy would stop
    full = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert tokenizer.decode(prompt_ids + chosen, skip_special_tokens=True) == \
        tokenizer.decode(tokenizer(full, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    cut = load_preference_pairs(str(tmp_path / "chat.jsonl"), tokenizer, max_response_tokens=2)
    assert [len(r) for r in cut.responses[0]] == [2, 2]


def test_dpo_data_without_a_rejected_column_is_one_clear_error(assets, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "story : the cat .", "chosen": " apple"}])
    args = ["train", "--algo", "dpo", "--model_name_or_path", str(assets["llama"]), "--dataset", str(data),
            "--output_dir", str(tmp_path / "out"), "--disable_progress_bar"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rejected" in err[0], err
    assert not (tmp_path / "out").exists()


def fake_rollout(k: int = 2, G: int = 3, T: int = 5, seed: int = 0):
    """A rollout of random numbers with ragged response lengths, for checking adapters by hand."""
    from p3o.rl.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    B = G * k
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    seq = {"response_mask": mask, "rewards": torch.randint(0, 4, (B,), generator=g).double(),
           "old_token_logp": -torch.rand(B, T, generator=g) * mask, "ref_token_logp": -torch.rand(B, T, generator=g) * mask,
           "old_values": torch.randn(B, T, generator=g) * mask}
    seq["old_logp"] = seq["old_token_logp"].sum(-1)
    seq["kl"] = seq["old_logp"] - seq["ref_token_logp"].sum(-1)
    return Rollout(k, **seq)


def test_ppo_prepare_runs_gae_with_the_configured_gamma_and_lambda(assets, tmp_path):
    from p3o.rl.algorithms import get_algorithm
    from test_advantages import naive_gae

    cfg = train_config(assets, tmp_path, algo="ppo", gamma=0.9, gae_lambda=0.5)
    rollout = fake_rollout(k=1, G=4)
    prepared = get_algorithm("ppo").prepare(rollout, cfg, 0.2)
    seq, mask = rollout, rollout.response_mask
    rewards = -0.2 * (seq.old_token_logp - seq.ref_token_logp) * mask
    lengths = mask.sum(-1).tolist()
    for b, n in enumerate(lengths):
        rewards[b, n - 1] += seq.rewards[b].item()
    expected = naive_gae(rewards.double(), seq.old_values.double(), lengths, 0.9, 0.5)
    assert torch.allclose(prepared.fields["returns"], (expected + seq.old_values).float() * mask, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["group-mean", "token-mean"])
def test_token_losses_become_group_losses_by_hand(assets, tmp_path, aggregation):
    from p3o.rl.algorithms import per_group_tokens

    cfg = train_config(assets, tmp_path, algo="grpo", loss_aggregation=aggregation)
    losses = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [1.0, 1.0, 1.0], [3.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    got = per_group_tokens(losses, mask, 2, cfg)
    if aggregation == "token-mean":  # summed over each group's tokens; the engine divides by all tokens
        assert torch.equal(got, torch.tensor([7.0, 11.0]))
    else:  # each response's token mean, averaged over its group
        assert torch.allclose(got, torch.tensor([(1.5 + 4.0) / 2, (1.0 + 4.0) / 2]))


def test_online_dpo_ties_carry_no_loss_and_no_statistics(assets, tmp_path):
    from p3o.rl.algorithms import get_algorithm
    from p3o.rl.rollout import Rollout

    cfg = train_config(assets, tmp_path, algo="online-dpo", beta=0.5)
    mask = torch.ones(4, 2)
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0], [-3.0, -3.0]])
    batch = Rollout(2, response_mask=mask, ref_logp=ref.sum(-1), preference=torch.tensor([0.0, -1.0]))
    token_logps = ref + torch.tensor([[0.4], [0.0], [0.0], [0.6]])  # y1 of the tie and y2 of the second pair moved up
    losses, stats = get_algorithm("online-dpo").loss(batch, PolicyOutputs(token_logps), cfg)
    assert losses[0] == 0.0
    # pair 2 prefers y2, which rose by 2 * 0.6 = 1.2 nats relative to y1: margin 0.5 * 1.2
    assert losses[1] == pytest.approx(-math.log(1 / (1 + math.exp(-0.6))), rel=1e-5)
    assert stats["reward_accuracy"] == 1.0 and stats["reward_margin"] == pytest.approx(0.6, rel=1e-5)
    assert (stats["chosen_logp"], stats["rejected_logp"]) == pytest.approx((-4.8, -2.0))  # the tie left out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_values_are_read_at_the_state_before_each_response_token_under_left_padding(assets, arch):
    from p3o.models.loading import load_causal_lm
    from p3o.models.value_head import PolicyWithValueHead
    from p3o.rl.rollout import token_logprobs_and_values

    model = PolicyWithValueHead(load_causal_lm(str(assets[arch]))).eval()
    torch.nn.init.normal_(model.value_head.weight, generator=torch.Generator().manual_seed(0))
    prompt, response = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11]])
    query = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], 1)  # two pad tokens on the left
    query_mask = torch.tensor([[0, 0, 1, 1, 1]])
    with torch.no_grad():
        _, values = token_logprobs_and_values(model, query, query_mask, response, torch.ones(1, 4, dtype=torch.long),
                                              with_values=True)
        full = torch.cat([prompt, response], 1)
        hidden = model.policy(input_ids=full, output_hidden_states=True).hidden_states[-1]  # (1, 7, H) unpadded
        expected = model.value_head(hidden).squeeze(-1)[:, 2:6]  # V at the prompt's last token .. y_3's state
    assert torch.allclose(values, expected, atol=1e-5)


def test_a_run_sized_by_epochs_resumes_with_the_same_command(assets, tmp_path, preferences, capsys):
    """--num_train_epochs becomes max_steps only once the data is read; the resume check compared the
    unresolved flags with the run's saved max_steps and refused the very command that made it."""
    out = tmp_path / "dpo"
    args = ["train", "--algo", "dpo", "--model_name_or_path", str(assets["llama"]), "--dataset", str(preferences),
            "--output_dir", str(out), "--num_train_epochs", "0.25", "--pairs_per_step", "8", "--max_new_tokens", "8",
            "--save_steps", "2", "--lr_scheduler_type", "linear", "--disable_progress_bar"]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0
    longer = [*args, "--resume"]
    longer[longer.index("--num_train_epochs") + 1] = "0.5"  # 6 steps, not 3, under a schedule spanning the run
    capsys.readouterr()
    assert main(longer) == 2 and "--max_steps 3 -> 6" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["dpo", "online-dpo"])
def test_dpo_scores_at_temperature_one_whatever_it_samples_at(assets, tmp_path, preferences, algo):
    """TRL's DPOTrainer has no temperature and its OnlineDPOTrainer samples tempered but scores at 1:
    --temperature changes what online DPO samples, never the log-probs its loss compares. P3O's
    log-probs stay those of the tempered distribution it samples from (its ratios need them)."""
    from p3o.rl.rollout import batched_token_logprobs

    make = (lambda **kw: dpo_config(assets, tmp_path, preferences, **kw)) if algo == "dpo" else (
        lambda **kw: train_config(assets, tmp_path, algo=algo, **kw))
    trainer = build_trainer(make(temperature=0.5))
    rollout, _, _ = trainer.collect_rollout(0)
    at_one = batched_token_logprobs(trainer.ref_policy, rollout, 1.0, 16)
    assert torch.allclose(rollout.ref_token_logp, at_one, atol=1e-6)
    # The training forward too: the first update compares the policy with itself, log 2 a pair (ties: 0)
    first = build_trainer(make(temperature=0.5, max_steps=1, epochs=1, minibatch_pairs=8)).train()[0]
    assert first["loss"] == pytest.approx(math.log(2) * (1 - first.get("tie_fraction", 0.0)), abs=1e-6)
    p3o = build_trainer(train_config(assets, tmp_path, temperature=0.5))
    rollout, _, _ = p3o.collect_rollout(0)
    assert torch.allclose(rollout.ref_token_logp, batched_token_logprobs(p3o.ref_policy, rollout, 0.5, 16), atol=1e-6)


def test_dpo_evaluates_its_held_out_pairs_as_it_trains_on_pairs(assets, tmp_path, preferences):
    """A held-out preference file gives DPO's eval_loss and implicit rewards on those pairs (TRL's
    eval_loss, eval_rewards/accuracies, ...), beside the sampled KL; before, chosen and rejected were
    ignored and only the prompts were evaluated. The policy starts as the reference: every pair's loss
    is log 2 at step 0. A prompt-only held-out file is evaluated as before."""
    out = tmp_path / "dpo"
    common = ["train", "--algo", "dpo", "--model_name_or_path", str(assets["llama"]), "--dataset", str(preferences),
              "--max_steps", "4", "--pairs_per_step", "8", "--max_new_tokens", "12", "--learning_rate", "1e-3",
              "--eval_max_prompts", "12", "--disable_progress_bar"]
    assert main([*common, "--output_dir", str(out), "--eval_dataset", str(preferences)]) == 0
    points = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    start, end = points[0], points[-1]
    assert start["pairs"] == 12 and start["n"] == 12 and "kl" in start
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6) and start["loss_stderr"] == pytest.approx(0, abs=1e-6)
    assert start["reward_margin"] == pytest.approx(0, abs=1e-6) and start["chosen_logp"] < 0
    assert end["loss"] < start["loss"] and end["reward_accuracy"] > 0.5  # trained on these very pairs
    assert end["reward_margin"] == pytest.approx(end["chosen_reward"] - end["rejected_reward"], abs=1e-6)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows()[:4]])
    assert main([*common, "--output_dir", str(tmp_path / "plain"), "--eval_dataset", str(prompts)]) == 0
    plain = json.loads((tmp_path / "plain" / "eval.jsonl").read_text().splitlines()[0])
    assert "loss" not in plain and plain["n"] == 4
    from p3o import P3OConfig, P3OTrainer  # and trainer.evaluate(eval_dataset=pairs) from Python

    trainer = P3OTrainer(str(assets["llama"]), args=P3OConfig(output_dir=str(tmp_path / "api"), algo="dpo",
                                                              dataset=str(preferences), max_new_tokens=12,
                                                              eval_max_prompts=6))
    metrics = trainer.evaluate(eval_dataset=str(preferences))
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["eval_pairs"] == 6
