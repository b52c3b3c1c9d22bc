"""The delta-rule kernels: a token-by-token reference and the chunkwise WY/UT form.

Question answered: how does DeltaNet's fast-weight memory h (B, H, Dk, Dv) evolve over a sequence, and how do we
compute that fast with matmuls instead of T sequential rank-1 updates?

Source: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
(arXiv 2406.06484), §3 (chunkwise WY representation); spec /work/shared/docs/fast-weights.md §1.1-1.2.
Layout is fla's: h = Sᵀ (Dk x Dv), so a read is hᵀk and the paper's S_t = S_{t-1}(I - b k kᵀ) + b v kᵀ becomes
    u_t = b_t (v_t - h_{t-1}ᵀ k_t),   h_t = h_{t-1} + k_t u_tᵀ,   o_t = scale · h_tᵀ q_t     (state AFTER token t).
Derivation of the chunk form in docs/deltanet.md.

Deviations from fla's chunk kernel (same maths, different schedule):
- The UT factor is never formed: [W | U] = (I + A)⁻¹ diag(b) [K | V] is one batched unit-triangular solve.
- The per-chunk scan is reduced to ONE matmul per chunk. Everything that does not depend on the incoming state is
  precomputed for all chunks at once: h_next = P h_0 + G with P = I - KᵀW, G = KᵀU, and
  O = scale (Q - M W) h_0 + scale M U with M = tril_incl(Q Kᵀ). fla scans with 3 matmuls per chunk (W h, Q h, Kᵀ U').
- fp32 (fp64 for fp64 inputs) throughout, including bf16/fp16 inputs; fla stores U' and states in the input dtype.
- Backward is plain autograd (memory: the per-chunk states, (B, H, T/C, Dk, Dv)); fla recomputes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _prepare(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float | None,
             initial_state: Tensor | None) -> tuple[torch.dtype, float, Tensor]:
    """Validate shapes; return (compute dtype, scale, h0 in the compute dtype)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, T, Dk), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, Dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be (B, H, T, Dv) = ({B}, {H}, {T}, Dv), got {tuple(v.shape)}")
    if beta.shape != (B, H, T):
        raise ValueError(f"beta must be (B, H, T) = ({B}, {H}, {T}), got {tuple(beta.shape)}")
    if T < 1:
        raise ValueError(f"sequence length T must be >= 1, got {T}")
    Dv = v.shape[-1]
    # accumulate in fp32 whatever the input dtype; fp64 stays fp64 so tests can compare to ~1e-12
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = Dk ** -0.5 if scale is None else float(scale)
    if initial_state is None:
        h0 = q.new_zeros(B, H, Dk, Dv, dtype=cdt)
    else:
        if initial_state.shape != (B, H, Dk, Dv):
            raise ValueError(f"initial_state must be (B, H, Dk, Dv) = ({B}, {H}, {Dk}, {Dv}), "
                             f"got {tuple(initial_state.shape)}")
        h0 = initial_state.to(cdt)
    return cdt, scale, h0


def _inverse_by_doubling(A: Tensor) -> Tensor:
    """(I + A)⁻¹ for strictly lower-triangular A (.., s, s): A is nilpotent, so the Neumann series stops and
    (I + A)⁻¹ = (I - A)(I + A²)(I + A⁴)··· with ceil(log2 s) factors."""
    s = A.shape[-1]
    X = -A
    Tm = X + torch.eye(s, dtype=A.dtype, device=A.device)               # I + X
    for _ in range(max(0, (s - 1).bit_length() - 1)):
        X = X @ X                                                       # X^(2^j): (.., s, s)
        Tm = torch.baddbmm(Tm.flatten(0, -3), Tm.flatten(0, -3), X.flatten(0, -3)).view(Tm.shape)  # T (I + X^(2^j))
    return Tm


