"""Two plain delta-rule implementations that bench/kernels.py times beside ours, to calibrate its ratios.

Question answered: how fast is the delta rule when it is written the plain way, on this machine, in this run?

Why: the kernel issue's targets ("chunked >= 25x faster than the recurrence", "a plain 40-line version reaches about
27x") depend on how the recurrence is written as much as on the chunked kernel. Our oracle `delta_rule_recurrent`
unbinds the sequence once, so its backward stacks the T per-step gradients in one go. The usual naive form slices
x[:, :, t] at every step, and its backward then scatters each step's gradient into a fresh zero tensor of the full
(B, H, T, D) size, T times over. It computes the same numbers, but its forward+backward takes a few times longer.
Both baselines are checked against `delta_rule_recurrent` in tests/test_bench_baselines.py.

- `delta_rule_recurrent_indexed`: the token-by-token recurrence with per-step slicing (the form of fla's naive
  reference, same convention: state after writing token t, h = Sᵀ of shape (Dk, Dv)).
- `delta_rule_chunked_plain`: the chunkwise WY/UT form in about forty lines, differentiated by autograd: one
  triangular solve per chunk for T = (I + A)⁻¹, then a Python loop over chunks. No padding: T must be a multiple of C.
Neither is used by the library; refine_mini/delta_rule.py is the implementation.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def delta_rule_recurrent_indexed(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float | None = None,
                                 initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """u_t = b_t (v_t - h_{t-1}ᵀ k_t), h_t = h_{t-1} + k_t u_tᵀ, o_t = scale h_tᵀ q_t, slicing x[:, :, t] per step.
    q, k (B,H,T,Dk); v (B,H,T,Dv); beta (B,H,T); state (B,H,Dk,Dv)."""
    B, H, T, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    h = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        k_t, v_t, q_t, b_t = k[:, :, t], v[:, :, t], q[:, :, t], beta[:, :, t]  # (B,H,Dk),(B,H,Dv),(B,H,Dk),(B,H)
        u_t = b_t[..., None] * (v_t - (k_t[..., None, :] @ h).squeeze(-2))    # (B,H,1,Dk)@(B,H,Dk,Dv) -> (B,H,Dv)
        h = h + k_t[..., :, None] * u_t[..., None, :]                           # + k_t u_tᵀ: (B,H,Dk,Dv)
        outs.append(scale * (q_t[..., None, :] @ h).squeeze(-2))               # (B,H,1,Dk)@(B,H,Dk,Dv) -> (B,H,Dv)
    return torch.stack(outs, dim=2), h                                          # (B,H,T,Dv), (B,H,Dk,Dv)


def delta_rule_chunked_plain(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk_size: int = 64,
                             scale: float | None = None,
                             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The WY/UT chunk form, plainly: per chunk T = (I + strict_tril(diag(b) K Kᵀ))⁻¹, W = T diag(b) K,
    U = T diag(b) V; then per chunk U' = U - W h, O = scale (Q h + tril_incl(Q Kᵀ) U'), h += Kᵀ U'."""
    B, H, L, Dk = q.shape
    C = chunk_size
    if L % C:
        raise ValueError(f"the plain chunked baseline needs T % C == 0, got T={L}, C={C}")
    N, Dv = L // C, v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    q, k, v, beta = (x.reshape(B, H, N, C, -1) for x in (q, k, v, beta[..., None]))  # (B,H,N,C,.)
    kb, vb = k * beta, v * beta                                                       # diag(b) K, diag(b) V
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    A = torch.tril(kb @ k.mT, diagonal=-1)                                # (B,H,N,C,Dk)@(B,H,N,Dk,C) -> (B,H,N,C,C)
    Tm = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False)  # (I + A)⁻¹: (B,H,N,C,C)
    W, U = Tm @ kb, Tm @ vb                                               # (B,H,N,C,C)@(B,H,N,C,Dk|Dv)
    h = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state
    outs = []
    for n in range(N):
        q_n, k_n = q[:, :, n], k[:, :, n]                                 # (B,H,C,Dk)
        u_n = U[:, :, n] - W[:, :, n] @ h                                 # U' = U - W h: (B,H,C,Dk)@(B,H,Dk,Dv)
        att = torch.tril(q_n @ k_n.mT)                                    # tril_incl(Q Kᵀ): (B,H,C,C)
        outs.append(scale * (q_n @ h + att @ u_n))                        # (B,H,C,Dv)
        h = h + k_n.mT @ u_n                                              # (B,H,Dk,C)@(B,H,C,Dv)
    return torch.stack(outs, dim=2).reshape(B, H, L, Dv), h               # (B,H,N,C,Dv) -> (B,H,T,Dv)
