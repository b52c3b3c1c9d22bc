"""Tests for the LaCT op (refine_mini/lact_ops.py) and layer (refine_mini/lact.py).

Invariants from fast-weights.md §5 items 10-15 plus layer-level streaming, causality and gradients.
"""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from refine_mini.lact import LaCT, LaCTState
from refine_mini.lact_ops import (autograd_grads, closed_form_grads, lact_chunked, lact_reference,
                                  newton_schulz5, swiglu_fw)

F64 = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_op_inputs(B, H, T, d, h, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    eta = torch.rand(B, H, T, 3, generator=g, dtype=dtype) * 0.5
    m = torch.rand(B, H, T, generator=g, dtype=dtype)
    w0, w1, w2 = r(B, H, h, d) / d ** 0.5, r(B, H, d, h) / h ** 0.5, r(B, H, h, d) / d ** 0.5
    return q, k, v, eta, m, (w0, w1, w2)


def run_chunked(q, k, v, eta, m, ws, C, splits=(), use_momentum=True, use_muon=False):
    """lact_chunked over the segments given by split points; returns o (B,H,T,d) and final weights."""
    B, H, _, d = q.shape
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in ws)
    moms = tuple(torch.zeros_like(w) for w in ws)
    buf = (q.new_zeros(B, H, 0, d), q.new_zeros(B, H, 0, d), q.new_zeros(B, H, 0, 3), q.new_zeros(B, H, 0))
    bounds = [0, *splits, q.shape[2]]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = slice(lo, hi)
        o, ws, moms, buf, _ = lact_chunked(q[:, :, s], k[:, :, s], v[:, :, s], eta[:, :, s], m[:, :, s],
                                        ws, moms, norms, buf, C, use_momentum, use_muon)
        outs.append(o)
    return torch.cat(outs, 2), ws


def make_layer(seed, use_momentum=True, use_muon=False, C=3, window=4, D=16, Ha=2, Hf=2, dtype=F64):
    torch.manual_seed(seed)
    layer = LaCT(D, Ha, Hf, chunk_size=C, window=window, use_momentum=use_momentum, use_muon=use_muon)
    with torch.no_grad():  # larger than the 0.02 init so that every branch visibly matters
        for name, p in layer.named_parameters():
            if not name.endswith("_init"):
                p.add_(0.3 * torch.randn_like(p))
    return layer.to(dtype)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 9), d=st.integers(2, 7),
       mult=st.integers(1, 2), seed=st.integers(0, 10 ** 6))
def test_closed_form_grads_match_autograd(B, H, N, d, mult, seed):
    """Closed-form G0/G1/G2 == torch.func.grad of sum_i eta_ji <f_W(k_i), v_i> (fp64)."""
    _, k, v, eta, _, ws = make_op_inputs(B, H, N, d, d * mult, seed)
    for a, b in zip(closed_form_grads(*ws, k, v, eta), autograd_grads(*ws, k, v, eta)):
        assert a.shape == b.shape and rel(a, b) < 1e-10


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 20), C=st.integers(1, 6), mom=st.booleans(), muon=st.booleans(),
       seed=st.integers(0, 10 ** 6), data=st.data())
def test_streaming_op_matches_reference(T, C, mom, muon, seed, data):
    """Chunked op on any segmentation == the autograd per-chunk reference (outputs and final weights)."""
    q, k, v, eta, m, ws = make_op_inputs(2, 2, T, 4, 4, seed)
    splits = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4)) if T > 1 else [])
    o, w_final = run_chunked(q, k, v, eta, m, ws, C, splits, mom, muon)
    o_ref, w_ref = lact_reference(q, k, v, eta, m, *ws, C, mom, muon)
    assert rel(o, o_ref) < 1e-10
    tol = 1e-9 if muon else 1e-10  # five Newton-Schulz iterations per chunk amplify fp64 rounding ~10x
    for a, b in zip(w_final, w_ref):
        assert rel(a, b) < tol


