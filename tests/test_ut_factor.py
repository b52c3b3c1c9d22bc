"""Tests of the UT factor T = (I + A)⁻¹, A = strict_tril(diag(b) K Kᵀ) (refine_mini/ut_factor.py; fast-weights.md
§1.2 step 2): its identities with the WY form, and the kernel's no-grad `ut_factor` against the exact inverse and the
differentiable `unit_lower_inverse`.
"""
import pytest
import torch

from refine_mini.deltanet import delta_rule_recurrent
from refine_mini.ut_factor import unit_lower_inverse, ut_factor
from tests.test_deltanet import F32, F64, inputs, rel


@pytest.mark.parametrize("C", [1, 2, 5, 16, 24, 64])
def test_ut_identities(C):
    """(I + A) T = I; I − KᵀW == ordered product of (I − b k kᵀ) (newest left); KᵀU == chunk recurrence from 0."""
    _, k, v, b, _ = inputs(1, 1, C, 8, 3, seed=C)
    k, v, b = k[0, 0], v[0, 0], b[0, 0]                      # (C,Dk), (C,Dv), (C,)
    A = torch.tril(b[:, None] * (k @ k.T), -1)               # (C,C)
    Tm = unit_lower_inverse(A[None])[0]                      # (C,C)
    eye_c, eye_k = torch.eye(C, dtype=F64), torch.eye(8, dtype=F64)
    assert (((eye_c + A) @ Tm) - eye_c).abs().max() < 1e-12
    assert torch.equal(torch.triu(Tm, 1), torch.zeros_like(Tm)) and torch.equal(Tm.diagonal(), torch.ones(C, dtype=F64))
    W, U = Tm @ (b[:, None] * k), Tm @ (b[:, None] * v)      # (C,Dk), (C,Dv)
    P = eye_k
    for i in range(C):
        P = (eye_k - b[i] * torch.outer(k[i], k[i])) @ P
    assert (eye_k - k.T @ W - P).abs().max() < 1e-12
    _, S_rec = delta_rule_recurrent(*(x[None, None] for x in (k, k, v, b)))
    assert (k.T @ U - S_rec[0, 0]).abs().max() < 1e-12


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8, 9, 16, 17, 24, 64, 100])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_ut_factor_equals_the_autograd_inverse(C, dtype):
    """The kernel's no-grad UT factor (A's blocks from K, substituted base blocks) is unit lower-triangular and equals
    (I + A)⁻¹ to rounding, also with Dk = 1 (all keys parallel: where blocked doubling lost fp32 precision), and it
    equals the autograd version `unit_lower_inverse` (the one the reference schedule differentiates)."""
    for Dk in (8, 1):
        _, k, _, b, _ = inputs(3, 2, C, Dk, 1, dtype=dtype, seed=C)
        kz, bz = k.reshape(6, C, Dk), b.reshape(6, C, 1)
        A = torch.tril(bz * (kz @ kz.mT), -1)                             # (6,C,C)
        Tm = ut_factor(kz, bz)
        eye = torch.eye(C, dtype=dtype)
        assert Tm.shape == (6, C, C) and torch.equal(torch.triu(Tm, 1), torch.zeros_like(Tm))
        assert torch.equal(Tm.diagonal(dim1=-2, dim2=-1), torch.ones(6, C, dtype=dtype))
        exact = torch.linalg.inv(eye.double() + A.double())
        assert (Tm.double() - exact).abs().max() < (1e-12 if dtype == F64 else 1e-6)
        assert rel(Tm, unit_lower_inverse(A)) < (1e-13 if dtype == F64 else 1e-5)
