"""The shared rollout/update engine: determinism, reward-shift invariance, accumulation, pairing."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import train_config

from p3o.rl.rollout import PolicyOutputs
from p3o.rl.train import build_trainer


def trained_weights(cfg) -> dict[str, torch.Tensor]:
    trainer = build_trainer(cfg)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.unwrapped_policy.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_first_rollout_pairs_masks_and_kl(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, max_new_tokens=8))
    rollout, texts, _ = trainer.collect_rollout(0)
    seq = rollout
    B, T = seq.response_ids.shape
    assert B == 16 and rollout.num_groups == 8 and T <= 8
    # both responses of a pair share the prompt and sit in consecutive rows
    assert torch.equal(seq.query_ids[0::2], seq.query_ids[1::2])
    # the mask runs up to and including the first EOS and is 0 after it
    eos = trainer.tokenizer.eos_token_id
    for ids, mask in zip(seq.response_ids, seq.response_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[: n - 1] != eos).all()
        assert n == T or ids[n - 1] == eos
    # pi_old == pi_ref at the start, so the sequence KL is exactly zero
    assert torch.equal(seq.old_logp, seq.ref_logp) and not seq.kl.any()
    assert rollout.delta.shape == (8,)
    assert len(texts.completions) == 16 and len(texts.prompts) == 8


def test_delta_is_reward_difference_minus_beta_kl_difference(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, beta=0.3))
    rollout, _, _ = trainer.collect_rollout(0)
    rollout.kl = torch.randn(16)  # pretend the policy has moved
    delta = trainer.algorithm.prepare(rollout, trainer.cfg, 0.3).fields["delta"]
    r, kl = rollout.rewards.view(8, 2), rollout.kl.view(8, 2)
    expected = (r[:, 0] - r[:, 1]).float() - 0.3 * (kl[:, 0] - kl[:, 1])
    assert torch.allclose(delta, expected)


@pytest.mark.parametrize("algo", ["p3o-v1", "p3o-v2"])
def test_same_seed_gives_bit_identical_weights(assets, tmp_path, algo):
    first = trained_weights(train_config(assets, tmp_path, algo=algo))
    second = trained_weights(train_config(assets, tmp_path, algo=algo))
    assert_bit_identical(first, second)
    other_seed = trained_weights(train_config(assets, tmp_path, algo=algo, seed=1))
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


@pytest.mark.parametrize("algo", ["p3o-v1", "p3o-v2"])
@pytest.mark.parametrize("delta_normalization", ["none", "rms"])
def test_per_prompt_reward_shift_gives_bit_identical_weights(assets, tmp_path, algo, delta_normalization):
    plain, shifted = trained_with_and_without_shift(assets, tmp_path, algo=algo, delta_normalization=delta_normalization)
    assert_bit_identical(plain, shifted)


def trained_with_and_without_shift(assets, tmp_path, **kw) -> tuple[dict, dict]:
    """Weights after 3 steps on the fruit reward, and on the same reward plus a huge per-prompt shift."""
    plain = build_trainer(train_config(assets, tmp_path, max_steps=3, **kw))
    plain_history = plain.train()
    shifted = build_trainer(train_config(assets, tmp_path, max_steps=3, reward_fn=f"{assets['rewards']}:shifted_fruit", **kw))
    shifted_history = shifted.train()
    assert plain_history[0]["reward"] != shifted_history[0]["reward"]  # the shift really was applied
    return plain.unwrapped_policy.state_dict(), shifted.unwrapped_policy.state_dict()


def gradients_of_first_update(cfg, fuse_old_pass: bool | None = None) -> dict[str, torch.Tensor]:
    """The accumulated gradient at the first optimiser step (compared before Adam, whose first step
    is sign-like and would amplify float round-off in near-zero components)."""
    trainer = build_trainer(cfg)
    if fuse_old_pass is not None:
        trainer.fuse_old_pass = fuse_old_pass
    grads, step = {}, trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in trainer.unwrapped_policy.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    trainer.train()
    return grads


@pytest.mark.parametrize("aggregation", ["group-mean", "token-mean"])
@pytest.mark.parametrize("algo", ["p3o-v2", "ppo", "grpo", "rloo", "online-dpo"])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_gradient_accumulation_equals_one_large_minibatch(assets, tmp_path, aggregation, algo):
    kw = dict(max_steps=1, epochs=1, pairs_per_step=8, minibatch_pairs=8, loss_aggregation=aggregation, algo=algo)
    one = gradients_of_first_update(train_config(assets, tmp_path, gradient_accumulation_steps=1, **kw))
    four = gradients_of_first_update(train_config(assets, tmp_path, gradient_accumulation_steps=4, **kw))
    assert any(g.abs().max() > 0 for g in one.values())
    for name in one:
        assert torch.allclose(one[name], four[name], atol=1e-7, rtol=1e-4), name


WHOLE_ROLLOUT = dict(gradient_accumulation_steps=1)  # one micro-batch: prepare may read the whole rollout


@pytest.mark.parametrize("algo, extra", [
    *[(a, dict(gradient_accumulation_steps=2)) for a in ("p3o-v1", "p3o-v2", "rloo", "grpo", "remax", "online-dpo")],
    ("ppo", WHOLE_ROLLOUT), ("p3o-v1", dict(delta_normalization="rms", **WHOLE_ROLLOUT))])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_one_on_policy_pass_takes_pi_old_from_the_training_forward(assets, tmp_path, algo, extra, monkeypatch):
    """epochs 1 and one minibatch: no separate no-grad pass of the policy, and the same gradient,
    KL and algorithm statistics as with that pass (PPO: its values and GAE from the training forward
    too, when that forward holds the whole rollout its advantages are whitened over)."""
    import p3o.rl.engine as engine

    kw = dict(max_steps=2, epochs=1, pairs_per_step=8, minibatch_pairs=8, algo=algo, **extra)
    rows, original = [], engine.batched_logprobs_and_values

    def counting(model, seq, *args, **kwargs):  # rows the policy itself scores without gradient
        rows.append(0 if model is runs[-1].ref_policy else seq.query_ids.shape[0])
        return original(model, seq, *args, **kwargs)

    monkeypatch.setattr(engine, "batched_logprobs_and_values", counting)
    runs, histories = [], []
    for fuse in (True, False):
        runs.append(build_trainer(train_config(assets, tmp_path, **kw)))
        assert runs[-1].fuse_old_pass
        runs[-1].fuse_old_pass = fuse
        rows.clear()
        histories.append(runs[-1].train())
        histories[-1].append(sum(rows))
    fused, separate = histories
    k = runs[0].sizes.num_generations
    assert separate[-1] - fused[-1] == 2 * 8 * k  # exactly the old pass over both steps' rollouts is gone
    for name in ("kl", "loss", "delta_abs", "advantage_abs", "tie_fraction", "value_mean", "return_mean",
                 "explained_variance", "value_loss", "clipfrac"):
        if name in separate[0]:
            assert fused[0][name] == pytest.approx(separate[0][name], rel=1e-4, abs=1e-6), name
    assert "time_old_logprobs" in separate[0] and "time_old_logprobs" not in fused[0]
    one = gradients_of_first_update(train_config(assets, tmp_path, **kw), fuse_old_pass=True)
    two = gradients_of_first_update(train_config(assets, tmp_path, **kw), fuse_old_pass=False)
    assert any(g.abs().max() > 0 for g in one.values())
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-7, rtol=1e-4), name


@pytest.mark.parametrize("change", [dict(epochs=2), dict(minibatch_pairs=4),
                                    dict(algo="ppo", gradient_accumulation_steps=2),
                                    dict(delta_normalization="rms", gradient_accumulation_steps=4)])
def test_the_old_pass_stays_when_the_rollout_is_reused_or_prepared_as_a_whole(assets, tmp_path, change):
    """Reused, or prepared over the whole rollout (PPO's whitening, P3O's rms) while the update
    splits it into micro-batches: pi_old needs its own pass."""
    kw = dict(max_steps=1, epochs=1, pairs_per_step=8, minibatch_pairs=8) | change
    assert not build_trainer(train_config(assets, tmp_path, **kw)).fuse_old_pass


def test_minibatches_never_split_pairs_and_count_optimizer_steps(assets, tmp_path):
    cfg = train_config(assets, tmp_path, max_steps=2, epochs=3, pairs_per_step=8, minibatch_pairs=2,
                       gradient_accumulation_steps=2)
    trainer = build_trainer(cfg)
    algorithm, seen = trainer.algorithm, []

    def checking_loss(batch, outputs, cfg):
        q = batch.query_ids
        assert q.shape[0] % 2 == 0 and torch.equal(q[0::2], q[1::2]), "a pair was split"
        seen.append(batch.num_groups)
        return algorithm.loss(batch, outputs, cfg)

    trainer.algorithm = dataclasses.replace(algorithm, loss=checking_loss)
    trainer.train()
    # 2 steps x 3 epochs x (8 / 2) minibatches, each of 2 micro-batches of 1 pair
    assert trainer.state.optimizer_steps == 24 and seen == [1] * 48


def test_rollout_select_keeps_groups_whole(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path))
    rollout, _, _ = trainer.collect_rollout(0)
    part = rollout.select(torch.tensor([5, 2]))
    assert torch.equal(part.response_ids, rollout.response_ids[[10, 11, 4, 5]])
    assert torch.equal(part.delta, rollout.delta[[5, 2]])


def test_every_prompt_is_used_once_per_pass(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, pairs_per_step=8))
    n = len(trainer.prompts)  # 48 prompts = 6 steps of 8
    first_pass = [i for step in range(6) for i in trainer.prompt_indices(step)]
    assert sorted(first_pass) == list(range(n))
    assert trainer.prompt_indices(6) != first_pass[:8]  # the next pass is reshuffled


def test_a_step_takes_the_same_prompts_on_any_number_of_processes():
    """--pairs_per_step is global: step s takes slots [sG, (s+1)G) of the data stream, process r the
    r-th block of them, so 1, 2 or 4 processes (or a run resumed on another number) see the same data."""
    import types

    from p3o.rl.config import Sizes
    from p3o.rl.engine import Trainer

    def step_prompts(step: int, processes: int) -> list[int]:
        drawn = []
        for rank in range(processes):
            process = types.SimpleNamespace(prompts=range(10), cfg=types.SimpleNamespace(seed=3),
                                            sizes=Sizes(12, 2, 12, 12 // processes, 1, 1, processes),
                                            accelerator=types.SimpleNamespace(process_index=rank, num_processes=processes))
            process._permutation = types.MethodType(Trainer._permutation, process)
            drawn.append(Trainer.prompt_indices(process, step))
        assert all(len(block) == 12 // processes for block in drawn)
        return [i for block in drawn for i in block]

    for step in range(5):  # 12 prompts a step from 10: every step crosses into the next reshuffled pass
        assert step_prompts(step, 1) == step_prompts(step, 2) == step_prompts(step, 4)
    assert step_prompts(0, 1) != step_prompts(1, 1)


@pytest.mark.parametrize("pairs", [8, 16, 32, 64, 96])
def test_the_default_minibatch_is_the_same_on_one_and_several_processes(assets, tmp_path, pairs):
    """The same command takes the same optimiser steps on 1, 2 or 4 processes (a default of 8 pairs
    per process instead would halve them on 2: seen as much slower learning)."""
    from p3o.rl.config import derive_sizes

    cfg = train_config(assets, tmp_path, pairs_per_step=pairs, minibatch_pairs=None)
    sizes = [derive_sizes(cfg, processes) for processes in (1, 2, 4)]
    assert len({(s.minibatch_groups, s.optimizer_steps) for s in sizes}) == 1
    assert [s.local_minibatch for s in sizes] == [sizes[0].minibatch_groups // n for n in (1, 2, 4)]


def test_warmup_schedule_and_metrics(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, warmup_steps=4, lr_scheduler_type="linear",
                                         max_steps=2, epochs=2, minibatch_pairs=4))
    history = trainer.train()
    # 8 optimiser steps in all, 4 a step; `lr` is the rate of each step's first update (as TRL logs the
    # rate applied): warm-up from 0 over step 1, then linear decay from the peak over step 2
    assert history[0]["lr"] == pytest.approx(0.0)
    assert history[1]["lr"] == pytest.approx(1e-3)
    for key in ("step", "reward", "kl", "loss", "clipfrac", "pairs_per_s", "approx_kl", "grad_norm",
                "time_generate", "time_score", "time_reference", "time_update"):
        assert key in history[0], key
    assert [m["step"] for m in history] == [1, 2]


def test_non_finite_gradient_skips_the_update(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, max_steps=1, epochs=1, minibatch_pairs=8))
    before = {k: v.clone() for k, v in trainer.unwrapped_policy.state_dict().items()}
    algorithm = trainer.algorithm

    def poisoned(batch, outputs, cfg):
        losses, stats = algorithm.loss(batch, outputs, cfg)
        return losses * float("nan"), stats

    trainer.algorithm = dataclasses.replace(algorithm, loss=poisoned)
    trainer.train()
    assert trainer.state.skipped_updates == 1 and trainer.state.optimizer_steps == 0
    assert_bit_identical(before, trainer.unwrapped_policy.state_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("algo", ["p3o-v1", "p3o-v2"])
def test_word_task_reward_rises(assets, tmp_path, arch, algo):
    """A reward for three fruit words that the random model almost never says: 30 steps of 32 pairs.
    At lr 1e-3, once the reward saturates (its spread within pairs near 0), one rollout's 16 Adam
    steps can throw the tiny Llama to a near-uniform policy (P3O-V2, seed 0: approx_kl 7.5 in one
    step, reward 8 -> 0); at 5e-4 every arch x algo x seed 0-2 rose from <= 0.8 to >= 7.1."""
    cfg = train_config(assets, tmp_path, model_name_or_path=str(assets[arch]), algo=algo, max_steps=30,
                       pairs_per_step=32, minibatch_pairs=8, epochs=4, max_new_tokens=8, learning_rate=5e-4)
    history = build_trainer(cfg).train()
    start = sum(m["reward"] for m in history[:3]) / 3
    end = sum(m["reward"] for m in history[-3:]) / 3
    assert end > start + 2.0, (start, end)


def test_kl_is_measured_against_the_frozen_initial_policy(assets, tmp_path):
    from p3o.models.loading import load_causal_lm
    from p3o.rl.rollout import batched_token_logprobs, sequence_logprobs

    trainer = build_trainer(train_config(assets, tmp_path, max_steps=2))
    trainer.train()
    rollout, _, _ = trainer.collect_rollout(2)
    assert rollout.kl.abs().max() > 1e-3  # the policy moved away from the reference
    initial = load_causal_lm(str(assets["llama"]))
    ref = sequence_logprobs(batched_token_logprobs(initial, rollout, 1.0, 16), rollout.response_mask)
    assert torch.allclose(rollout.ref_logp, ref, atol=1e-5)


def first_update_ratio_gap(trainer) -> float:
    """max |l(y) - l_old(y)| in the first micro-batch of the first update: 0 when on-policy."""
    algorithm, gaps = trainer.algorithm, []

    def recording_loss(batch, outputs, cfg):
        if not gaps:
            logp = (outputs.token_logps * batch.response_mask).sum(-1)
            gaps.append((logp - batch.old_logp).abs().max().item())
        return algorithm.loss(batch, outputs, cfg)

    trainer.algorithm = dataclasses.replace(algorithm, loss=recording_loss)
    trainer.train()
    return gaps[0]


def test_the_first_update_is_on_policy_at_any_temperature(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, max_steps=1, temperature=0.6))
    assert first_update_ratio_gap(trainer) < 1e-5


def test_dropout_is_switched_off_for_models_passed_in(assets, tmp_path, tokenizer):
    from p3o.data.prompts import load_prompts
    from p3o.models.tiny import build_tiny_model
    from p3o.reward import build_reward
    from p3o.rl.engine import Trainer

    cfg = train_config(assets, tmp_path, max_steps=1)
    model = build_tiny_model(tokenizer, "gpt2", num_layers=2, hidden_size=32, num_heads=2)
    model.config.resid_pdrop = 0.5
    model = type(model)(model.config)  # rebuilt with heavy dropout, in training mode
    model.train()
    trainer = Trainer(cfg, model, tokenizer, build_reward(cfg.reward_fn[0], None), load_prompts(cfg.dataset, tokenizer))
    assert first_update_ratio_gap(trainer) < 1e-5


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_token_mean_divides_by_the_minibatch_response_tokens(assets, tmp_path):
    kw = dict(max_steps=1, epochs=1, pairs_per_step=8, minibatch_pairs=8, max_grad_norm=0.0)  # no clipping
    pair_mean = gradients_of_first_update(train_config(assets, tmp_path, loss_aggregation="group-mean", **kw))
    token_mean = gradients_of_first_update(train_config(assets, tmp_path, loss_aggregation="token-mean", **kw))
    trainer = build_trainer(train_config(assets, tmp_path, **kw))
    rollout, _, _ = trainer.collect_rollout(0)
    tokens = float(rollout.response_mask.sum())
    assert tokens != 8
    for name in pair_mean:  # float32 round-off: relative to each gradient's own scale (the sums' order is the CPU's)
        scale = pair_mean[name].abs().max().item()
        assert torch.allclose(token_mean[name] * tokens / 8, pair_mean[name], atol=1e-6 * scale, rtol=1e-4), name


def test_the_loss_adapter_passes_the_configured_clip_and_clamp(assets, tmp_path):
    from p3o.rl.algorithms import get_algorithm
    from p3o.rl.losses.p3o import p3o_v1_loss
    from p3o.rl.rollout import Rollout

    cfg = train_config(assets, tmp_path, algo="p3o-v1", clip_eps=0.05, importance_clamp=1.5)
    mask = torch.ones(4, 3)
    old = torch.tensor([-3.0, -2.0, -4.0, -1.0])
    batch = Rollout(2, response_mask=mask, old_logp=old, delta=torch.tensor([1.0, -2.0]))
    token_logps = (old[:, None] + torch.tensor([0.3, -0.6, 0.1, 0.5])[:, None]) / 3 * mask  # (4, 3)
    losses, stats = get_algorithm("p3o-v1").loss(batch, PolicyOutputs(token_logps), cfg)
    expected, expected_stats = p3o_v1_loss(token_logps.sum(-1).view(2, 2), old.view(2, 2), batch.delta,
                                           clip_eps=0.05, is_clamp=1.5)
    default, _ = p3o_v1_loss(token_logps.sum(-1).view(2, 2), old.view(2, 2), batch.delta)
    assert torch.allclose(losses, expected) and stats == expected_stats
    assert not torch.allclose(losses, default)  # the non-default settings matter for this batch


def test_each_epoch_reshuffles_the_pairs(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, max_steps=1, epochs=3, pairs_per_step=8, minibatch_pairs=1))
    algorithm, order = trainer.algorithm, []

    def recording_loss(batch, outputs, cfg):
        order.append(batch.old_logp[0].item())
        return algorithm.loss(batch, outputs, cfg)

    trainer.algorithm = dataclasses.replace(algorithm, loss=recording_loss)
    trainer.train()
    epochs = [order[i * 8:(i + 1) * 8] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every pair once per epoch
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


@pytest.mark.parametrize("chat", [False, True])
def test_tokenizers_that_add_bos_with_pad_equal_to_eos(assets, bos_tokenizer_model, tmp_path, chat):
    """Llama-style: BOS added by the tokenizer or written by the chat template, never both."""
    from conftest import prompt_rows, write_jsonl

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"]} for r in prompt_rows(8)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    trainer = build_trainer(train_config(assets, tmp_path, model_name_or_path=str(bos_tokenizer_model),
                                         dataset=str(data)))
    tokenizer = trainer.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.bos_token_id is not None
    assert all(ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
               for ids in trainer.prompts.token_ids)
    assert len(trainer.train()) == 2
    rollout, _, _ = trainer.collect_rollout(2)
    real = rollout.query_ids[rollout.query_mask.bool()]
    assert int((real == tokenizer.bos_token_id).sum()) == rollout.query_ids.shape[0]  # one BOS each


def test_a_monitor_reward_is_logged_and_never_trained_on(assets, tmp_path):
    plain = build_trainer(train_config(assets, tmp_path))
    plain.train()
    monitored = build_trainer(train_config(assets, tmp_path, monitor_reward_fn=f"{assets['rewards']}:shifted_fruit"))
    history = monitored.train()
    assert history[0]["monitor_reward"] > 1e10  # the shifted reward really was scored
    assert_bit_identical(plain.unwrapped_policy.state_dict(), monitored.unwrapped_policy.state_dict())


@pytest.mark.parametrize("fused", [False, True], ids=["separate-old-pass", "fused-old-pass"])
def test_entropy_of_the_sampled_responses_is_logged(assets, tmp_path, fused):
    """entropy = mean over response tokens of -log pi_old(y_t): the rollout's own log-probs, with the
    old pass separate (K = 2) or fused into the one update (K = 1, one minibatch)."""
    overrides = dict(epochs=1, minibatch_pairs=8) if fused else dict(epochs=2, minibatch_pairs=4)
    trainer = build_trainer(train_config(assets, tmp_path, max_steps=1, **overrides))
    assert trainer.fuse_old_pass is fused
    rollout, _, timings = trainer.collect_rollout(0)
    stats = trainer.update(rollout, 0)
    metrics = trainer.step_metrics(rollout, stats, timings, 1.0)
    seq = rollout
    expected = -(seq.old_token_logp * seq.response_mask).sum() / seq.response_mask.sum()
    assert metrics["entropy"] == pytest.approx(expected.item(), rel=1e-12) and metrics["entropy"] > 0


def test_missing_eos_penalty_lowers_exactly_the_rewards_of_cut_off_responses(assets, tmp_path):
    """TRL's --missing_eos_penalty: the same rollout (same seed), each response without an EOS token
    scored P lower, the others as they were; truncated_fraction counts them."""
    rollouts = [build_trainer(train_config(assets, tmp_path / str(p), missing_eos_penalty=p, max_new_tokens=3))
                .collect_rollout(0)[0] for p in (0.0, 2.5)]
    plain, penalised = rollouts
    assert torch.equal(plain.response_ids, penalised.response_ids)
    eos = build_trainer(train_config(assets, tmp_path / "e")).eos_ids
    ended = torch.tensor([any(t in eos for t in ids[mask.bool()].tolist())
                          for ids, mask in zip(plain.response_ids, plain.response_mask)])
    assert 0 < ended.sum() < len(ended)  # both kinds in the rollout
    assert torch.equal(plain.raw_rewards - penalised.raw_rewards, 2.5 * (~ended).double())
    assert plain.stats["truncated_fraction"] == pytest.approx((~ended).float().mean().item())
