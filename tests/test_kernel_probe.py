"""Inputs an outside probe of the kernels and layers found accepted without a word (fast-weights.md §5 item 9):

- integer or complex q, k, v, beta or S0: the kernels cast them, and an integer q TRUNCATED the outputs to integers
  (o.to(q.dtype)); a complex input dropped its imaginary part with only a warning;
- inputs or a state on another device than q: the chunked kernel returned a state on the state's device ("meta"
  here, standing in for another accelerator) and outputs on q's, without computing anything meaningful;
- a DeltaNet state whose S or conv is not a floating tensor on x's device (before: AttributeError, a RuntimeError
  from inside torch.cat, or an integer S silently accepted);
- a LaCT state whose fields disagree: buffers of different lengths (keys then silently paired with the wrong
  values), momenta or norms of the wrong shape (BROADCAST over heads, silently), a position that does not fit the
  buffered partial chunk (chunks cut at the wrong tokens) or the window.
Each is now a ValueError naming what was expected, while every well-formed input still computes what it did.
"""
import dataclasses

import pytest
import torch

from refine_mini.deltanet import DeltaNet, DeltaNetState
from refine_mini.delta_rule import delta_rule_chunked, delta_rule_recurrent
from refine_mini.lact import LaCT
from refine_mini.lact_ops import lact_chunked
from tests.test_deltanet import inputs, rel

KERNELS = {"recurrent": lambda *xs, **kw: delta_rule_recurrent(*xs, **kw),
           "chunked": lambda *xs, **kw: delta_rule_chunked(*xs, chunk_size=4, **kw)}
NAMES = ("q", "k", "v", "beta", "initial_state")


def call(kernel, xs):
    return KERNELS[kernel](*xs[:4], initial_state=xs[4])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_kernels_refuse_inputs_that_are_not_floating_point(kernel, which, dtype):
    xs = list(inputs(1, 2, 9, 4, 3, dtype=torch.float32))
    xs[which] = (xs[which] * 3).to(dtype)
    with pytest.raises(ValueError, match=f"{NAMES[which]} must be a floating-point tensor"):
        call(kernel, xs)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("which", range(1, 5))
