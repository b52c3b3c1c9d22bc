"""Rewards (method.md §1.6, §5): cosine of post-norm hidden states, per-token match, their sum."""
import pytest
import torch
import torch.nn.functional as F

from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.rewards import compute_rewards
from refine_mini.rollout import Rollouts, segmented_forward
from refine_mini.selection import teacher_forced_pass

TINY = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=64, chunk_size=8, lact_chunk=8, window=8, n_heads_fast=2)


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_rollout_equal_to_ground_truth_gets_cosine_and_binary_one(mixer):
    """If x̂ = x_{t+1..t+k}, decoding from the forked prefix state reproduces the teacher-forced states: R^φ = 1
    (streaming-exact states, no pad contamination, unlike the official LaCT path, §4) and R^bin = 1, R^hyb = 2."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY))
    doc = torch.randint(0, 64, (37,))
    positions, k = torch.tensor([4, 13, 22, 30]), 5
    entropy, h_gt = teacher_forced_pass(model, doc[None])
    with torch.no_grad():
        _, snaps = segmented_forward(model, doc, positions)
        gt = torch.stack([doc[t + 1:t + 1 + k] for t in positions.tolist()])  # (K, k)
        h_pred = torch.cat([model(gt[j:j + 1], s)[1] for j, s in enumerate(snaps)])  # (K, k, D)
    ro = Rollouts(tokens=gt, old_logp=torch.zeros(4, k), h_pred=h_pred, doc=torch.zeros(4, dtype=torch.long),
                  pos=positions, n=1)
    rewards = compute_rewards(ro, doc[None], h_gt)
    torch.testing.assert_close(rewards["cosine"], torch.ones(4), atol=1e-5, rtol=0)
    assert rewards["binary"].tolist() == [1.0] * 4
    torch.testing.assert_close(rewards["hybrid"], torch.full((4,), 2.0), atol=1e-5, rtol=0)


def test_binary_is_per_token_fraction_and_cosine_is_mean_of_per_position_cosines():
    """R^bin counts matching positions / k (not exact match); R^φ averages k per-position cosines (not pooled)."""
    torch.manual_seed(1)
    tokens = torch.arange(20)[None].repeat(2, 1)  # (B=2, T=20), x_i = i
    h_gt = torch.randn(2, 20, 8)
    ro = Rollouts(tokens=torch.tensor([[6, 7, 0, 9, 0], [0, 0, 0, 0, 0], [3, 4, 5, 6, 7]]),
                  old_logp=torch.zeros(3, 5), h_pred=torch.randn(3, 5, 8),
                  doc=torch.tensor([0, 0, 1]), pos=torch.tensor([5, 5, 2]), n=1)
    rewards = compute_rewards(ro, tokens, h_gt)
    torch.testing.assert_close(rewards["binary"], torch.tensor([0.6, 0.0, 1.0]))
    expected = torch.stack([F.cosine_similarity(ro.h_pred[i], h_gt[d, p + 1:p + 6], dim=-1).mean()
                            for i, (d, p) in enumerate([(0, 5), (0, 5), (1, 2)])])
    torch.testing.assert_close(rewards["cosine"], expected)
    torch.testing.assert_close(rewards["hybrid"], rewards["cosine"] + rewards["binary"])


def test_rewards_carry_no_gradient_and_reject_rollouts_past_the_end():
    h_pred = torch.randn(1, 3, 4, requires_grad=True)
    ro = Rollouts(tokens=torch.zeros(1, 3, dtype=torch.long), old_logp=torch.zeros(1, 3), h_pred=h_pred,
                  doc=torch.tensor([0]), pos=torch.tensor([2]), n=1)
    rewards = compute_rewards(ro, torch.zeros(1, 8, dtype=torch.long), torch.randn(1, 8, 4, requires_grad=True))
    assert not any(r.requires_grad for r in rewards.values())
    ro.pos = torch.tensor([5])  # ground truth would need x_6..x_8, but T = 8
    with pytest.raises(ValueError):
        compute_rewards(ro, torch.zeros(1, 8, dtype=torch.long), torch.randn(1, 8, 4))
    ro.pos = torch.tensor([2])  # x_3..x_5 exist in the padded batch, but this document is only 5 tokens long
    with pytest.raises(ValueError, match="past the end"):
        compute_rewards(ro, torch.zeros(1, 8, dtype=torch.long), torch.randn(1, 8, 4), lengths=torch.tensor([5]))
    rewards = compute_rewards(ro, torch.zeros(1, 8, dtype=torch.long), torch.randn(1, 8, 4), lengths=torch.tensor([6]))
    assert rewards["binary"].item() == 1.0  # x_3..x_5 all inside a 6-token document
