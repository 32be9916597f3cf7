"""The authors' choices as options (docs/p3o.md section 8): --delta_kl current, --reward_normalization
running_std, --update_schedule consecutive."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import train_config
from test_engine import assert_bit_identical, trained_with_and_without_shift

from p3o.errors import UsageError
from p3o.rl.algorithms import pairwise_loss
from p3o.rl.losses.p3o import p3o_v2_loss
from p3o.rl.reward_scaling import RunningRewardScale
from p3o.rl.train import build_trainer


def deltas_seen(assets, tmp_path, **kw) -> list[dict]:
    """Per optimiser step of one rollout (2 epochs x 2 minibatches): the Delta the loss used, the
    rollout's Delta, and the Delta recomputed by hand from the live log-probs of the same forward."""
    trainer = build_trainer(train_config(assets, tmp_path, max_steps=1, epochs=2, pairs_per_step=8,
                                         minibatch_pairs=4, **kw))
    seen, beta = [], trainer.cfg.beta

    def spy(logp, old_logp, delta, **kwargs):
        batch = current["batch"]
        live_kl = logp.detach() - batch.ref_logp.view(-1, 2)  # (P, 2) l_theta - l_ref, the authors' KL
        r = batch.rewards.view(-1, 2)
        by_hand = (r[:, 0] - r[:, 1]).float() - beta * (live_kl[:, 0] - live_kl[:, 1])
        seen.append({"used": delta.clone(), "rollout": batch.delta.clone(), "by_hand": by_hand})
        return p3o_v2_loss(logp, old_logp, delta, **kwargs)

    inner, current = pairwise_loss(spy), {}

    def loss(batch, out, cfg):
        current["batch"] = batch
        return inner(batch, out, cfg)

    trainer.algorithm = dataclasses.replace(trainer.algorithm, loss=loss)
    trainer.train()
    return seen


def test_current_kl_delta_equals_the_rollouts_at_the_first_minibatch_and_moves_after(assets, tmp_path):
    seen = deltas_seen(assets, tmp_path, delta_kl="current")
    assert len(seen) == 4
    assert torch.equal(seen[0]["used"], seen[0]["rollout"])  # rho = 1: nothing has moved yet
    for step in seen[1:]:  # the policy has taken a step: the live KL differs from the rollout's
        assert not torch.allclose(step["used"], step["rollout"], atol=1e-6)
    for step in seen:  # and it is the authors' formula with l_theta - l_ref, up to float rounding
        assert torch.allclose(step["used"], step["by_hand"], atol=1e-5)


def test_rollout_kl_delta_stays_fixed_over_the_epochs(assets, tmp_path):
    seen = deltas_seen(assets, tmp_path)
    assert all(torch.equal(step["used"], step["rollout"]) for step in seen)


def test_a_per_prompt_shift_changes_nothing_under_current_kl(assets, tmp_path):
    assert_bit_identical(*trained_with_and_without_shift(assets, tmp_path, delta_kl="current", epochs=2,
                                                         minibatch_pairs=4))


def test_current_kl_is_refused_where_it_means_nothing(assets, tmp_path):
    with pytest.raises(UsageError, match="has none"):
        train_config(assets, tmp_path, algo="rloo", delta_kl="current")
    with pytest.raises(UsageError, match="drop one of them"):
        train_config(assets, tmp_path, delta_kl="current", delta_normalization="rms")


def test_running_std_clips_then_divides_by_the_std_of_everything_seen():
    scale, seen = RunningRewardScale(clip=10.0), []
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        raw = torch.randn(16, generator=g, dtype=torch.float64) * 8
        out = scale(raw)
        seen.append(raw.clamp(-10, 10))
        expected = torch.cat(seen).std()  # unbiased, over every clipped reward so far
        assert scale.std == pytest.approx(expected.item(), rel=1e-12)
        assert torch.allclose(out, raw.clamp(-10, 10) / expected)
    restored = RunningRewardScale(10.0)
    restored.load_state_dict(scale.state_dict())
    assert restored.std == scale.std


def test_running_std_trains_on_scaled_rewards_and_logs_raw_ones(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, reward_normalization="running_std", reward_clip=0.5))
    rollout, texts, _ = trainer.collect_rollout(0)
    raw = rollout.raw_rewards
    assert texts.rewards == raw.tolist()  # what is logged is as scored
    assert torch.allclose(rollout.rewards, raw.clamp(-0.5, 0.5) / raw.clamp(-0.5, 0.5).std())
    r = rollout.rewards.view(-1, 2)
    assert torch.allclose(rollout.delta, (r[:, 0] - r[:, 1]).float())  # kl is 0 at the start
    metrics = trainer.step_metrics(rollout, {}, {}, 1.0)
    assert metrics["reward"] == pytest.approx(raw.mean().item()) and metrics["reward_scale"] > 0


def test_running_std_resumes_where_it_stopped(assets, tmp_path):
    """The running moments are part of a checkpoint: a resumed run is the same run."""
    from p3o.rl.checkpoint import save_checkpoint

    kw = dict(reward_normalization="running_std", max_steps=2, epochs=1)
    whole = build_trainer(train_config(assets, tmp_path / "a", **kw))
    whole.train()
    half = build_trainer(train_config(assets, tmp_path / "b", **{**kw, "max_steps": 1}))
    half.train()
    (tmp_path / "b").mkdir(exist_ok=True)
    path = save_checkpoint(half, tmp_path / "b", None)
    resumed = build_trainer(train_config(assets, tmp_path / "c", **kw), checkpoint=path)
    assert resumed.reward_scale.state_dict() == half.reward_scale.state_dict() != whole.reward_scale.state_dict()
    resumed.train()
    assert resumed.reward_scale.state_dict() == whole.reward_scale.state_dict()


def test_consecutive_schedule_takes_k_steps_on_each_minibatch_in_turn(assets, tmp_path):
    trainer = build_trainer(train_config(assets, tmp_path, max_steps=1, epochs=3, pairs_per_step=8, minibatch_pairs=4,
                                         update_schedule="consecutive"))
    algorithm, firsts = trainer.algorithm, []

    def loss(batch, out, cfg):
        firsts.append(batch.query_ids[0].tolist())
        return algorithm.loss(batch, out, cfg)

    trainer.algorithm = dataclasses.replace(algorithm, loss=loss)
    trainer.train()
    assert trainer.state.optimizer_steps == 6
    assert firsts[0] == firsts[1] == firsts[2] and firsts[3] == firsts[4] == firsts[5]
    assert firsts[0] != firsts[3]
