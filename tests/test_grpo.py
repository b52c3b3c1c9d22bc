"""GRPO advantages and the PPO-clip loss (method.md §1.7-1.8)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_mini.grpo import group_advantages, group_ids, ppo_clip_loss
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.refine import RefineConfig, refine_loss
from refine_mini.rollout import Rollouts, rollouts_forked
from refine_mini.selection import Selection

TINY = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=64, chunk_size=8, lact_chunk=8, window=8, n_heads_fast=2)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(2, 9), min_size=1, max_size=5), seed=st.integers(0, 10_000))
def test_advantages_have_zero_mean_and_unit_unbiased_std_in_each_group(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    rewards = torch.rand(len(groups), generator=g, dtype=torch.float64)
    advantages, flat = group_advantages(rewards, groups)
    assert not flat.any()
    for i in range(len(sizes)):
        a = advantages[groups == i]
        r = rewards[groups == i]
        assert abs(float(a.mean())) < 1e-9
        std = float(r.std())  # unbiased, as torch.std
        assert abs(float(a.std()) - std / (std + 1e-6)) < 1e-9


def test_fp32_rewards_a_few_ulps_apart_get_the_formulas_advantages():
    """fp32 rewards that differ by ulps (cosines of nearly equal states): the statistics run in fp64, so each
    group's advantages sum to 0 and equal the fp64 formula (the fp32 mean rounded: A = [0, 0.1065] for the first)."""
    pair = torch.tensor([1.0, 1.0000001])  # fp32: 1 and 1 + 2^-23
    d = (float(pair[1]) - 1.0) / 2  # each reward's distance from the mean; the unbiased std is sqrt(2)·d
    a = d / (2 ** 0.5 * d + 1e-6)  # 0.0550
    assert group_advantages(pair, torch.tensor([0, 0]))[0].tolist() == pytest.approx([-a, a], rel=1e-6)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(500, 1, generator=g) + 0.5
    rewards = (base + torch.randint(-3, 4, (500, 8), generator=g) * 6e-8).float().flatten()  # (4000,) fp32
    groups = torch.arange(500).repeat_interleave(8)
    advantages, flat = group_advantages(rewards, groups)
    exact, _ = group_advantages(rewards.double(), groups)
    assert advantages.dtype == torch.float32
    assert (advantages.double() - exact).abs().max() < 1e-6
    sums = torch.zeros(500).index_add_(0, groups, advantages).abs()
    assert sums[~flat].max() < 1e-6  # fp32 statistics: up to 0.9


def test_equal_reward_and_singleton_groups_get_exactly_zero_and_no_gradient():
    """A group with identical rewards (or one row) has no baseline signal: advantage exactly 0, no NaN, and its
    rows contribute nothing to the policy gradient."""
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.9, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    advantages, flat = group_advantages(rewards, groups)
    assert flat.tolist() == [True, False, True]
    assert advantages[[0, 1, 2, 5]].tolist() == [0.0] * 4 and torch.isfinite(advantages).all()
    logp = torch.randn(6, 4, requires_grad=True)
    loss, _ = ppo_clip_loss(logp, logp.detach() + 0.1, advantages)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[[0, 1, 2, 5]].abs().max() == 0 and logp.grad[[3, 4]].abs().min() > 0


def test_group_ids_are_documents_for_n1_and_prefixes_for_n_gt_1():
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    base = dict(tokens=torch.zeros(8, 2, dtype=torch.long), old_logp=torch.zeros(8, 2), h_pred=torch.zeros(8, 2, 1),
                doc=doc, pos=torch.zeros(8, dtype=torch.long))
    assert group_ids(Rollouts(n=1, **base)).tolist() == doc.tolist()
    assert group_ids(Rollouts(n=2, **base)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_clipped_surrogate_and_dual_clip_values():
    """ℓ = max(-Aρ, -A clip(ρ, 0.8, 1.2)), capped at -3A for A < 0; token-mean."""
    ratios = torch.tensor([[1.5], [0.5], [5.0], [0.5], [1.1]])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, -2.0])
    loss, stats = ppo_clip_loss(ratios.log(), torch.zeros(5, 1), advantages)
    per_token = [-1.2, -0.5, 3.0, 0.8, 2.2]  # clip binds, no clip (A>0, ρ<1-ε), dual cap, clip binds, plain
    assert abs(float(loss) - sum(per_token) / 5) < 1e-6
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # rows 0 and 3 (row 2: -Aρ already exceeds the clip term)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 5)
    huge, _ = ppo_clip_loss(torch.full((1, 1), 100.0), torch.zeros(1, 1), torch.tensor([1.0]))
    assert torch.isfinite(huge)  # log-ratio clamped at 20 before exp


def test_on_policy_gradient_is_reinforce():
    """At ρ = 1 the clip is inactive and dℓ/dlogp = -A / (N·k): plain REINFORCE with a group baseline."""
    logp = torch.randn(3, 4, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    loss, stats = ppo_clip_loss(logp, logp.detach(), advantages)
    loss.backward()
    assert stats["ratio_max_dev"] == 0.0 and stats["clip_frac"] == 0.0
    torch.testing.assert_close(logp.grad, (-advantages[:, None] / 12).expand(3, 4))


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_ratio_is_one_on_policy_with_the_real_model(mixer):
    """The with-grad log-probs from the attached snapshots equal the rollout's old log-probs (ratio = 1 to 1e-6)."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY))
    docs = [torch.randint(0, 64, (36,)), torch.randint(0, 64, (30,))]
    selection = Selection(torch.tensor([[4, 12, 20, 28], [2, 9, 15, 24]]), torch.zeros(2, 4))
    ro = rollouts_forked(model, docs, selection.positions, 4, 2, torch.Generator().manual_seed(0))
    advantages = torch.randn(16)
    _, stats = refine_loss(model, docs, selection, ro, advantages, RefineConfig(c=4, k=4, n=2))
    assert stats["ratio_max_dev"] < 1e-6 and stats["clip_frac"] == 0.0


def test_a_huge_log_ratio_is_clamped_so_the_gradient_stays_finite():
    """method.md §1.8: ratio = exp(clamp(logp - old_logp, -20, 20)). A log-ratio of 100 must neither overflow the
    ratio (exp(100) = inf in fp32) nor give a NaN gradient; the clip (A > 0) and the dual-clip cap -3A (A < 0) bound
    the token loss, and neither branch carries a gradient."""
    for adv, expected in ((1.0, -1.2), (-1.0, 3.0)):
        logp = torch.full((1, 1), 100.0, requires_grad=True)
        loss, stats = ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([adv]))
        loss.backward()
        assert float(loss.detach()) == pytest.approx(expected) and stats["ratio_mean"] < float("inf")
        assert torch.isfinite(logp.grad).all() and float(logp.grad.abs().max()) == 0.0
