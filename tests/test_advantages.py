"""The baselines' pure parts (docs/p3o.md section 5): advantage estimators, PPO, GRPO and DPO losses."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p3o.rl import advantages as adv
from p3o.rl.kl_control import KLController
from p3o.rl.losses.dpo import dpo_loss
from p3o.rl.losses.policy_gradient import clipped_value_loss, ppo_loss, sequence_clip_loss, token_clip_loss


def naive_gae(rewards, values, lengths, gamma, lam):
    """The loop in `gae`'s docstring, one sequence and one token at a time, in plain Python floats."""
    out = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        a = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            a = rewards[b, t].item() + gamma * next_v - values[b, t].item() + gamma * lam * a
            out[b, t] = a
    return out


def mask_of(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5), gamma=st.floats(0.5, 1.0),
       lam=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_vectorised_gae_equals_the_naive_loop(lengths, gamma, lam, seed):
    T = max(max(lengths), 1)
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64), torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    mask = mask_of(lengths, T)
    rewards = rewards * mask  # per-token rewards are zero on padding, as `token_rewards` makes them
    advantages, returns = adv.gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(advantages, expected, atol=1e-10)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-10)
    assert not advantages[mask == 0].any() and not returns[mask == 0].any()


def test_gae_with_lambda_one_and_zero_values_is_the_return_to_go():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 5.0]])
    advantages, _ = adv.gae(rewards, torch.zeros(1, 4), torch.ones(1, 4), gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[5.2, 5.1, 5.3, 5.0]]))


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = adv.token_rewards(torch.tensor([10.0, 20.0], dtype=torch.float64), old, ref, mask, beta=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.25, 0.5, 10.0], [19.5, 0.0, 0.0]]))


def test_whitening_is_over_the_masked_entries_only():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    white = adv.whiten(values, mask)
    picked = white[mask.bool()]
    assert torch.allclose(picked.mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(picked.pow(2).mean(), torch.tensor(1.0), atol=1e-5)
    assert not white[~mask.bool()].any()


def test_leave_one_out_matches_its_definition():
    rewards = torch.tensor([[1.0, 4.0, -2.0, 0.5]], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.2, 0.0, 0.4]])
    got = adv.leave_one_out(rewards, kl, beta=0.5)
    scores = rewards.float() - 0.5 * kl
    expected = torch.stack([scores[0, i] - torch.cat([scores[0, :i], scores[0, i + 1:]]).mean() for i in range(4)])
    assert torch.allclose(got[0], expected, atol=1e-6)


def test_rloo_with_two_samples_is_plus_minus_delta():
    rewards = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    kl = torch.tensor([[0.4, 0.0]])
    delta = (3.0 - 1.0) - 0.1 * (0.4 - 0.0)
    assert torch.allclose(adv.leave_one_out(rewards, kl, 0.1), torch.tensor([[delta, -delta]]))


def test_group_normalised_advantages_and_the_sign_only_case():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 9.0]], dtype=torch.float64)
    got = adv.group_normalised(rewards, torch.zeros(1, 4), beta=0.0, eps=0.0)
    r = rewards.float()
    assert torch.allclose(got, (r - r.mean()) / r.std(), atol=1e-6)
    assert torch.allclose(adv.group_normalised(rewards, torch.zeros(1, 4), 0.0, scale=False), r - r.mean())
    # k = 2: only the sign of r1 - r2 is left, whatever the gap
    for gap in (0.5, 1.0, 1e3):
        pair = adv.group_normalised(torch.tensor([[gap, 0.0]], dtype=torch.float64), torch.zeros(1, 2), 0.0)
        assert torch.allclose(pair, torch.tensor([[1.0, -1.0]]) / math.sqrt(2), atol=1e-3)


def test_grpo_scales_the_reward_only_so_ties_leave_just_the_kl_penalty():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 9.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    kl = torch.tensor([[0.3, 0.1, 0.0, 0.2], [0.10, 0.12, 0.08, 0.11]])
    got = adv.group_normalised(rewards, kl, beta=0.5)
    r = rewards[0].float()
    assert torch.allclose(got[0], (r - r.mean()) / (r.std() + 1e-4) - 0.5 * (kl[0] - kl[0].mean()), atol=1e-6)
    # a tied group: no reward advantage, and the KL differences stay as small as they are
    assert torch.allclose(got[1], -0.5 * (kl[1] - kl[1].mean()), atol=1e-7)


