"""The delta-rule kernels: a token-by-token reference and the chunkwise WY/UT form.

Question answered: how does DeltaNet's fast-weight memory h (B, H, Dk, Dv) evolve over a sequence, and how do we
compute that fast with matmuls instead of T sequential rank-1 updates?

Source: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
(arXiv 2406.06484), §3 (chunkwise WY representation); spec /work/shared/docs/fast-weights.md §1.1-1.2.
Layout is fla's: h = Sᵀ (Dk x Dv), so a read is hᵀk and the paper's S_t = S_{t-1}(I - b k kᵀ) + b v kᵀ becomes
    u_t = b_t (v_t - h_{t-1}ᵀ k_t),   h_t = h_{t-1} + k_t u_tᵀ,   o_t = scale · h_tᵀ q_t     (state AFTER token t).
Derivation of the chunk form in docs/deltanet.md.

Schedule of `delta_rule_chunked` (same maths as fla's chunk kernel, different schedule):
- Everything that does not depend on the incoming state is batched over all B·H·N chunks at once: the UT factor
  T = (I + A)⁻¹ (`ut_factor.py`: A's blocks straight from K, exact substitution on 16 x 16 base blocks, then
  blocked merges), W = T diag(b) K, U = T diag(b) V, M = tril_incl(Q Kᵀ).
- The scan over chunks runs 2 small matmuls per chunk, batched over heads: U' = U - W h_n, h_{n+1} = h_n + Kᵀ U'.
  U' overwrites U and h is updated in place (an out-of-place op on these strided slices would copy them);
  all outputs O = scale (M U' + Q h_n) are then batched again.
- The backward is written by hand (refine_mini/delta_rule_bwd.py; derivation in docs/deltanet.md §3): one reverse scan
  over chunks for the state gradient, all other matmuls batched over chunks. It saves T, W, M, U' and h_n
  (about 5x the output o, plus the inputs) instead of recomputing them as fla does. When no backward can follow
  (grad mode off, or no input requires grad) nothing is saved and T, W are freed once used: the forward's peak
  tensor memory is then 4x o instead of 6x at Dk = Dv = C (bench/kernels.py measures both; C > Dk costs more).
  `_delta_rule_chunked_autograd` (an earlier schedule differentiated by plain autograd, with the blocked-doubling
  inverse `unit_lower_inverse`) is kept as its test oracle.
- fp32 (fp64 for fp64 inputs) throughout, including bf16/fp16 inputs and calls under bf16 autocast (`autocast_off`
  switches it off inside, the backward included); fla stores U' and states in the input dtype.
- On CPU the kernel is bound by memory traffic and op count more than by FLOPs (a 4 MB tensor falls out of L2), so
  the forward forms no tensor it does not need (no full A, no diag(b) K) and accumulates in place (`baddbmm_`).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from refine_mini.common import autocast_off
from refine_mini.delta_rule_bwd import chunk_backward
from refine_mini.ut_factor import unit_lower_inverse, ut_factor

Tensor = torch.Tensor


def _prepare(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float | None,
             initial_state: Tensor | None) -> tuple[torch.dtype, float, Tensor]:
    """Validate shapes, dtypes (floating point: o.to(q.dtype) would truncate to an integer q) and devices; return
    (compute dtype, scale, h0 in the compute dtype)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("initial_state", initial_state)):
        if x is not None and not (isinstance(x, Tensor) and x.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}: all inputs must be on one device")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, T, Dk), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, Dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be (B, H, T, Dv) = ({B}, {H}, {T}, Dv), got {tuple(v.shape)}")
    if beta.shape != (B, H, T):
        raise ValueError(f"beta must be (B, H, T) = ({B}, {H}, {T}), got {tuple(beta.shape)}")
    Dv = v.shape[-1]
    if T < 1:
        raise ValueError(f"sequence length T must be >= 1, got {T}")
    if Dk < 1 or Dv < 1:
        raise ValueError(f"head dimensions Dk and Dv must be >= 1, got Dk={Dk}, Dv={Dv}")
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


