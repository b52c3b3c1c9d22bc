"""The UT factor of a chunk: T = (I + A)⁻¹ with A = strict_tril(diag(b) K Kᵀ), the step that turns a chunk's C
rank-1 delta updates into the WY form W = T diag(b) K, U = T diag(b) V (delta_rule.py; fast-weights.md §1.2 step 2).

Question answered: how do we invert C x C unit lower-triangular matrices, thousands at a time, with batched ops?

Source: Yang et al. 2024 (arXiv 2406.06484) §3; fla inverts 16 x 16 diagonal blocks by substitution and merges them.
Both versions here are blocked: invert the diagonal base blocks, then merge neighbours, using
    [[L11, 0], [L21, L22]]⁻¹ = [[T1, 0], [-T2 L21 T1, T2]],   T1 = L11⁻¹, T2 = L22⁻¹.
- `unit_lower_inverse(A)`: differentiable (pure out-of-place matmuls, base blocks by doubling); the reference
  schedule `_delta_rule_chunked_autograd` differentiates through it.
- `ut_factor(K, b)`: the kernel's no-grad forward; reads A's blocks straight from K and substitutes exactly.
Deviation from fla: T stays fp32 (fp64 for fp64 inputs); fla stores it in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _inverse_by_doubling(A: Tensor) -> Tensor:
    """(I + A)⁻¹ for strictly lower-triangular A (.., s, s): A is nilpotent, so the Neumann series stops and
    (I + A)⁻¹ = (I - A)(I + A²)(I + A⁴)··· with ceil(log2 s) factors."""
    s = A.shape[-1]
    X = -A
    Tm = X + torch.eye(s, dtype=A.dtype, device=A.device)               # I + X
    for _ in range(max(0, (s - 1).bit_length() - 1)):
        X = X @ X                                                       # X^(2^j): (.., s, s)
        # T (I + X^(2^j)) as one batched matmul: (.., s, s) -> (batch, s, s) -> back to (.., s, s)
        Tm = torch.baddbmm(Tm.flatten(0, -3), Tm.flatten(0, -3), X.flatten(0, -3)).view(Tm.shape)
    return Tm


def _diag_blocks(X: Tensor, s: int) -> Tensor:
    """The diagonal s x s blocks of X (.., n, n) as a view (.., n/s, s, s) (writes go through to X)."""
    lead, n = X.shape[:-2], X.shape[-1]
    # (.., n/s, s, n/s, s) -> diagonal over the two block indices -> (.., s, s, n/s) -> (.., n/s, s, s)
    return torch.diagonal(X.view(*lead, n // s, s, n // s, s), dim1=-4, dim2=-2).movedim(-1, -3)


def _lower_left_blocks(X: Tensor, s: int) -> Tensor:
    """The lower-left s x s block of each diagonal 2s x 2s block of X (.., n, n), as a view (.., n/2s, s, s)."""
    # (.., n/2s, 2s, 2s) -> (.., n/2s, 2, s, 2, s) -> row half 1, column half 0: (.., n/2s, s, s)
    return _diag_blocks(X, 2 * s).unflatten(-1, (2, s)).unflatten(-3, (2, s))[..., 1, :, 0, :]


def unit_lower_inverse(A: Tensor, base: int = 8) -> Tensor:
    """(I + A)⁻¹ for strictly lower-triangular A (.., C, C) by blocked doubling: invert the diagonal base x base
    blocks with `_inverse_by_doubling`, then merge neighbours, [[L11, 0], [A21, L22]]⁻¹ lower-left = -T2 A21 T1.
    Pure batched matmuls (fast autograd on CPU; linalg.solve_triangular's backward was far slower).
    base 8, not 16: the powers A^(2^j) of a block of near-parallel keys grow large and cancel, and in fp32 a 16x16
    block lost 1.6e-6 of T with Dk = 1 (8x8: 1.4e-7); a property test found it (chunked vs recurrent, 1.2e-5)."""
    C = A.shape[-1]
    Cp = 1 << (C - 1).bit_length()                                     # next power of two >= C
    if Cp != C:                                                         # pad with zeros: block-diag(A, 0), exact
        A = F.pad(A, (0, Cp - C, 0, Cp - C))
    b = min(Cp, base)
    Td = _inverse_by_doubling(torch.tril(_diag_blocks(A, b), diagonal=-1))  # (.., Cp/b, b, b); only these need the mask
    s = b
    while s < Cp:
        T1, T2 = Td.unflatten(-3, (-1, 2)).unbind(-3)                   # (.., m, s, s) each, m = Cp / 2s
        off = -(T2 @ _lower_left_blocks(A, s) @ T1)                     # (.., m, s, s)
        Td = torch.cat([torch.cat([T1, torch.zeros_like(T1)], -1), torch.cat([off, T2], -1)], -2)  # (.., m, 2s, 2s)
        s *= 2
    Tm = Td.squeeze(-3)                                                 # (.., Cp, Cp)
    return Tm[..., :C, :C] if Cp != C else Tm


def _substitute(L: Tensor) -> Tensor:
    """(I + strict_tril(L))⁻¹ by forward substitution, for n small s x s matrices stacked along the LAST axis,
    L (s, s, n): each step is then one vectorised op over all n of them. Column by column, rows i > j take
    X_i -= L_ij X_j (X_j is final by then, and non-zero only in its first j + 1 columns). Only L's strict lower
    triangle is read. Exact up to rounding, as fla's 16x16 blocks are (no large powers of L, unlike doubling)."""
    s = L.shape[0]
    X = torch.eye(s, dtype=L.dtype, device=L.device).unsqueeze(-1).expand(s, s, L.shape[-1]).contiguous()  # (s,s,n)
    for j in range(s - 1):
        X[j + 1:, :j + 1].addcmul_(L[j + 1:, j:j + 1], X[j:j + 1, :j + 1], value=-1.0)  # (s-j-1, j+1, n)
    return X


@torch.no_grad()
def ut_factor(kz: Tensor, bz: Tensor, base: int = 16) -> Tensor:
    """T = (I + A)⁻¹ with A = strict_tril(diag(b) K Kᵀ), for the kernel's no-grad forward. kz (Z,C,Dk), bz (Z,C,1).

    Blocked like `unit_lower_inverse` (merge neighbours: the lower-left block of [[L11, 0], [A21, L22]]⁻¹ is
    -T2 A21 T1, Ti = Lii⁻¹), with two differences that make it cheaper on CPU: the blocks of A are computed from K
    where they are needed (the full C x C product is never formed: 5/8 of it is, at C = 64), and the base x base
    diagonal blocks are inverted exactly by `_substitute`. Equal to `unit_lower_inverse` up to rounding (test)."""
    Z, C, Dk = kz.shape
    Cp = 1 << (C - 1).bit_length()                                     # next power of two >= C
    if Cp != C:                                                         # zero rows (k = 0, b = 0): T = diag(T_C, I)
        kz, bz = F.pad(kz, (0, 0, 0, Cp - C)), F.pad(bz, (0, 0, 0, Cp - C))
    s = min(Cp, base)
    n = Cp // s
    Kd = kz.view(Z, n, s, Dk)                                           # the chunk in n row blocks of s
    Ad = torch.matmul(Kd, Kd.mT).mul_(bz.view(Z, n, s, 1))             # A's diagonal blocks: (Z,n,s,s)
    L = Ad.permute(2, 3, 0, 1).contiguous().view(s, s, Z * n)          # batch last, dense: (s,s,Z·n)
    Td = _substitute(L)                                                 # their inverses: (s,s,Z·n)
    Td = Td.view(s, s, Z, n).permute(2, 3, 0, 1).contiguous()          # T's diagonal blocks: (Z,n,s,s)
    while s < Cp:
        K2, b2 = kz.view(Z, -1, 2, s, Dk), bz.view(Z, -1, 2, s, 1)     # neighbouring row blocks: (Z,m,2,s,.)
        A21 = torch.matmul(K2[:, :, 1], K2[:, :, 0].mT).mul_(b2[:, :, 1])  # lower-left blocks of A: (Z,m,s,s)
        T1, T2 = Td[:, 0::2], Td[:, 1::2]                               # (Z,m,s,s) views, m = Cp / 2s
        merged = Td.new_empty(Z, T1.shape[1], 2 * s, 2 * s)             # (Z,m,2s,2s)
        merged[..., :s, :s] = T1
        merged[..., :s, s:] = 0.0
        merged[..., s:, :s] = torch.matmul(torch.matmul(T2, A21), T1).neg_()  # -T2 A21 T1: (Z,m,s,s)
        merged[..., s:, s:] = T2
        Td, s = merged, 2 * s
    Tm = Td.view(Z, Cp, Cp)                                             # one block (Z,1,Cp,Cp) -> (Z,Cp,Cp)
    return Tm[:, :C, :C] if Cp != C else Tm
