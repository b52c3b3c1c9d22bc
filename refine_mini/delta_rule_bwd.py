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
                   kb: Tensor, Tm: Tensor, W: Tensor, M: Tensor, UH: Tensor, dh_chunks: Tensor | None = None):
    """Gradients (dq, dk, dv, dbeta, dh0) of `delta_rule._chunk_forward`. do (Z,C,Dv), dhN (BH,Dk,Dv); saved:
    kb = diag(b) K (Z,C,Dk), Tm (Z,C,C), W (Z,C,Dk), M (Z,C,C), UH = [U'; h_n] (Z,C+Dk,Dv).
    dh_chunks (Z,Dk,Dv), optional: gradient reaching the state entering each chunk from outside (chunk_states=True).
    Returns dq, dk (Z,C,Dk), dv (Z,C,Dv), dbeta (Z,C,1), dh0 (BH,Dk,Dv)."""
    Z, C, Dk = kz.shape
    BH, _, Dv = dhN.shape
    N = Z // BH
    dos = do * scale                                                    # s dO: (Z,C,Dv)
    # the parts of dU' and dh_n that do not depend on dh_{n+1}, for all chunks at once
    dUp = torch.bmm(M.mT, dos).view(BH, N, C, Dv)                       # s Mᵀ dO
    E = torch.bmm(qz.mT, dos).view(BH, N, Dk, Dv)                       # s Qᵀ dO
    # reverse scan: dU'_n = F_n + K_n dh_{n+1};  dh_n = dh_{n+1} + E_n - W_nᵀ dU'_n
    W4, K4 = W.view(BH, N, C, Dk), kz.view(BH, N, C, Dk)
    dh, dUs, dhs = dhN, [], []
    for n in range(N - 1, -1, -1):
        dhs.append(dh)                                                  # dh_{n+1}: the gradient leaving chunk n
        dUs.append(torch.baddbmm(dUp[:, n], K4[:, n], dh))              # (BH,C,Dk)@(BH,Dk,Dv)
        dh = torch.baddbmm(E[:, n], W4[:, n].mT, dUs[-1], alpha=-1.0).add_(dh)  # (BH,Dk,C)@(BH,C,Dv)
        if dh_chunks is not None:
            dh = dh + dh_chunks.view(BH, N, Dk, Dv)[:, n]                     # h_n is also read outside the kernel
    dUp = torch.stack(dUs[::-1], dim=1).view(Z, C, Dv)                  # dU' (Z,C,Dv)
    dhn = torch.stack(dhs[::-1], dim=1).view(Z, Dk, Dv)                 # (Z,Dk,Dv)
    Up = UH[:, :C]                                                      # U' (Z,C,Dv)
    # [dM | s dO h_nᵀ] = s dO [U'; h_n]ᵀ  and  [-dA | -dKb] = dVb [U'; h_n]ᵀ   (lower-triangular masks applied in place)
    dVb = torch.bmm(Tm.mT, dUp)                                         # Tᵀ dU': (Z,C,Dv)
    G1 = torch.bmm(dos, UH.mT)                                          # (Z,C,C+Dk)
    G2 = torch.bmm(dVb, UH.mT)                                          # (Z,C,C+Dk)
    dM, dq = G1[:, :, :C].tril_(), G1[:, :, C:]
    nA, nKb = G2[:, :, :C].tril_(-1), G2[:, :, C:]                      # -dA, -dKb
    dq = torch.baddbmm(dq, dM, kz)                                      # s dO h_nᵀ + dM K
    dk = torch.baddbmm(torch.bmm(Up, dhn.mT), dM.mT, qz)                # U' dh_{n+1}ᵀ + dMᵀ Q
    Yn = torch.baddbmm(nKb, nA, kz)                                     # -Y = -(dA K + dKb)
    dk = dk.addcmul_(Yn, bz, value=-1.0).baddbmm_(nA.mT, kb, alpha=-1.0)  # + diag(b) Y + dAᵀ Kb
    db = (dVb * vz).sum(-1, keepdim=True) - (Yn * kz).sum(-1, keepdim=True)   # (Z,C,1)
    return dq, dk, dVb * bz, db, dh
