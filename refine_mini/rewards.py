"""REFINE step 5: how good is a k-token rollout? (method.md §1.6, §5; paper Eq. 9, 11, 12)

For a rollout x̂_1..x̂_k after the prefix ending at t (rollout start r = t+1, ground truth x_r..x_{r+k-1}):
  cosine  R^φ   = (1/k) Σ_j cos(h_pred_j, h_gt(r+j-1))   -- mid-training; per position, then averaged (not pooled)
  binary  R^bin = (1/k) Σ_j 1[x̂_j = x_{r+j-1}]           -- TTT; a per-token match fraction, {0, 1/k, ..., 1}
  hybrid  R^hyb = R^φ + R^bin                              -- post-training; unweighted sum, range ≈ [-1, 2]
h_pred_j is the post-norm hidden after reading x̂_j (rollout.py); h_gt(r+j-1) the post-norm hidden after reading
x_{r+j-1} in the teacher-forced pass (selection.py). Both come from the SAME current policy: the reward is
self-referential (§8.14). If x̂_1 = x_r the first cosine is 1 up to numerics, since the states are identical.

All three are returned (and logged); the config names the one that drives the advantage. Rewards never carry
gradients (§5: the reward enters only through the policy gradient). No deviation from the code; the scalar-on-the-
last-token bookkeeping of verl is replaced by one reward per rollout row (equivalent for an outcome reward).
"""
import torch
import torch.nn.functional as F

from refine_mini.rollout import Rollouts

REWARDS = ("cosine", "binary", "hybrid")


@torch.no_grad()
def compute_rewards(rollouts: Rollouts, tokens: torch.Tensor, h_gt: torch.Tensor,
                    lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """tokens (B, T) and h_gt (B, T, D) of the documents (right-padded), lengths (B,) their real lengths (None: all T)
    -> {"cosine", "binary", "hybrid"}: (N,) each. A rollout whose ground truth would reach past the end of its
    document (into the padding) is a ValueError saying it runs "past the end"."""
    N, k = rollouts.tokens.shape
    ends = tokens.shape[1] if lengths is None else lengths.to(tokens.device)[rollouts.doc]  # () or (N,)
    if bool((rollouts.pos + k >= ends).any()):
        raise ValueError("a rollout runs past the end of its document: the ground truth needs t + k < length")
    gt_index = rollouts.pos[:, None] + 1 + torch.arange(k, device=tokens.device)  # (N, k): r..r+k-1, r = t+1
    doc_index = rollouts.doc[:, None].expand(N, k)  # (N, k)
    gt_tokens = tokens[doc_index, gt_index]  # (B, T) gather -> (N, k)
    gt_hidden = h_gt[doc_index, gt_index]  # (B, T, D) gather -> (N, k, D)
    cosine = F.cosine_similarity(rollouts.h_pred, gt_hidden, dim=-1).mean(1)  # (N, k, D) -> (N, k) -> (N,)
    binary = (rollouts.tokens == gt_tokens).to(cosine.dtype).mean(1)  # (N, k) -> (N,)
    return {"cosine": cosine, "binary": binary, "hybrid": cosine + binary}
