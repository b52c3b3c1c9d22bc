"""Tests of the DeltaNet layer (fast-weights.md §2): any split of a sequence, prefill then decode included, equals one
call; both sides of the recurrent/chunked kernel switch agree; causality, the conv cache, gradients to the parameters
and the incoming state. The kernels themselves: test_deltanet.py.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refine_mini.deltanet import DeltaNet, DeltaNetState
from tests.test_deltanet import F32, F64, rel


def make_layer(recurrent_below=64, chunk_size=8, Dk=6, Dv=5, conv_size=4):
    torch.manual_seed(0)
    layer = DeltaNet(d_model=12, n_heads=2, head_dim_k=Dk, head_dim_v=Dv, chunk_size=chunk_size,
                     recurrent_below=recurrent_below, conv_size=conv_size).double()
    with torch.no_grad():                       # larger weights than the 0.02 init so the test sees real signal
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


@given(T=st.integers(2, 80), data=st.data(), below=st.sampled_from([0, 5, 64]), conv=st.sampled_from([1, 2, 4]))
def test_layer_streaming_equals_full(T, data, below, conv):
    """Any segmentation of a sequence (state carried, conv gets its cached left context, an empty one at conv size
    1, where the slice ctx[:, -(W-1):] would keep everything) == one full call."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), max_size=4), label="cuts")))
    layer = make_layer(recurrent_below=below, conv_size=conv)
    x = torch.randn(2, T, 12, dtype=F64, generator=torch.Generator().manual_seed(T))
    y_full, st_full = layer(x)
    ys, state = [], None
    for a, b in zip([0] + cuts, cuts + [T]):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    assert rel(torch.cat(ys, 1), y_full) < 1e-10 and rel(state.S, st_full.S) < 1e-10
    assert rel(state.conv, st_full.conv) < 1e-12


def test_layer_prefill_then_decode():
    """Prefill (chunked path, T > recurrent_below) then token-by-token decode == one full call."""
    layer = make_layer(recurrent_below=16)
    x = torch.randn(2, 40, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    y_full, st_full = layer(x)
    y, state = layer(x[:, :25])
    ys = [y]
    for t in range(25, 40):
        y, state = layer(x[:, t:t + 1], state)
        ys.append(y)
    assert rel(torch.cat(ys, 1), y_full) < 1e-10 and rel(state.S, st_full.S) < 1e-10
    assert state.S.shape == (2, 2, 6, 5) and state.conv.shape == (2, 3, 2 * 12 + 10)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 100])
def test_layer_kernel_switch_agrees(T):
    """Both sides of the recurrent/chunked switch agree (fp32; recurrent_below 0, 10**9 and the default 8)."""
    torch.manual_seed(0)
    x = torch.randn(2, T, 32)
    chunked = DeltaNet(32, 2, recurrent_below=0)
    recurrent = DeltaNet(32, 2, recurrent_below=10**9)
    default = DeltaNet(32, 2)
    recurrent.load_state_dict(chunked.state_dict())
    default.load_state_dict(chunked.state_dict())
    (yc, sc), (yr, sr), (yd, sd) = chunked(x), recurrent(x), default(x)
    assert rel(yc, yr) < 1e-5 and rel(sc.S, sr.S) < 1e-5 and rel(yd, yr) < 1e-5
    assert sc.S.dtype == F32


def test_layer_causality_and_conv_cache():
    """Perturbing x at t' leaves y_{<t'} unchanged; the conv cache is the last W-1 pre-conv inputs,
    left zero-padded when fewer tokens were seen."""
    layer = make_layer(recurrent_below=0)
    x = torch.randn(1, 30, 12, dtype=F64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 17:] += 1.0
    y2, _ = layer(x2)
    assert (y2[:, :17] - y[:, :17]).abs().max() <= 1e-12 and (y2[:, 17:] - y[:, 17:]).abs().max() > 1e-3
    _, state = layer(x[:, :1])
    proj = torch.cat([layer.q_proj(x[:, :1]), layer.k_proj(x[:, :1]), layer.v_proj(x[:, :1])], -1)
    assert torch.equal(state.conv[:, :2], torch.zeros_like(state.conv[:, :2]))
    assert torch.allclose(state.conv[:, 2:], proj)
    assert isinstance(state, DeltaNetState)


def test_layer_gradients_flow_to_params_and_state():
    """The layer is differentiable w.r.t. its parameters and the incoming state (as REFINE training needs)."""
    layer = make_layer(recurrent_below=4)
    x = torch.randn(2, 11, 12, dtype=F64)
    S0 = torch.randn(2, 2, 6, 5, dtype=F64, requires_grad=True)
    conv0 = torch.randn(2, 3, 34, dtype=F64, requires_grad=True)
    y, state = layer(x, DeltaNetState(S=S0, conv=conv0))
    (y.square().sum() + state.S.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert S0.grad.abs().sum() > 0 and conv0.grad.abs().sum() > 0
    assert math.isfinite(y.sum().item())