def test_greedy_baseline_subtracts_the_greedy_score():
    got = adv.greedy_baseline(torch.tensor([[2.0], [0.0]], dtype=torch.float64), torch.tensor([[0.5], [0.0]]),
                              torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([0.1, 0.2]), beta=0.5)
    assert torch.allclose(got, torch.tensor([[(2 - 1) - 0.5 * 0.4], [(0 - 3) - 0.5 * -0.2]]))


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "remax"])
def test_group_estimators_ignore_a_huge_per_prompt_shift_bit_for_bit(estimator):
    g = torch.Generator().manual_seed(0)
    # Quarters stay exact in float64 after a shift of 1e12; k = 3 makes any mean taken before the
    # differences (a division by 3 at the shifted scale) round differently.
    rewards = torch.randint(-20, 21, (6, 3), generator=g).double() / 4
    shift = torch.tensor([1e12, -3e11, 0.0, 7e12, 2.5, -1e9], dtype=torch.float64)[:, None]
    kl, base = torch.rand(6, 3, generator=g), torch.randint(-5, 6, (6,), generator=g).double()

    def run(r, b):
        if estimator == "rloo":
            return adv.leave_one_out(r, kl, 0.1)
        if estimator == "grpo":
            return adv.group_normalised(r, kl, 0.1)
        return adv.greedy_baseline(r, kl, b, kl[:, 0], 0.1)

    assert torch.equal(run(rewards, base), run(rewards + shift, base + shift[:, 0]))


def test_sequence_clip_gradient_is_minus_advantage_times_score_at_rho_one():
    logp = torch.tensor([-3.0, -2.0], requires_grad=True)
    losses, stats = sequence_clip_loss(logp, logp.detach(), torch.tensor([1.5, -0.5]))
    losses.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-1.5, 0.5])) and stats["clipfrac"] == 0.0


def test_token_clip_stops_the_gradient_past_the_clip_in_the_favoured_direction():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.5, -0.5, 0.1]], requires_grad=True)  # rho = 1.65, 0.61, 1.11
    losses, stats = token_clip_loss(logp, old, torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3), clip_eps=0.2)
    losses.sum().backward()
    # token 0 moved past 1 + eps in the favoured direction: zero gradient; token 1 moved against: kept
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0
    assert stats["clipfrac"] == pytest.approx(1 / 3)


def test_padding_carries_no_token_loss():
    losses, _ = token_clip_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]))
    assert not losses[:, 2:].any() and not losses[1, 1:].any()


def test_value_loss_is_clipped_around_the_old_value():
    returns, old = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[0.5, -0.5]], requires_grad=True)
    losses, stats = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: clipped value 0.2 is further from the return (0.32 > 0.125): the max picks the constant branch
    assert torch.allclose(losses, torch.tensor([[0.5 * 0.8 ** 2, 0.5 * 1.5 ** 2]]))
    losses.sum().backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] == pytest.approx(-1.5)
    assert stats["value_clipfrac"] == 0.5


def test_ppo_loss_adds_the_weighted_value_loss():
    logp, adv_, mask = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    values, old_values, returns = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    total, stats = ppo_loss(logp, logp, adv_, mask, values, old_values, returns, vf_coef=0.1, value_clip=10.0)
    policy, _ = token_clip_loss(logp, logp, adv_, mask)
    value, _ = clipped_value_loss(values, old_values, returns, mask, 10.0)
    assert torch.allclose(total, policy + 0.1 * value) and {"value_loss", "policy_loss", "clipfrac"} <= stats.keys()


def test_dpo_loss_is_log_two_when_the_policy_is_the_reference():
    ref = torch.randn(5, 2)
    losses, stats = dpo_loss(ref.clone(), ref, beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert stats["reward_margin"] == 0.0


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    logp = torch.zeros(1, 2, requires_grad=True)
    losses, _ = dpo_loss(logp, torch.zeros(1, 2), beta=0.5)
    losses.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, 0.25]]))  # -beta * sigmoid(0) = -0.25
    tie, _ = dpo_loss(logp, torch.zeros(1, 2), torch.zeros(1), beta=0.5)
    assert tie.item() == 0.0


def test_token_rewards_accept_a_float_mask():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards = adv.token_rewards(torch.tensor([2.0]), torch.zeros(1, 3), torch.zeros(1, 3), mask, beta=0.1)
    assert torch.equal(rewards, torch.tensor([[0.0, 2.0, 0.0]]))


def test_adaptive_kl_controller():
    fixed = KLController(0.1)
    fixed.update(kl=50.0, responses=64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=10000)
    adaptive.update(kl=12.0, responses=100)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.update(kl=5.4, responses=100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.01))


def test_estimators_are_registered_by_name_like_losses():
    from p3o.errors import UsageError
    from p3o.rl.advantages import ESTIMATORS, get_estimator, leave_one_out, register_estimator

    assert {"rloo", "grpo", "remax"} <= ESTIMATORS.keys()
    rewards = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.0, 0.2]])
    assert torch.equal(get_estimator("rloo")(rewards, kl, 0.5, {}, None), leave_one_out(rewards, kl, 0.5))
    with pytest.raises(UsageError, match="unknown advantage estimator 'nope'; known: grpo, remax, rloo"):
        get_estimator("nope")
    with pytest.raises(ValueError, match="'rloo' is registered twice"):
        register_estimator("rloo")(lambda *a: None)