@pytest.mark.parametrize("b", [0, 1, 2])
def test_apply_then_update_locality(b):
    """Changing k, v, eta, m inside chunk b leaves outputs of chunks <= b bitwise unchanged (not later ones)."""
    C, n_chunks = 4, 4
    q, k, v, eta, m, ws = make_op_inputs(1, 2, C * n_chunks, 5, 5, seed=b)
    o, _ = run_chunked(q, k, v, eta, m, ws, C)
    s = slice(b * C, (b + 1) * C)
    k2, v2, eta2, m2 = k.clone(), v.clone(), eta.clone(), m.clone()
    k2[:, :, s] = torch.randn_like(k2[:, :, s])
    v2[:, :, s] += 1.0
    eta2[:, :, s] *= 3.0
    m2[:, :, s] = 1 - m2[:, :, s]
    o2, _ = run_chunked(q, k2, v2, eta2, m2, ws, C)
    assert torch.equal(o[:, :, : (b + 1) * C], o2[:, :, : (b + 1) * C])
    assert not torch.allclose(o[:, :, (b + 1) * C:], o2[:, :, (b + 1) * C:])


@pytest.mark.parametrize("T,C", [(5, 5), (5, 8), (1, 1)])
def test_chunk_ge_T_is_initial_weights(T, C):
    """C >= T: the fast path's output is exactly f_{W_init}(q)."""
    q, k, v, eta, m, ws = make_op_inputs(2, 3, T, 6, 6, seed=T + C)
    o, _ = run_chunked(q, k, v, eta, m, ws, C)
    assert torch.equal(o, swiglu_fw(*ws, q))


@pytest.mark.parametrize("muon", [False, True])
def test_row_norms_preserved(muon):
    """After every update each row of W0, W1, W2 has its initial norm up to the 1e-5 eps (rel < 1e-4)."""
    C = 3
    q, k, v, eta, m, ws = make_op_inputs(2, 2, 4 * C, 4, 8, seed=7)
    eta = eta * 20  # large steps so that un-normalised rows would drift
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in ws)  # targets from the initial weights, fixed
    moms = tuple(torch.zeros_like(w) for w in ws)
    buf = (q[:, :, :0], k[:, :, :0], eta[:, :, :0], m[:, :, :0])
    w_now = ws
    for c in range(4):  # one complete chunk per call -> one update per call
        s = slice(c * C, (c + 1) * C)
        _, w_now, moms, buf, _ = lact_chunked(q[:, :, s], k[:, :, s], v[:, :, s], eta[:, :, s], m[:, :, s],
                                           w_now, moms, norms, buf, C, True, muon)
        for w, n in zip(w_now, norms):
            assert ((w.norm(dim=-1, keepdim=True) - n).abs() / n).max() < 1e-4
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(w_now, ws))


def test_momentum_zero_equals_no_momentum():
    """m = 0 with momentum on gives the same outputs and weights as momentum off."""
    q, k, v, eta, m, ws = make_op_inputs(2, 2, 17, 4, 4, seed=3)
    o_a, w_a = run_chunked(q, k, v, eta, torch.zeros_like(m), ws, 4, (5, 11), use_momentum=True)
    o_b, w_b = run_chunked(q, k, v, eta, m, ws, 4, (5, 11), use_momentum=False)
    assert rel(o_a, o_b) < 1e-12 and all(rel(a, b) < 1e-12 for a, b in zip(w_a, w_b))
    o_c, _ = run_chunked(q, k, v, eta, m, ws, 4, (5, 11), use_momentum=True)
    assert rel(o_c, o_b) > 1e-6  # momentum actually does something


def test_zero_learning_rates_keep_the_initial_weights():
    """eta = 0: every update is zero, so the output is f_{W_init}(q) up to the row-norm eps (1e-5) per chunk."""
    q, k, v, eta, m, ws = make_op_inputs(2, 2, 17, 4, 8, seed=5)
    o, _ = run_chunked(q, k, v, torch.zeros_like(eta), m, ws, 4)
    assert rel(o, swiglu_fw(*ws, q)) < 1e-4
    assert rel(run_chunked(q, k, v, eta, m, ws, 4)[0], swiglu_fw(*ws, q)) > 1e-3  # eta != 0 does move them