def _unit_lower_inverse(A: Tensor, base: int = 16) -> Tensor:
    """(I + A)⁻¹ for strictly lower-triangular A (.., C, C) by blocked doubling: invert the diagonal base x base
    blocks with `_inverse_by_doubling`, then merge neighbours, [[T1, 0], [A21, T2]]⁻¹ lower-left = -T2 A21 T1.
    Pure batched matmuls (fast autograd on CPU; linalg.solve_triangular's backward was far slower)."""
    C = A.shape[-1]
    Cp = 1 << (C - 1).bit_length()                                     # next power of two >= C
    if Cp != C:                                                         # pad with zeros: block-diag(A, 0), exact
        A = F.pad(A, (0, Cp - C, 0, Cp - C))
    lead = A.shape[:-2]
    b = min(Cp, base)
    nb = Cp // b
    # diagonal blocks: (.., nb, b, nb, b) -> diagonal over the two block indices -> (.., nb, b, b)
    Ad = torch.diagonal(A.view(*lead, nb, b, nb, b), dim1=-4, dim2=-2).movedim(-1, -3)
    Td = _inverse_by_doubling(torch.tril(Ad, diagonal=-1))            # only diagonal blocks need the mask
    s = b
    while s < Cp:
        m = Cp // (2 * s)
        # sub-diagonal block of each (2s x 2s) diagonal block: (.., m, 2, s, m, 2, s) -> (.., m, s, s)
        A21 = torch.diagonal(A.view(*lead, m, 2, s, m, 2, s), dim1=-6, dim2=-3)[..., 1, :, 0, :, :].movedim(-1, -3)
        T1, T2 = Td.view(*lead, m, 2, s, s).unbind(-3)                  # (.., m, s, s) each
        off = -(T2 @ A21 @ T1)                                          # (.., m, s, s)
        Td = torch.cat([torch.cat([T1, torch.zeros_like(T1)], -1), torch.cat([off, T2], -1)], -2)  # (.., m, 2s, 2s)
        s *= 2
    Tm = Td.squeeze(-3)                                                 # (.., Cp, Cp)
    return Tm[..., :C, :C] if Cp != C else Tm


