"""Hand-written backward of the chunked delta rule (`delta_rule._ChunkedDeltaRule`); derivation in docs/deltanet.md §3.

Per chunk n (rows = the chunk's C tokens; h_n = state entering it, s = scale, Kb = diag(b) K, Vb = diag(b) V), the
forward computed
    T = (I + A)⁻¹, A = strict_tril(Kb Kᵀ);   W = T Kb;   U = T Vb;   M = tril_incl(Q Kᵀ)
    U' = U - W h_n;   h_{n+1} = h_n + Kᵀ U';   O = s (Q h_n + M U').
Reverse-mode, given dO and dh_N:
    dU' = s Mᵀ dO + K dh_{n+1},     dh_n = dh_{n+1} + s Qᵀ dO - Wᵀ dU'          (reverse scan over chunks)
    dM = tril_incl(s dO U'ᵀ),       dQ = s dO h_nᵀ + dM K,      dK ∋ U' dh_{n+1}ᵀ + dMᵀ Q
    dU = dU', dW = -dU' h_nᵀ; through the solve: dVb = Tᵀ dU, dKb = Tᵀ dW = -dVb h_nᵀ and
    dA = -strict_tril(dKb Wᵀ + dVb Uᵀ) = -strict_tril(dVb U'ᵀ)    (d(L⁻¹) = -L⁻¹ dL L⁻¹, L = I + A; U - W h_n = U')
    with Y = dA K + dKb:   dK ∋ diag(b) Y + dAᵀ Kb,   dV = diag(b) dVb,   db_i = k_i·Y_i + v_i·dVb_i.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def chunk_backward(do: Tensor, dhN: Tensor, scale: float, qz: Tensor, kz: Tensor, vz: Tensor, bz: Tensor,
                   Tm: Tensor, W: Tensor, M: Tensor, Up: Tensor, hs: Tensor, dh_chunks: Tensor | None = None):
    """Gradients (dq, dk, dv, dbeta, dh0) of `delta_rule._chunk_forward`. do (Z,C,Dv), dhN (BH,Dk,Dv); saved:
    Tm (Z,C,C), W (Z,C,Dk), M (Z,C,C), U' (Z,C,Dv), h_n (Z,Dk,Dv).
    dh_chunks (Z,Dk,Dv), optional: gradient reaching the state entering each chunk from outside (chunk_states=True).
    Returns dq, dk (Z,C,Dk), dv (Z,C,Dv), dbeta (Z,C,1), dh0 (BH,Dk,Dv).
    Every use of dO carries the scale s, so dO is scaled once, in the same pass that makes an expanded (stride-0) dO
    from a loss like o.sum() dense; every matmul would otherwise materialise it again."""
    Z, C, Dk = kz.shape
    BH, _, Dv = dhN.shape
    N = Z // BH
    dos = (do * scale).contiguous()                                     # s dO: (Z,C,Dv)
    # the parts of dU' and dh_n that do not depend on dh_{n+1}, for all chunks at once. Plain bmm, not baddbmm with
    # beta=0 on an empty buffer: compiled matmul templates compute beta * buffer, and 0 * NaN garbage is NaN
    dUp = torch.bmm(M.mT, dos)                                          # s Mᵀ dO -> dU' in the scan: (Z,C,Dv)
    E = torch.bmm(qz.mT, dos).view(BH, N, Dk, Dv)                       # s Qᵀ dO: (Z,Dk,C)@(Z,C,Dv)
    # reverse scan: dU'_n = s Mᵀ dO_n + K_n dh_{n+1};  dh_n = dh_{n+1} + s Qᵀ dO_n - W_nᵀ dU'_n
    dU4, W4, K4 = dUp.view(BH, N, C, Dv), W.view(BH, N, C, Dk), kz.view(BH, N, C, Dk)  # (Z,C,·) -> (BH,N,C,·)
    dhn = dhN.new_empty(BH, N, Dk, Dv)                                  # dh_{n+1}: the gradient leaving chunk n
    dh = dhN.clone(memory_format=torch.contiguous_format)              # updated in place below
    for n in range(N - 1, -1, -1):
        dhn[:, n] = dh
        dU4[:, n] += torch.bmm(K4[:, n], dh)                            # (BH,C,Dk)@(BH,Dk,Dv)
        dh.add_(E[:, n]).baddbmm_(W4[:, n].mT, dU4[:, n], alpha=-1.0)  # (BH,Dk,C)@(BH,C,Dv)
        if dh_chunks is not None:
            dh.add_(dh_chunks.view(BH, N, Dk, Dv)[:, n])                # h_n is also read outside: (BH,Dk,Dv)
    dhn = dhn.view(Z, Dk, Dv)                                           # (BH,N,Dk,Dv) -> (Z,Dk,Dv)
    del E                                                               # used up: its memory serves the next tensors
    dVb = torch.bmm(Tm.mT, dUp)                                         # Tᵀ dU': (Z,C,Dv)
    dM = torch.bmm(dos, Up.mT).tril_()                                  # dM = tril_incl(s dO U'ᵀ): (Z,C,C)
    nA = torch.bmm(dVb, Up.mT).tril_(-1)                                # -dA = strict_tril(dVb U'ᵀ): (Z,C,C)
    nKb = torch.bmm(dVb, hs.mT)                                         # -dKb = dVb h_nᵀ: (Z,C,Dk)
    dq = torch.bmm(dos, hs.mT).baddbmm_(dM, kz)                         # s dO h_nᵀ + dM K: (Z,C,Dk)
    dk = torch.bmm(Up, dhn.mT).baddbmm_(dM.mT, qz)                      # U' dh_{n+1}ᵀ + dMᵀ Q: (Z,C,Dk)
    Yn = nKb.baddbmm_(nA, kz)                                           # -Y = -(dA K + dKb): (Z,C,C)@(Z,C,Dk)
    dk = dk.addcmul_(Yn, bz, value=-1.0).baddbmm_(nA.mT, kz * bz, alpha=-1.0)  # + diag(b) Y + dAᵀ Kb: (Z,C,Dk)
    # db_i = v_i·dVb_i + k_i·Y_i, row-wise dot products (einsum: no full-size product tensor in between)
    db = (torch.einsum("zcv,zcv->zc", dVb, vz) - torch.einsum("zck,zck->zc", Yn, kz)).unsqueeze(-1)  # (Z,C,1)
    return dq, dk, dVb.mul_(bz), db, dh                                # dV = diag(b) dVb, in place
