"""Rotary position embedding (RoPE, Su et al. 2021) at absolute positions, for LaCT's sliding-window attention.

Rotate-half convention: channel i < dh/2 pairs with channel i + dh/2, rotated by angle pos · theta^(-2i/dh).
`pos0` is one start position for every row (an int: a batch read in lockstep) or one per row (a (B,) LongTensor:
stacked rollout states at different positions, lact_ragged.py). Angles are computed in fp64, then cast.
"""
import torch


def apply_rope(x: torch.Tensor, pos0, theta: float) -> torch.Tensor:
    """x (B, T, H, dh) at positions pos0 .. pos0+T-1 (pos0 int or (B,) tensor) -> same shape, rotated."""
    T, dh = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64, device=x.device) / dh)  # (dh/2,)
    steps = torch.arange(T, dtype=torch.float64, device=x.device)  # (T,)
    if isinstance(pos0, torch.Tensor):
        positions = pos0.to(torch.float64)[:, None] + steps[None, :]  # (B, 1) + (1, T) -> (B, T)
    else:
        positions = (pos0 + steps)[None, :]  # (1, T)
    angles = positions[..., None] * inv_freq  # (B|1, T, 1) * (dh/2,) -> (B|1, T, dh/2)
    cos = angles.cos().to(x.dtype)[:, :, None, :]  # (B|1, T, 1, dh/2)
    sin = angles.sin().to(x.dtype)[:, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]  # (B, T, H, dh/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)  # (B, T, H, dh)
