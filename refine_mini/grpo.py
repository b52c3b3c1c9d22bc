"""REFINE step 6-7 (RL half): GRPO advantages and the PPO-clip loss (method.md §1.7, §1.8, §2, §8.1; docs/grpo.md).

Groups (§1.3, §8.1): with n = 1 (every released config) the group is the c rollouts of ONE DOCUMENT (c different
prefixes), not n samples of one prompt; with n > 1 it is the n samples of one prefix.

Advantage (verl `compute_grpo_outcome_advantage`), broadcast to all k tokens of the row:
    A_i = (R_i - mean_g R) / (std_g R + 1e-6),   std unbiased (n-1).
PPO-clip with dual clip (verl, c = 3), per rollout token, ratio ρ = exp(clamp(logp - old_logp, -20, 20)):
    ℓ = max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε));   if A < 0: ℓ = min(ℓ, -A·c)
token-mean over all rollout tokens (no mask is needed: every rollout has exactly k tokens); no KL, no entropy bonus.
Loss normalisation alternatives (sequence-mean "GRPO", DAPO token-mean, Dr. GRPO constant) are discussed in
docs/grpo.md; token-mean is verl's default and the official setting.

Deviation: a group whose rewards are all equal (including a group of size 1) gets advantage EXACTLY 0.
verl gives such a singleton mean 0 and std 1, i.e. A = R (a baseline-free REINFORCE term), and an equal-reward
group a rounding residue that the 1e-6 in the denominator does not make small: in fp32 the mean is off by an ulp and
the std is ~1e-8, so |A| reaches 0.12 (8 equal copies of 2000 uniform rewards: 41 % of groups above 1e-3). We treat
both as "no signal". They are counted in `frac_zero_std_groups`. Rewards that differ by a few ulps are a signal
too small to trust in fp32 (the rounded mean left |A| up to 0.26 and group sums up to 0.9), so the group statistics
run in fp64: A is then the formula's value (|A| <= 0.06 there) and sums to 0 within each group.
"""
import torch

from refine_mini.rollout import Rollouts


def group_ids(rollouts: Rollouts) -> torch.Tensor:
    """(N,) GRPO group of each row: its document when n = 1, its prefix (row // n) when n > 1."""
    if rollouts.n == 1:
        return rollouts.doc
    return torch.arange(rollouts.tokens.shape[0], device=rollouts.doc.device) // rollouts.n


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6):
    """rewards (N,), groups (N,) -> advantages (N,) standardised within each group, and flat (n_groups,) bool per group.
    ValueError for other shapes (index_add would misread them)."""
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"group_advantages needs rewards (N,) and groups (N,), got {tuple(rewards.shape)} and "
                         f"{tuple(groups.shape)}")
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)  # inverse (N,), counts (n_groups,)
    n_groups = counts.numel()
    dtype, rewards = rewards.dtype, rewards.detach().double()  # fp64 statistics (module docstring)
    mean = rewards.new_zeros(n_groups).index_add_(0, inverse, rewards) / counts  # (n_groups,)
    deviation = rewards - mean[inverse]  # R_i - mean_g, (N,)
    var = rewards.new_zeros(n_groups).index_add_(0, inverse, deviation ** 2) / (counts - 1).clamp(min=1)  # unbiased, (n_groups,)
    # A_i = (R_i - mean_g) / (std_g + eps)
    advantages = deviation / (var.sqrt()[inverse] + eps)  # (N,)
    r_max = rewards.new_full((n_groups,), -float("inf")).scatter_reduce(0, inverse, rewards, "amax")  # (n_groups,)
    r_min = rewards.new_full((n_groups,), float("inf")).scatter_reduce(0, inverse, rewards, "amin")  # (n_groups,)
    flat = r_max == r_min  # all rewards equal (or a single row): no signal, advantage exactly 0
    advantages = torch.where(flat[inverse], torch.zeros_like(advantages), advantages)
    return advantages.to(dtype), flat


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float = 0.2, dual_clip: float = 3.0):
    """logp, old_logp (N, k), advantages (N,) -> (token-mean loss, stats dict of floats): `clip_frac`, the fraction
    of tokens where the clipped term is the active one (-A·clip(ρ) > -A·ρ, not merely ρ outside [1-ε, 1+ε]);
    `dual_clip_frac`, where the -A·c cap is (A < 0 and -A·c < -A·ρ); `ratio_mean`; `ratio_max_dev` = max |ρ - 1|.
    ValueError for other shapes: (N, 1) advantages would broadcast to an (N, N, k) loss, silently."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"ppo_clip_loss needs logp and old_logp (N, k) and advantages (N,), got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)} and {tuple(advantages.shape)}")
    # ρ = exp(clamp(logp - old_logp, -20, 20))
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # (N, k)
    adv = advantages[:, None].to(ratio.dtype)  # (N, 1): the outcome advantage of a row, broadcast over its k tokens
    loss_plain = -adv * ratio  # (N, k)
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (N, k)
    # ℓ = max(-Aρ, -A clip(ρ, 1-ε, 1+ε)): the pessimistic bound
    loss = torch.maximum(loss_plain, loss_clipped)  # (N, k)
    # dual clip: for A < 0, ℓ = min(ℓ, -A·c), so a huge ratio cannot blow up a negative-advantage token
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)  # (N, k)
    with torch.no_grad():
        stats = {"clip_frac": float((loss_clipped > loss_plain).float().mean()),
                 "dual_clip_frac": float(((adv < 0) & (-adv * dual_clip < loss_plain)).float().mean()),
                 "ratio_mean": float(ratio.mean()),
                 "ratio_max_dev": float((ratio - 1).abs().max())}
    return loss.mean(), stats