@autocast_off
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


def _to_chunks(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, C: int, cdt: torch.dtype):
    """Cast to the compute dtype, zero-pad T to N·C (padded rows: k = 0, beta = 0, exact no-ops) and view every chunk
    of every head as one batch row: q, k (Z,C,Dk), v (Z,C,Dv), beta (Z,C,1) with Z = B·H·N. Returns them and N."""
    B, H, T, Dk = q.shape
    N = math.ceil(T / C)
    pad = N * C - T
    qc, kc, vc, bc = (x.to(cdt) for x in (q, k, v, beta))
    if pad:
        qc, kc, vc = (F.pad(x, (0, 0, 0, pad)) for x in (qc, kc, vc))  # (B,H,N*C,D): zero rows at the tail
        bc = F.pad(bc, (0, pad))                                        # (B,H,N*C)
    Z = B * H * N                                                       # (B,H,N·C,D) -> (B·H·N, C, D): chunk rows
    return (qc.reshape(Z, C, Dk), kc.reshape(Z, C, Dk), vc.reshape(Z, C, v.shape[-1]), bc.reshape(Z, C, 1)), N


def check_chunk_size(chunk_size) -> int:
    """chunk_size as an int (numpy integers too); ValueError unless it is an integer >= 1 (bools are not)."""
    try:
        C = operator.index(chunk_size) if not isinstance(chunk_size, bool) else None
    except TypeError:
        C = None
    if C is None or C < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return C