def test_newton_schulz5_on_low_rank_input_lifts_only_the_non_zero_directions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    sv = torch.linalg.svdvals(newton_schulz5(x))  # rank 3
    assert bool(((sv[:3] > 0.97) & (sv[:3] < 1.04)).all()) and sv[3:].max() < 1e-6


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 16, 48), (48, 16)])
def test_newton_schulz5(shape):
    """NS5 keeps the shape; non-zero singular values of a rectangular input land in [0.97, 1.04]."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    y = newton_schulz5(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    sv = torch.linalg.svdvals(y)
    assert sv.min() > 0.97 and sv.max() < 1.04


def test_window_smaller_than_chunk_raises():
    with pytest.raises(ValueError):
        LaCT(16, 2, 2, chunk_size=8, window=4)


def segments_strategy(T):
    return st.sets(st.integers(1, T - 1), max_size=T - 1).map(sorted) if T > 1 else st.just([])


def run_layer(layer, x, splits):
    bounds, state, ys = [0, *splits, x.shape[1]], None, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        y, state = layer(x[:, lo:hi], state)
        ys.append(y)
    return torch.cat(ys, 1), state


def assert_states_close(a: LaCTState, b: LaCTState, tol):
    for f in dataclasses.fields(LaCTState):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert va.shape == vb.shape and va.shape[0] == vb.shape[0], f.name
            assert va.numel() == 0 or (va - vb).abs().max() <= tol * (1 + vb.abs().max()), f.name
        else:
            assert va == vb, f.name


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 16), C=st.integers(1, 4), extra=st.integers(0, 3), mom=st.booleans(),
       seed=st.integers(0, 10 ** 6), data=st.data())
def test_layer_streaming_equals_full(T, C, extra, mom, seed, data):
    """Any segmentation of the layer input gives the full pass's outputs and final state (fp64)."""
    layer = make_layer(seed % 1000, use_momentum=mom, C=C, window=C + extra)
    x = torch.randn(2, T, 16, dtype=F64, generator=torch.Generator().manual_seed(seed))
    y_full, s_full = layer(x)
    y_seg, s_seg = run_layer(layer, x, data.draw(segments_strategy(T)))
    assert rel(y_seg, y_full) < 1e-10
    assert_states_close(s_seg, s_full, 1e-10)
    y_tok, s_tok = run_layer(layer, x, list(range(1, T)))  # token by token
    assert rel(y_tok, y_full) < 1e-10
    assert_states_close(s_tok, s_full, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_layer_streaming_with_muon(dtype, tol):
    """Streaming == full pass with Muon on (NS5 in the working dtype on CPU)."""
    layer = make_layer(1, use_muon=True, C=3, window=5, dtype=dtype)
    x = torch.randn(1, 23, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y_full, s_full = layer(x)
    for splits in ([1, 2, 7, 12, 13, 20], list(range(1, 23))):
        y_seg, s_seg = run_layer(layer, x, splits)
        assert rel(y_seg, y_full) < tol
        assert_states_close(s_seg, s_full, tol)


@pytest.mark.parametrize("t0", [1, 6, 10])
def test_layer_causality(t0):
    """Perturbing inputs at t >= t0 leaves outputs before t0 unchanged (SWA and TTT branch)."""
    layer = make_layer(2, C=4, window=5)
    x = torch.randn(2, 14, 16, dtype=F64, generator=torch.Generator().manual_seed(t0))
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:])
    y, _ = layer(x)
    y2, _ = layer(x2)
    assert torch.allclose(y[:, :t0], y2[:, :t0], rtol=0, atol=1e-13)
    assert not torch.allclose(y[:, t0:], y2[:, t0:])


def test_layer_long_sequence_blockwise_attention():
    """A 2K-token pass runs blockwise (memory O(T w)), equals a 3-segment stream and keeps window-1 keys."""
    layer = make_layer(3, C=16, window=32, dtype=torch.float32)
    x = torch.randn(1, 2048, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, s = layer(x)
        y2, s2 = run_layer(layer, x, [700, 1500])
    assert torch.isfinite(y).all() and rel(y2, y) < 1e-5
    assert s.swa_k.shape == (1, 31, 2, 8) and s.buf_k.shape[1] == 0 and s.pos == 2048


@pytest.mark.parametrize("muon", [False, True])
def test_layer_gradients_full_equal_two_segments(muon):
    """Slow-parameter gradients are finite and equal between one pass and a 2-segment stream with state grads."""
    layer = make_layer(4, use_muon=muon, C=3, window=4)
    x = torch.randn(2, 13, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    r = torch.randn(2, 13, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    params = list(layer.parameters())
    y_full, _ = layer(x)
    g_full = torch.autograd.grad((y_full * r).sum(), params)
    y_seg, _ = run_layer(layer, x, [5])
    g_seg = torch.autograd.grad((y_seg * r).sum(), params)
    for (name, _), a, b in zip(layer.named_parameters(), g_full, g_seg):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-9, name
        if name.startswith(("w0_init", "w1_init", "lr_proj", "momentum_proj")):
            assert a.abs().max() > 0, name  # gradients flow through the fast-weight updates
