"""Tests of the P3O losses against the properties docs/p3o.md section 4 requires.

Notation follows docs/p3o.md: logp/old_logp are (P, 2) sequence log-probabilities l(y_i), l_old(y_i),
delta is the pair's relative advantage Delta (P,), rho_i = exp(l(y_i) - l_old(y_i)),
w(z) = clamp(z, 1/C, C). Everything numeric runs in float64 unless a test says otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p3o.errors import UsageError
from p3o.rl.losses import aggregate
from p3o.rl.losses.p3o import importance_weight, p3o_v1_loss, p3o_v2_loss

F64 = torch.float64
VARIANTS = [pytest.param(p3o_v1_loss, id="v1"), pytest.param(p3o_v2_loss, id="v2")]
EPS = 0.2
C = 10.0


# ----------------------------------------------------------------------------------------------
# helpers


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def loss_and_grad(loss_fn, logp, old_logp, delta, **kw):
    """Per-pair losses, d(sum of losses)/d logp, and stats; logp is copied into a fresh leaf."""
    logp = logp.detach().clone().requires_grad_(True)
    losses, stats = loss_fn(logp, old_logp, delta, **kw)
    (grad,) = torch.autograd.grad(losses.sum(), logp)
    return losses.detach(), grad, stats


def swap(logp, old_logp, delta):
    """The same pairs with y1 and y2 exchanged: Delta changes sign."""
    return logp.flip(-1), old_logp.flip(-1), -delta


class TinyPolicy:
    """A softmax policy with one free logit vector per (pair, response, position): theta (P, 2, T, V).

    l(y) = sum_t mask_t * log softmax(theta_t)[y_t], whose gradient in theta_t is known in closed form:
    mask_t * (onehot(y_t) - softmax(theta_t)).
    """

    def __init__(self, pairs: int = 4, length: int = 5, vocab: int = 7, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(pairs, 2, length, vocab, generator=gen, dtype=F64).requires_grad_(True)
        self.tokens = torch.randint(0, vocab, (pairs, 2, length), generator=gen)
        # Response lengths: full, shorter ones, and (pair 0, response 2) a single EOS token.
        lengths = torch.randint(2, length + 1, (pairs, 2), generator=gen)
        lengths[0, 1] = 1
        lengths[-1, 0] = length
        self.mask = (torch.arange(length) < lengths[..., None]).to(F64)  # (P, 2, T)
        eos = vocab - 1
        self.tokens[0, 1, 0] = eos
        self.tokens[self.mask == 0] = 0  # padding id: must never matter
        self.vocab = vocab

    def logp(self) -> torch.Tensor:
        """l(y) for every response, (P, 2), differentiable in theta."""
        logprobs = torch.log_softmax(self.theta, -1).gather(-1, self.tokens[..., None]).squeeze(-1)
        return (logprobs * self.mask).sum(-1)

    def closed_form_grad_l(self) -> torch.Tensor:
        """d l(y_i) / d theta for each response, (P, 2, T, V), without autograd."""
        theta = self.theta.detach()
        onehot = torch.nn.functional.one_hot(self.tokens, self.vocab).to(F64)
        return (onehot - torch.softmax(theta, -1)) * self.mask[..., None]


def pairwise_policy_gradient_loss_grad(policy: TinyPolicy, delta: torch.Tensor) -> torch.Tensor:
    """Closed-form negative PPG averaged over pairs: -(Delta/2) * grad(l(y1) - l(y2)) / P."""
    grad_l = policy.closed_form_grad_l()
    sign = t([1.0, -1.0])[None, :, None, None]  # + for y1, - for y2
    pairs = delta.shape[0]
    return -(delta[:, None, None, None] / 2) * sign * grad_l / pairs


# ----------------------------------------------------------------------------------------------
# 1. gradient at rho = 1 equals the negative pairwise policy gradient (real parameterisation)


@pytest.mark.parametrize("loss_fn", VARIANTS)
def test_gradient_at_rho_one_equals_negative_pairwise_policy_gradient(loss_fn):
    policy = TinyPolicy(pairs=4, length=5, vocab=7, seed=1)
    delta = t([1.5, -0.7, 2.0, -3.0])
    logp = policy.logp()
    old_logp = logp.detach().clone()  # rho = 1 exactly, but logp still carries gradient

    losses, _ = loss_fn(logp, old_logp, delta, clip_eps=EPS, is_clamp=C)
    loss = aggregate(losses, delta.shape[0])
    (grad,) = torch.autograd.grad(loss, policy.theta)

    expected = pairwise_policy_gradient_loss_grad(policy, delta)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    # Padding positions (and everything after the single EOS token) get exactly no gradient.
    assert torch.all(grad[policy.mask == 0] == 0.0)
    # The one-token EOS response does receive its gradient.
    assert grad[0, 1, 0].abs().sum() > 0


def test_single_eos_response_log_probability_is_one_token():
    policy = TinyPolicy(pairs=4, length=5, vocab=7, seed=1)
    expected = torch.log_softmax(policy.theta.detach()[0, 1, 0], -1)[policy.vocab - 1]
    assert policy.mask[0, 1].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(policy.logp()[0, 1].detach(), expected, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# 2. swap symmetry


SWAP_CASES = {
    "rho_one": ([[-3.0, -4.0], [-1.0, -2.5]], [[-3.0, -4.0], [-1.0, -2.5]], [0.8, -1.3]),
    "inside_clip": ([[-3.1, -3.9], [-1.05, -2.4]], [[-3.0, -4.0], [-1.0, -2.5]], [0.8, -1.3]),
    "clipped_and_weighted": ([[-1.0, -7.0], [-4.0, -0.5]], [[-3.0, -4.0], [-1.0, -2.5]], [2.0, -0.4]),
}


@pytest.mark.parametrize("loss_fn", VARIANTS)
@pytest.mark.parametrize("case", SWAP_CASES, ids=list(SWAP_CASES))
def test_swapping_responses_leaves_losses_unchanged_and_swaps_gradients(loss_fn, case):
    logp, old_logp, delta = (t(v) for v in SWAP_CASES[case])
    losses, grad, stats = loss_and_grad(loss_fn, logp, old_logp, delta)
    losses_s, grad_s, stats_s = loss_and_grad(loss_fn, *swap(logp, old_logp, delta))

    torch.testing.assert_close(losses_s, losses, rtol=1e-13, atol=1e-15)
    # The gradient w.r.t. y1 after the swap is the gradient w.r.t. y2 before it, and vice versa.
    torch.testing.assert_close(grad_s, grad.flip(-1), rtol=1e-13, atol=1e-15)
    assert stats_s["clipfrac"] == stats["clipfrac"]


# ----------------------------------------------------------------------------------------------
# 3. clipping: zero gradient past eps in the favoured direction, full gradient the other way


OLD = t([[-5.0, -6.0]])
MOVE = 0.5  # log-ratio move: rho = e^0.5 ~ 1.65 > 1 + eps, e^-0.5 ~ 0.61 < 1 - eps


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["delta_pos", "delta_neg"])
@pytest.mark.parametrize("response", [0, 1], ids=["y1", "y2"])
def test_v1_term_gradient_is_exactly_zero_once_moved_past_eps_in_favoured_direction(sign, response):
    delta = t([2.0 * sign])
    # Delta > 0 favours raising rho1 and lowering rho2; Delta < 0 the opposite.
    favoured = sign * (1.0 if response == 0 else -1.0)
    shift = torch.zeros(1, 2, dtype=F64)

    shift[0, response] = favoured * MOVE
    _, grad, stats = loss_and_grad(p3o_v1_loss, OLD + shift, OLD, delta, clip_eps=EPS, is_clamp=C)
    assert grad[0, response].item() == 0.0
    assert stats["clipfrac"] == 0.5  # one of the two terms of the single pair

    shift[0, response] = -favoured * MOVE
    _, grad, stats = loss_and_grad(p3o_v1_loss, OLD + shift, OLD, delta, clip_eps=EPS, is_clamp=C)
    # Unclipped: d/dlogp_i of 1/2 * (-/+ Delta * w(rho_other) * rho_i) with w(rho_other) = 1.
    rho = math.exp(-favoured * MOVE)
    term_sign = -1.0 if response == 0 else 1.0
    expected = 0.5 * term_sign * delta.item() * rho
    assert grad[0, response].item() != 0.0
    assert grad[0, response].item() == pytest.approx(expected, rel=1e-12)
    assert stats["clipfrac"] == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["delta_pos", "delta_neg"])
def test_v2_gradient_is_exactly_zero_once_relative_log_ratio_moved_past_eps_in_favoured_direction(sign):
    delta = t([2.0 * sign])
    # Delta > 0 favours raising d = l(y1) - l(y2); move d by +/-MOVE via y1, keeping rho1*rho2 = e^(+/-MOVE).
    favoured = sign
    _, grad, stats = loss_and_grad(p3o_v2_loss, OLD + t([[favoured * MOVE, 0.0]]), OLD, delta,
                                   clip_eps=EPS, is_clamp=C)
    assert torch.all(grad == 0.0)
    assert stats["clipfrac"] == 1.0

    _, grad, stats = loss_and_grad(p3o_v2_loss, OLD + t([[-favoured * MOVE, 0.0]]), OLD, delta,
                                   clip_eps=EPS, is_clamp=C)
    w12 = math.exp(-favoured * MOVE)  # within [1/C, C]
    expected = [-0.5 * delta.item() * w12, 0.5 * delta.item() * w12]
    assert torch.all(grad != 0.0)
    torch.testing.assert_close(grad[0], t(expected), rtol=1e-12, atol=0)
    assert stats["clipfrac"] == 0.0


def test_v1_clipfrac_counts_clipped_terms_over_all_responses():
    old = t([[-5.0, -6.0], [-2.0, -3.0], [-1.0, -1.5]])
    delta = t([1.0, 1.0, -1.0])
    logp = old + t([
        [MOVE, -MOVE],  # Delta > 0: y1 up and y2 down, both clipped
        [-MOVE, 0.0],   # y1 moved against Delta: not clipped; y2 untouched
        [MOVE, 0.05],   # Delta < 0: y1 up not clipped; y2 up by less than eps not clipped
    ])
    _, grad, stats = loss_and_grad(p3o_v1_loss, logp, old, delta, clip_eps=EPS, is_clamp=C)
    assert stats["clipfrac"] == pytest.approx(2 / 6)
    assert grad[0].tolist() == [0.0, 0.0]
    assert torch.all(grad[1:] != 0.0)


# ----------------------------------------------------------------------------------------------
# 4. importance weights


@pytest.mark.parametrize("log_rho2, weight", [(0.0, 1.0), (math.log(3.0), 3.0), (3.0, C), (-3.0, 1 / C)],
                         ids=["one", "inside", "above_C", "below_1_over_C"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["delta_pos", "delta_neg"])
def test_v1_response1_gradient_is_scaled_by_clamped_partner_ratio(log_rho2, weight, sign):
    old = t([[-4.0, -9.0]])
    logp = old + t([[0.0, log_rho2]])  # rho1 = 1 so term 1 is never clipped
    delta = t([1.7 * sign])
    _, grad, _ = loss_and_grad(p3o_v1_loss, logp, old, delta, clip_eps=EPS, is_clamp=C)
    assert grad[0, 0].item() == pytest.approx(-0.5 * delta.item() * weight, rel=1e-12)


@pytest.mark.parametrize("log_rho1, weight", [(math.log(3.0), 3.0), (3.0, C), (-3.0, 1 / C)],
                         ids=["inside", "above_C", "below_1_over_C"])
def test_v1_response2_gradient_is_scaled_by_clamped_partner_ratio(log_rho1, weight):
    old = t([[-4.0, -9.0]])
    logp = old + t([[log_rho1, 0.0]])
    delta = t([-1.7])
    _, grad, _ = loss_and_grad(p3o_v1_loss, logp, old, delta, clip_eps=EPS, is_clamp=C)
    assert grad[0, 1].item() == pytest.approx(0.5 * delta.item() * weight, rel=1e-12)


def test_v1_importance_weight_carries_no_gradient():
    # rho2 = 2 (inside [1/C, C], outside the clip range, moved against Delta > 0 so unclipped):
    # d/dlogp2 = 1/2 * Delta * w(rho1) * rho2 = Delta. Were w(rho2) differentiable, term 1 would add
    # -1/2 * Delta * rho1 * rho2 = -Delta and the gradient would vanish.
    old = t([[-4.0, -9.0]])
    logp = old + t([[0.0, math.log(2.0)]])
    delta = t([1.3])
    _, grad, _ = loss_and_grad(p3o_v1_loss, logp, old, delta, clip_eps=EPS, is_clamp=C)
    assert grad[0, 1].item() == pytest.approx(delta.item(), rel=1e-12)
    assert not importance_weight(logp.requires_grad_(), C).requires_grad


@pytest.mark.parametrize("log_rho, weight", [((0.1, 0.05), math.exp(0.15)), ((1.5, 1.5), C), ((-1.5, -1.5), 1 / C)],
                         ids=["inside", "above_C", "below_1_over_C"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["delta_pos", "delta_neg"])
def test_v2_gradient_is_scaled_by_clamped_joint_ratio_without_gradient_through_it(log_rho, weight, sign):
    # d - d_old = log_rho1 - log_rho2 is within eps, so nothing is clipped. Were w(rho1*rho2)
    # differentiable, the gradient would gain -1/2 * Delta * w * d in both entries (d = 5 here).
    old = t([[-4.0, -9.0]])
    logp = old + t([list(log_rho)])
    delta = t([1.7 * sign])
    _, grad, stats = loss_and_grad(p3o_v2_loss, logp, old, delta, clip_eps=EPS, is_clamp=C)
    expected = t([[-0.5 * delta.item() * weight, 0.5 * delta.item() * weight]])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert stats["clipfrac"] == 0.0


def test_v2_joint_weight_clamps_the_sum_of_log_ratios_not_each_part():
    """log-ratios (25, -24): rho1*rho2 = e, inside [1/C, C], so w = e. Clamping each part to +-20
    first gave w(e^(20-20)) = 1. Delta < 0 and d above d_old: the unclipped side is active."""
    old = t([[-40.0, -30.0]])
    logp = old + t([[25.0, -24.0]])
    delta = t([-1.0])
    _, grad, _ = loss_and_grad(p3o_v2_loss, logp, old, delta, clip_eps=EPS, is_clamp=C)
    expected = t([[-0.5 * delta.item() * math.e, 0.5 * delta.item() * math.e]])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def test_delta_carries_no_gradient():
    old = t([[-4.0, -9.0], [-1.0, -2.0]])
    logp = (old + t([[0.1, -0.3], [0.5, 0.0]])).requires_grad_()
    for loss_fn in (p3o_v1_loss, p3o_v2_loss):
        delta = t([1.0, -2.0]).requires_grad_()
        losses, _ = loss_fn(logp, old, delta)
        (grad_delta,) = torch.autograd.grad(losses.sum(), delta, allow_unused=True)
        assert grad_delta is None  # Delta is a stop-gradient quantity


# ----------------------------------------------------------------------------------------------
# 5. randomised properties


@st.composite
def pair_batches(draw, max_log_ratio: float = 3.0):
    pairs = draw(st.integers(1, 6))
    finite = dict(allow_nan=False, allow_infinity=False, allow_subnormal=False)  # subnormal Delta underflows
    old = draw(st.lists(st.lists(st.floats(-60.0, 0.0, **finite), min_size=2, max_size=2),
                        min_size=pairs, max_size=pairs))
    log_ratio = draw(st.lists(st.lists(st.floats(-max_log_ratio, max_log_ratio, **finite), min_size=2, max_size=2),
                              min_size=pairs, max_size=pairs))
    delta = draw(st.lists(st.floats(-10.0, 10.0, **finite), min_size=pairs, max_size=pairs))
    old_logp = t(old)
    return old_logp + t(log_ratio), old_logp, t(delta)


RANDOM = settings(max_examples=60, deadline=None)


@RANDOM
@given(batch=pair_batches())
def test_random_batches_give_finite_losses_and_swap_symmetry(batch):
    logp, old_logp, delta = batch
    for loss_fn in (p3o_v1_loss, p3o_v2_loss):
        losses, grad, stats = loss_and_grad(loss_fn, logp, old_logp, delta)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in stats.values())
        assert 0.0 <= stats["clipfrac"] <= 1.0
        losses_s, grad_s, _ = loss_and_grad(loss_fn, *swap(logp, old_logp, delta))
        torch.testing.assert_close(losses_s, losses, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_s, grad.flip(-1), rtol=1e-12, atol=1e-12)


@RANDOM
@given(batch=pair_batches())
def test_random_batches_v1_and_v2_gradients_agree_at_rho_one(batch):
    _, old_logp, delta = batch
    losses1, grad1, _ = loss_and_grad(p3o_v1_loss, old_logp, old_logp, delta)
    losses2, grad2, _ = loss_and_grad(p3o_v2_loss, old_logp, old_logp, delta)
    torch.testing.assert_close(grad1, grad2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad1, torch.stack([-delta / 2, delta / 2], -1), rtol=1e-12, atol=1e-14)
    # The values differ by design (V1 works with ratios, V2 with log-probabilities):
    # V1 = 1/2 * (-Delta + Delta) = 0 and V2 = -Delta/2 * d_old at rho = 1.
    assert torch.all(losses1.abs() <= 1e-12 * delta.abs().clamp(min=1))
    d_old = old_logp[:, 0] - old_logp[:, 1]
    torch.testing.assert_close(losses2, -delta / 2 * d_old, rtol=1e-12, atol=1e-12)


@RANDOM
@given(batch=pair_batches(), scale=st.floats(0.01, 100.0))
def test_random_batches_losses_and_gradients_are_linear_in_delta(batch, scale):
    logp, old_logp, delta = batch
    # Off the clip boundaries: on one, the loss has a kink where max() of two equal terms splits the
    # gradient, and the rounding of scale * Delta decides which side a rescaled batch lands on.
    log_ratio = logp - old_logp  # (P, 2)
    eps = 0.2  # the losses' default clip_eps
    assume(((log_ratio.exp() - 1).abs() - eps).abs().min() > 1e-9)  # V1: each ratio against 1 +- eps
    assume(((log_ratio[:, 0] - log_ratio[:, 1]).abs() - eps).abs().min() > 1e-9)  # V2: d against d_old +- eps
    for loss_fn in (p3o_v1_loss, p3o_v2_loss):
        losses, grad, stats = loss_and_grad(loss_fn, logp, old_logp, delta)
        losses_c, grad_c, stats_c = loss_and_grad(loss_fn, logp, old_logp, scale * delta)
        tol = 1e-12 * scale * (1 + losses.abs().max().item() + grad.abs().max().item())
        torch.testing.assert_close(losses_c, scale * losses, rtol=1e-12, atol=tol)
        torch.testing.assert_close(grad_c, scale * grad, rtol=1e-12, atol=tol)
        assert stats_c["clipfrac"] == stats["clipfrac"]


# ----------------------------------------------------------------------------------------------
# 6. edge cases


@pytest.mark.parametrize("loss_fn", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_zero_delta_gives_exactly_zero_loss_and_gradient_even_for_extreme_ratios(loss_fn, dtype):
    old = t([[-200.0, -150.0], [-10.0, -20.0], [-3.0, -4.0]], dtype)
    logp = old + t([[100.0, -100.0], [-100.0, 100.0], [0.1, -0.1]], dtype)
    losses, grad, _ = loss_and_grad(loss_fn, logp, old, torch.zeros(3, dtype=dtype))
    assert torch.all(losses == 0.0)
    assert torch.all(grad == 0.0)


@pytest.mark.parametrize("loss_fn", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("log_ratio", [50.0, -50.0, 100.0, -100.0, 1000.0, -1000.0])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["delta_pos", "delta_neg"])
def test_extreme_ratios_give_finite_losses_and_gradients(loss_fn, dtype, log_ratio, sign):
    old = t([[-1500.0, -1500.0], [-1500.0, -1500.0], [-1500.0, -1500.0]], dtype)
    # The extreme ratio on y1, on y2, and on both (in opposite directions).
    logp = old + t([[log_ratio, 0.0], [0.0, log_ratio], [log_ratio, -log_ratio]], dtype)
    delta = t([3.0 * sign] * 3, dtype)
    losses, grad, stats = loss_and_grad(loss_fn, logp, old, delta)
    assert torch.isfinite(losses).all()
    assert torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in (stats["clipfrac"], stats["approx_kl"], stats["ratio_max"]))


# ----------------------------------------------------------------------------------------------
# 7. aggregation, registry, purity


@pytest.mark.parametrize("normaliser", [4, 3.5, torch.tensor(17.0, dtype=F64)], ids=["pairs", "float", "tokens"])
def test_aggregate_is_sum_over_normaliser(normaliser):
    losses = t([0.5, -1.25, 2.0, 3.5])
    assert aggregate(losses, normaliser).item() == pytest.approx(4.75 / float(normaliser), rel=1e-15)


def test_aggregate_of_micro_batches_equals_aggregate_of_whole_minibatch():
    losses = t([0.5, -1.25, 2.0, 3.5, 7.0])
    whole = aggregate(losses, 5)
    parts = aggregate(losses[:2], 5) + aggregate(losses[2:], 5)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-15)


def test_every_registered_algorithm_has_the_one_loss_signature():
    """The algorithms are the registry: each loss takes (batch, out, cfg) and nothing else."""
    import inspect

    from p3o.rl.algorithms import ALGORITHMS

    for name, algorithm in ALGORITHMS.items():
        assert algorithm.name == name
        assert list(inspect.signature(algorithm.loss).parameters) in (["batch", "out", "cfg"],), name
        assert list(inspect.signature(algorithm.prepare).parameters) == ["rollout", "cfg", "beta"], name


def test_unknown_algorithm_is_refused_listing_known_ones():
    from p3o.rl.algorithms import ALGORITHMS, get_algorithm

    with pytest.raises(UsageError) as info:
        get_algorithm("p3o-v3")
    message = str(info.value)
    assert "p3o-v3" in message and all(name in message for name in ALGORITHMS)


@pytest.mark.parametrize("loss_fn", VARIANTS)
def test_losses_do_not_modify_their_inputs(loss_fn):
    old_logp = t([[-3.0, -4.0], [-1.0, -2.5], [-8.0, -0.5]])
    logp = (old_logp + t([[0.9, -0.9], [40.0, -40.0], [0.05, 0.1]])).requires_grad_()
    delta = t([1.0, -2.0, 0.0])
    before = [x.detach().clone() for x in (logp, old_logp, delta)]
    losses, _ = loss_fn(logp, old_logp, delta)
    losses.sum().backward()
    for x, x_before in zip((logp, old_logp, delta), before):
        assert torch.equal(x.detach(), x_before)
    assert old_logp.grad is None and delta.grad is None


# ----------------------------------------------------------------------------------------------
# 8. one pass at rho = 1: P3O-V1 equals RLOO with two samples per prompt


def test_v1_gradient_at_rho_one_equals_rloo_with_two_samples():
    policy = TinyPolicy(pairs=5, length=6, vocab=5, seed=3)
    rewards = t([[1.0, 0.0], [0.2, 0.9], [-1.5, 2.5], [3.0, 3.0], [0.4, -0.1]])  # (P, 2)

    # RLOO, k = 2: A_i = r_i - r_j, loss = -mean over the 2 samples of A_i * l(y_i), then mean over prompts.
    logp = policy.logp()
    advantages = torch.stack([rewards[:, 0] - rewards[:, 1], rewards[:, 1] - rewards[:, 0]], -1)
    rloo_loss = -(advantages * logp).mean(-1).mean()
    (rloo_grad,) = torch.autograd.grad(rloo_loss, policy.theta)

    logp = policy.logp()
    delta = rewards[:, 0] - rewards[:, 1]
    losses, stats = p3o_v1_loss(logp, logp.detach().clone(), delta)
    (v1_grad,) = torch.autograd.grad(aggregate(losses, rewards.shape[0]), policy.theta)

    assert stats["clipfrac"] == 0.0
    assert rloo_grad.abs().max() > 0
    torch.testing.assert_close(v1_grad, rloo_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_fn", [p3o_v1_loss])
def test_log_ratios_beyond_twenty_are_clamped_before_exp(loss_fn):
    """A deliberate departure (as in verl): past |log rho| = 20 (rho ~ 5e8) the ratio is held at
    e^20, so even the unclipped side stops growing there instead of overflowing float32."""
    old = torch.tensor([[-30.0, -30.0]], dtype=torch.float64)
    delta = torch.tensor([-1.0], dtype=torch.float64)
    for shift, has_gradient in ((19.0, True), (21.0, False)):
        logp = (old + torch.tensor([[shift, 0.0]], dtype=torch.float64)).requires_grad_()
        losses, _ = loss_fn(logp, old, delta)
        (grad,) = torch.autograd.grad(losses.sum(), logp)
        assert (grad[0, 0] != 0).item() == has_gradient