def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float | None = None,
                         initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token reference (the oracle). q, k (B,H,T,Dk); v (B,H,T,Dv); beta (B,H,T); state (B,H,Dk,Dv).

    Returns o (B,H,T,Dv) in the input dtype and the final state in fp32 (fp64 for fp64 inputs).
    No in-place writes: every step makes a new h, so autograd sees the whole chain.
    """
    cdt, scale, h = _prepare(q, k, v, beta, scale, initial_state)
    qc, kc, vc, bc = (x.to(cdt) for x in (q, k, v, beta))
    outs = []
    # unbind (not kc[:, :, t]) so the backward stacks the per-step grads once instead of T full-size zero fills
    for q_t, k_t, v_t, b_t in zip(*(x.unbind(2) for x in (qc, kc, vc, bc))):   # (B,H,Dk),(B,H,Dk),(B,H,Dv),(B,H)
        pred = (k_t.unsqueeze(-2) @ h).squeeze(-2)                  # h_{t-1}ᵀ k_t: (B,H,1,Dk)@(B,H,Dk,Dv) -> (B,H,Dv)
        u_t = b_t.unsqueeze(-1) * (v_t - pred)                      # u_t = b_t (v_t - h_{t-1}ᵀ k_t): (B,H,Dv)
        h = h + k_t.unsqueeze(-1) * u_t.unsqueeze(-2)               # h_t = h_{t-1} + k_t u_tᵀ: (B,H,Dk,Dv)
        outs.append((q_t.unsqueeze(-2) @ h).squeeze(-2))            # h_tᵀ q_t: (B,H,1,Dk)@(B,H,Dk,Dv) -> (B,H,Dv)
    o = torch.stack(outs, dim=2) * scale                            # (B,H,T,Dv)
    return o.to(q.dtype), h


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk_size: int = 64,
                       scale: float | None = None, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunkwise WY/UT form; same contract as `delta_rule_recurrent` plus `chunk_size` (any int >= 1).

    T is zero-padded to a multiple of C (padded rows have k = 0, beta = 0: exact no-ops). All per-chunk work is done
    as batched matmuls over a (B, H, N, C, .) view; only h_{n+1} = P_n h_n + G_n runs sequentially over N = T/C.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    cdt, scale, h = _prepare(q, k, v, beta, scale, initial_state)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = math.ceil(T / C)
    pad = N * C - T
    qc, kc, vc, bc = (x.to(cdt) for x in (q, k, v, beta))
    if pad:
        qc, kc, vc = (F.pad(x, (0, 0, 0, pad)) for x in (qc, kc, vc))  # (B,H,N*C,D): zero rows at the tail
        bc = F.pad(bc, (0, pad))                                        # (B,H,N*C)
    Z = B * H * N                                                       # every chunk of every head is one batch row
    qz = qc.reshape(Z, C, Dk)                                           # (B,H,N*C,Dk) -> (Z,C,Dk)
    kz = kc.reshape(Z, C, Dk)                                           # (Z,C,Dk)
    bz = bc.reshape(Z, C, 1)                                            # (Z,C,1)
    kb, vb = kz * bz, vc.reshape(Z, C, Dv) * bz                         # diag(b) K (Z,C,Dk), diag(b) V (Z,C,Dv)

    # 1) A_ij = b_i k_i·k_j; only its strict lower triangle is ever read: (Z,C,Dk)@(Z,Dk,C) -> (Z,C,C)
    A = torch.bmm(kb, kz.mT)
    # 2) T = (I + strict_tril A)⁻¹, unit lower triangular: (Z,C,C)
    Tm = _unit_lower_inverse(A)
    # 3) W = T diag(b) K, U = T diag(b) V  (beta enters both): (Z,C,C)@(Z,C,D) -> (Z,C,Dk), (Z,C,Dv)
    W, U = torch.bmm(Tm, kb), torch.bmm(Tm, vb)
    # intra-chunk attention, diagonal INCLUDED: M = tril(Q Kᵀ): (Z,C,Dk)@(Z,Dk,C) -> (Z,C,C)
    M = torch.tril(torch.bmm(qz, kz.mT))
    # O = scale(Q h0 + M (U - W h0)) = scale((Q - M W) h0 + M U): Qp (Z,C,Dk), MU (Z,C,Dv)
    Qp = torch.baddbmm(qz, M, W, alpha=-1.0)                            # Q - M W: (Z,C,C)@(Z,C,Dk)
    MU = torch.bmm(M, U)                                                # (Z,C,C)@(Z,C,Dv) -> (Z,C,Dv)
    # h_next = h0 + Kᵀ(U - W h0) = P h0 + G with P = I - KᵀW, G = KᵀU: (Z,Dk,C)@(Z,C,.) -> (Z,Dk,Dk), (Z,Dk,Dv)
    eye = torch.eye(Dk, dtype=cdt, device=q.device).expand(Z, Dk, Dk)
    P = torch.baddbmm(eye, kz.mT, W, alpha=-1.0)
    G = torch.bmm(kz.mT, U)

    # 4-6) the only sequential part: one matmul per chunk, h_{n+1} = P_n h_n + G_n on (B*H, Dk, .) batches;
    # unbind (not P[:, n]) so the backward stacks the per-chunk grads once instead of N full-size zero fills
    h = h.reshape(B * H, Dk, Dv)                                        # (B*H,Dk,Dv)
    states = []
    for P_n, G_n in zip(P.view(B * H, N, Dk, Dk).unbind(1), G.view(B * H, N, Dk, Dv).unbind(1)):
        states.append(h)                                               # state entering chunk n
        h = torch.baddbmm(G_n, P_n, h)                                  # (B*H,Dk,Dk)@(B*H,Dk,Dv) + (B*H,Dk,Dv)
    hs = torch.stack(states, dim=1).view(Z, Dk, Dv)                     # (B*H,N,Dk,Dv) -> (Z,Dk,Dv)

    # outputs of all chunks at once, scale folded in: scale·(MU + Qp hs), (Z,C,Dk)@(Z,Dk,Dv) -> (Z,C,Dv)
    o = torch.baddbmm(MU, Qp, hs, beta=scale, alpha=scale)
    o = o.view(B, H, N * C, Dv)[:, :, :T]                               # (B,H,T,Dv): drop padded rows
    return o.to(q.dtype), h.view(B, H, Dk, Dv)