@autocast_off
def _delta_rule_chunked_autograd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk_size: int = 64,
                                 scale: float | None = None,
                                 initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference chunked form differentiated by plain autograd (kept as the oracle for the hand-written backward).

    Same maths as `delta_rule_chunked`, different schedule: everything that does not depend on the incoming state is
    precomputed for all chunks (h_next = P h_0 + G, P = I - KᵀW, G = KᵀU; O = scale((Q - MW) h_0 + MU),
    M = tril_incl(QKᵀ)), so the scan is one matmul per chunk.
    """
    chunk_size = check_chunk_size(chunk_size)
    cdt, scale, h = _prepare(q, k, v, beta, scale, initial_state)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    (qz, kz, vz, bz), N = _to_chunks(q, k, v, beta, chunk_size, cdt)
    Z = qz.shape[0]
    kb, vb = kz * bz, vz * bz                                           # diag(b) K (Z,C,Dk), diag(b) V (Z,C,Dv)
    Tm = unit_lower_inverse(torch.bmm(kb, kz.mT))                       # (I + strict_tril(diag(b)KKᵀ))⁻¹: (Z,C,C)
    W, U = torch.bmm(Tm, kb), torch.bmm(Tm, vb)                         # (Z,C,Dk), (Z,C,Dv)
    M = torch.tril(torch.bmm(qz, kz.mT))                                # tril_incl(Q Kᵀ): (Z,C,C)
    Qp = torch.baddbmm(qz, M, W, alpha=-1.0)                            # Q - M W: (Z,C,Dk)
    MU = torch.bmm(M, U)                                                # (Z,C,Dv)
    eye = torch.eye(Dk, dtype=cdt, device=q.device).expand(Z, Dk, Dk)
    P = torch.baddbmm(eye, kz.mT, W, alpha=-1.0)                        # I - KᵀW: (Z,Dk,Dk)
    G = torch.bmm(kz.mT, U)                                             # KᵀU: (Z,Dk,Dv)
    h = h.reshape(B * H, Dk, Dv)                                        # (B,H,Dk,Dv) -> (BH,Dk,Dv)
    states = []                                                         # P, G: (Z,·,·) -> (BH,N,·,·), chunk by chunk
    for P_n, G_n in zip(P.view(B * H, N, Dk, Dk).unbind(1), G.view(B * H, N, Dk, Dv).unbind(1)):
        states.append(h)                                               # state entering chunk n
        h = torch.baddbmm(G_n, P_n, h)                                  # h_{n+1} = P_n h_n + G_n: (BH,Dk,Dk)@(BH,Dk,Dv)
    hs = torch.stack(states, dim=1).view(Z, Dk, Dv)                     # (BH,N,Dk,Dv) -> (Z,Dk,Dv)
    o = torch.baddbmm(MU, Qp, hs, beta=scale, alpha=scale)              # scale (MU + Qp hs): (Z,C,Dk)@(Z,Dk,Dv)
    o = o.view(B, H, N * chunk_size, Dv)[:, :, :T]                      # (Z,C,Dv) -> (B,H,N·C,Dv) -> (B,H,T,Dv)
    return o.to(q.dtype), h.view(B, H, Dk, Dv)                          # (BH,Dk,Dv) -> (B,H,Dk,Dv)


def _chunk_forward(qz: Tensor, kz: Tensor, vz: Tensor, bz: Tensor, h: Tensor, scale: float,
                   for_backward: bool = True):
    """Forward of the chunked delta rule on chunk batches (module docstring, "Schedule"); runs without autograd.

    qz, kz (Z,C,Dk), vz (Z,C,Dv), bz (Z,C,1), h (BH,Dk,Dv) with Z = BH·N, the N chunks of one head consecutive.
    Returns o (Z,C,Dv), the final state (BH,Dk,Dv) and what the backward needs, (T, W, M, U', h_n). With
    for_backward=False, T and W are let go as soon as they are used (None in that tuple): the forward's peak memory
    falls from 6x to 4x the output's (at Dk = Dv = C; T and M are C×C per chunk, o is C×Dv).
    """
    Z, C, Dk = kz.shape
    BH, _, Dv = h.shape
    N = Z // BH
    Tm = ut_factor(kz, bz)                                              # T = (I + strict_tril(diag(b)KKᵀ))⁻¹: (Z,C,C)
    Tb = Tm * bz.mT                                                     # T diag(b): (Z,C,C)
    W = torch.bmm(Tb, kz)                                               # W = T diag(b) K: (Z,C,C)@(Z,C,Dk)
    Up = torch.bmm(Tb, vz)                                              # U = T diag(b) V: (Z,C,C)@(Z,C,Dv)
    del Tb
    if not for_backward:
        Tm = None                                                       # only the backward reads T again
    U4, W4, K4 = Up.view(BH, N, C, Dv), W.view(BH, N, C, Dk), kz.view(BH, N, C, Dk)  # (Z,C,·) -> (BH,N,C,·)
    hs = h.new_empty(BH, N, Dk, Dv)                                     # h_n, the state entering chunk n
    h = h.clone()                                                       # updated in place below
    for n in range(N):                                                  # the only sequential part, 2 matmuls/chunk
        hs[:, n] = h
        U4[:, n] -= torch.bmm(W4[:, n], h)                              # U' = U - W h_n: (BH,C,Dk)@(BH,Dk,Dv)
        h.baddbmm_(K4[:, n].mT, U4[:, n])                               # h_{n+1} = h_n + Kᵀ U': (BH,Dk,C)@(BH,C,Dv)
    hs = hs.view(Z, Dk, Dv)                                             # (BH,N,Dk,Dv) -> (Z,Dk,Dv)
    if not for_backward:
        W = W4 = None
    # all outputs at once: O = s (M U' + Q h_n),  M = tril_incl(Q Kᵀ)
    M = torch.bmm(qz, kz.mT).tril_()                                    # (Z,C,C)
    o = torch.bmm(M, Up).baddbmm_(qz, hs, beta=scale, alpha=scale)     # (Z,C,C)@(Z,C,Dv) + (Z,C,Dk)@(Z,Dk,Dv)
    return o, h, (Tm, W, M, Up, hs)


class _ChunkedDeltaRule(torch.autograd.Function):
    """The chunked kernel with a hand-written backward (refine_mini/delta_rule_bwd.py): all matmuls batched over
    chunks except one reverse scan for the state gradient. Not twice differentiable: a backward that builds a graph
    (create_graph=True, for a second derivative) raises instead of leaving this kernel's second-order terms out.
    Checked against `_delta_rule_chunked_autograd` and by gradcheck."""

    @staticmethod
    def forward(ctx, qz, kz, vz, bz, h0, scale, with_states, for_backward):
        o, h, saved = _chunk_forward(qz, kz, vz, bz, h0, scale, for_backward)
        if for_backward:
            ctx.save_for_backward(qz, kz, vz, bz, *saved)
        ctx.scale = scale
        hs = saved[-1] if with_states else h.new_empty(0)                # states entering each chunk (Z,Dk,Dv)
        if with_states and for_backward:
            hs = hs.clone()                                             # saved too: an in-place edit must not reach it
        return o, h, hs

    @staticmethod
    @autocast_off
    def backward(ctx, do, dh, dhs):
        if torch.is_grad_enabled():  # autograd runs a backward in grad mode only under create_graph=True
            raise RuntimeError("delta_rule_chunked is not twice differentiable (its backward is hand-written); "
                               "use delta_rule_recurrent for higher derivatives")
        # dO may be expanded (stride 0, from a loss like o.sum()): chunk_backward makes it dense once, scaled
        dhs = dhs.contiguous() if dhs.numel() else None
        return (*chunk_backward(do, dh, ctx.scale, *ctx.saved_tensors, dh_chunks=dhs), None, None, None)


@autocast_off
def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, chunk_size: int = 64,
                       scale: float | None = None, initial_state: Tensor | None = None,
                       chunk_states: bool = False):
    """Chunkwise WY/UT form; same contract as `delta_rule_recurrent` plus `chunk_size` (any int >= 1).
    With chunk_states=True it also returns the state entering every chunk, (B, H, N, Dk, Dv), differentiable
    (REFINE rebuilds prefix snapshots from them, deltanet.py).

    T is zero-padded to a multiple of C (padded rows have k = 0, beta = 0: exact no-ops). All per-chunk work is done
    as batched matmuls over a (B·H·N, C, .) view; only the state recurrence runs sequentially over N = T/C chunks.
    Differentiable (once) through a custom autograd.Function with a hand-written backward.
    Causality holds for finite inputs. A NaN or inf input also reaches the EARLIER rows of its chunk, as 0 · NaN in
    the masked matmuls (the recurrence spreads it forward only); both make every later output NaN.
    """
    chunk_size = check_chunk_size(chunk_size)
    cdt, scale, h0 = _prepare(q, k, v, beta, scale, initial_state)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if B * H == 0:  # nothing to chunk (the chunk views below divide by B·H): the recurrence on empty tensors
        o, h = delta_rule_recurrent(q, k, v, beta, scale, initial_state)
        return (o, h, h.new_zeros(B, H, math.ceil(T / chunk_size), Dk, Dv)) if chunk_states else (o, h)
    (qz, kz, vz, bz), N = _to_chunks(q, k, v, beta, chunk_size, cdt)
    # decided here: inside Function.forward grad mode is always off and ctx.needs_input_grad ignores torch.no_grad()
    for_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, beta, h0))
    h0 = h0.reshape(B * H, Dk, Dv)                                      # (B,H,Dk,Dv) -> (BH,Dk,Dv)
    o, h, hs = _ChunkedDeltaRule.apply(qz, kz, vz, bz, h0, scale, chunk_states, for_backward)
    o = o.view(B, H, N * chunk_size, Dv)                                # (B,H,N·C,Dv)
    if N * chunk_size != T:                                             # (a no-op slice still costs a zero-filled
        o = o[:, :, :T]                                                 # full-size gradient): drop padded rows
    if chunk_states:                                                    # hs (Z,Dk,Dv) -> (B,H,N,Dk,Dv)
        return o.to(q.dtype), h.view(B, H, Dk, Dv), hs.view(B, H, N, Dk, Dv)
    return o.to(q.dtype), h.view(B, H, Dk, Dv)                          # (BH,Dk,Dv) -> (B,H,Dk,Dv)