def test_kernels_refuse_inputs_on_another_device(kernel, which):
    xs = list(inputs(1, 2, 9, 4, 3, dtype=torch.float32))
    xs[which] = xs[which].to("meta")
    with pytest.raises(ValueError, match=f"{NAMES[which]} is on meta, q on cpu"):
        call(kernel, xs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_floating_dtypes_are_still_accepted_and_computed_in_fp32(kernel):
    """The guards refuse only what cannot be right: bf16 q with an fp64 state, an fp16 v, a bf16 beta compute in
    fp32 and equal the fp32 kernel on the same (rounded) values; the state comes back fp32."""
    xs = inputs(1, 2, 11, 4, 3, dtype=torch.float32)
    dts = (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float64)
    mixed = [x.to(dt) for x, dt in zip(xs, dts)]
    o, S = call(kernel, mixed)
    o_ref, S_ref = delta_rule_recurrent(*(x.float() for x in mixed[:4]), initial_state=mixed[4].float())
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel(o.float(), o_ref.to(torch.bfloat16).float()) < 1e-2 and rel(S, S_ref) < 1e-5


def dn_state():
    torch.manual_seed(0)
    layer = DeltaNet(16, 2, chunk_size=4, recurrent_below=2)
    x = torch.randn(2, 9, 16)
    return layer, x, layer(x[:, :5])[1]


@pytest.mark.parametrize("edit", ["S_int", "S_meta", "conv_meta", "conv_int", "S_none"])
def test_deltanet_refuses_a_state_of_the_wrong_dtype_or_device(edit):
    layer, x, state = dn_state()
    field, how = edit.split("_")
    value = getattr(state, field)
    value = {"int": lambda: value.long(), "meta": lambda: value.to("meta"), "none": lambda: None}[how]()
    with pytest.raises(ValueError, match=f"DeltaNetState.{field} must be a floating-point tensor on cpu"):
        layer(x[:, 5:], dataclasses.replace(state, **{field: value}))
    y, _ = layer(x[:, 5:], state)  # the untouched state still continues the pass exactly
    assert rel(y, layer(x)[0][:, 5:]) < 1e-5


def lact_state():
    torch.manual_seed(0)
    layer = LaCT(16, 2, 2, chunk_size=4, window=6)
    x = torch.randn(2, 15, 16)
    return layer, x, layer(x[:, :10])[1]  # pos 10: 2 tokens buffered, 5 window keys


LACT_EDITS = {
    "buf_k shorter than buf_v": lambda s: dict(buf_k=s.buf_k[:, :1]),
    "all buffers one token short": lambda s: dict(buf_k=s.buf_k[:, :1], buf_v=s.buf_v[:, :1],
                                                  buf_eta=s.buf_eta[:, :1], buf_m=s.buf_m[:, :1]),
    "m0 of one head": lambda s: dict(m0=s.m0[:, :1]),
    "n0 of one row": lambda s: dict(n0=s.n0[:, :, :1]),
    "w1 narrower": lambda s: dict(w1=s.w1[..., :-1]),
    "swa_v shorter than swa_k": lambda s: dict(swa_v=s.swa_v[:, :2]),
    "pos off the buffer": lambda s: dict(pos=s.pos + 1),
    "negative pos": lambda s: dict(pos=-2),
    "float pos": lambda s: dict(pos=10.0),
    "w0 on meta": lambda s: dict(w0=s.w0.to("meta")),
    "m2 integer": lambda s: dict(m2=s.m2.long()),
    "buf_m missing": lambda s: dict(buf_m=None),
}


@pytest.mark.parametrize("edit", LACT_EDITS)
def test_lact_refuses_a_state_whose_fields_do_not_fit(edit):
    layer, x, state = lact_state()
    with pytest.raises(ValueError, match="LaCTState"):
        layer(x[:, 10:], dataclasses.replace(state, **LACT_EDITS[edit](state)))


def test_lact_well_formed_states_still_continue_the_pass():
    """From the start, mid-chunk, after a whole chunk, one token at a time, and a state reused twice (unchanged)."""
    layer, x, state = lact_state()
    full = layer(x)[0]
    before = [t.clone() for t in (state.w0, state.buf_k, state.swa_k)]
    for _ in range(2):
        assert rel(layer(x[:, 10:], state)[0], full[:, 10:]) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, (state.w0, state.buf_k, state.swa_k)))
    s, ys = None, []
    for t in range(15):
        y, s = layer(x[:, t:t + 1], s)
        ys.append(y)
    assert rel(torch.cat(ys, 1), full) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: a state carried across calls is accepted
        ya, sa = layer(x[:, :8])
        yb, _ = layer(x[:, 8:], sa)
        assert rel(torch.cat([ya, yb], 1).float(), layer(x)[0].float()) < 1e-5


@pytest.mark.parametrize("edit", ["int q", "complex v", "meta k", "int w1", "meta momentum"])
def test_lact_op_refuses_inputs_that_are_not_floating_or_on_another_device(edit):
    """lact_chunked cast an integer q too, and returned o.to(q.dtype): outputs truncated to integers."""
    torch.manual_seed(0)
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 2, 6, 4), dim=-1) for _ in range(3))
    eta, m = torch.rand(1, 2, 6, 3), torch.rand(1, 2, 6)
    ws = [torch.randn(1, 2, 8, 4), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 8, 4)]
    ms, ns = [torch.zeros_like(w) for w in ws], [w.norm(dim=-1, keepdim=True) for w in ws]
    buf = (k[:, :, :0], v[:, :, :0], eta[:, :, :0], m[:, :, :0])
    o, *_ = lact_chunked(q, k, v, eta, m, ws, ms, ns, buf, 4)  # well formed: computes
    assert o.dtype == torch.float32 and o.isfinite().all()
    if edit == "int q":
        q = (q * 4).long()
    elif edit == "complex v":
        v = v.to(torch.complex64)
    elif edit == "meta k":
        k = k.to("meta")
    elif edit == "int w1":
        ws[1] = ws[1].long()
    else:
        ms[0] = ms[0].to("meta")
    with pytest.raises(ValueError, match="floating-point tensors on one device"):
        lact_chunked(q, k, v, eta, m, ws, ms, ns, buf, 4)
