"""Kernel contracts the property tests did not pin (found by mutation testing of delta_rule*.py, ut_factor.py,
lact_ops.py): gradients when only ONE input requires grad (the kernel decides from q, k, v, beta and S0 whether to
save for backward), chunk states edited in place by the caller, lact_chunked's output dtype and buffer check, and
the edges an outside probe found (empty batch, numpy chunk sizes, keyword-only calls, head dimensions of 0). Every
one holds for any correct kernel (the teaching table lists this file); the memory of our schedule is pinned in
test_kernel_memory.py.
"""
import numpy as np
import pytest
import torch

from refine_mini.delta_rule import delta_rule_chunked, delta_rule_recurrent
from refine_mini.lact_ops import lact_chunked
from tests.test_deltanet import inputs, rel
from tests.test_lact import make_op_inputs, run_chunked


@pytest.mark.parametrize("only", ["q", "k", "v", "beta", "S0"])
def test_gradient_when_a_single_input_requires_grad(only):
    """Only one of q, k, v, beta, S0 requires grad (e.g. a state carried from a detached prefix): the chunked
    kernel's gradient w.r.t. it equals the recurrence's (fp64, ragged last chunk, loss on o and the final state)."""
    xs = inputs(2, 2, 11, 3, 4, seed=1)
    i = "q k v beta S0".split().index(only)
    xs[i].requires_grad_()
    grads = []
    for fn in (delta_rule_recurrent, lambda *a, **kw: delta_rule_chunked(*a, chunk_size=4, **kw)):
        o, S = fn(*xs[:4], initial_state=xs[4])
        grads.append(torch.autograd.grad(o.square().sum() + (S * S.detach()).sum(), xs[i]))
    assert rel(grads[1][0], grads[0][0]) < 1e-10


def test_chunk_states_edited_in_place_leave_the_gradients_intact():
    """The states returned by chunk_states=True are the caller's: editing them in place must neither raise nor reach
    the tensors the backward saved. Gradients of a loss on o and S are then those of the recurrence."""
    xs = inputs(1, 2, 11, 3, 2, grad=True)
    o, S, hs = delta_rule_chunked(*xs[:4], chunk_size=4, initial_state=xs[4], chunk_states=True)
    hs.mul_(2.0)
    g = torch.autograd.grad(o.square().sum() + S.sum(), xs)
    o_r, S_r = delta_rule_recurrent(*xs[:4], initial_state=xs[4])
    g_r = torch.autograd.grad(o_r.square().sum() + S_r.sum(), xs)
    for name, a, b in zip("q k v beta S0".split(), g, g_r):
        assert rel(a, b) < 1e-12, name


def test_lact_output_is_in_the_query_dtype():
    """lact_chunked works in the fast weights' dtype and returns o in q's: bf16 queries with fp32 weights give
    exactly the fp32 computation rounded to bf16 (the same op on the up-cast queries)."""
    q, k, v, eta, m, ws = make_op_inputs(1, 2, 10, 4, 8, seed=2, dtype=torch.float32)
    o16, w16 = run_chunked(q.bfloat16(), k, v, eta, m, ws, 4)
    o32, w32 = run_chunked(q.bfloat16().float(), k, v, eta, m, ws, 4)
    assert o16.dtype == torch.bfloat16 and torch.equal(o16, o32.bfloat16())
    assert all(torch.equal(a, b) for a, b in zip(w16, w32))


def test_lact_buffer_of_a_whole_chunk_raises():
    """A buffered partial chunk holds < C tokens (a complete one would have been used for an update): a buffer of
    exactly C tokens is refused."""
    q, k, v, eta, m, ws = make_op_inputs(1, 1, 6, 4, 4, seed=3)
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in ws)
    moms = tuple(torch.zeros_like(w) for w in ws)
    buf = (k[:, :, :3], v[:, :, :3], eta[:, :, :3], m[:, :, :3])
    with pytest.raises(ValueError, match="buffer holds 3 tokens"):
        lact_chunked(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], eta[:, :, 3:], m[:, :, 3:], ws, moms, norms, buf, 3)


@pytest.mark.parametrize("bad", [np.int64(0), np.float64(8.0), "8"])
def test_chunk_size_must_be_an_integer(bad):
    """numpy integers count as ints (operator.index), numpy floats and strings do not."""
    q, k, v, b, _ = inputs(1, 1, 5, 2, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunked(q, k, v, b, chunk_size=bad)


def test_numpy_chunk_size_and_empty_batch():
    """A numpy integer chunk size is an int; an empty batch (B = 0 or H = 0) gives empty outputs as the recurrence
    does, instead of dividing by B·H; keyword-only calls work (autocast_off finds the device in the keywords)."""
    q, k, v, b, S0 = inputs(1, 2, 11, 3, 2)
    o, S = delta_rule_chunked(q, k, v, b, chunk_size=np.int64(4), initial_state=S0)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, b, initial_state=S0)
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10
    o_kw, _ = delta_rule_chunked(q=q, k=k, v=v, beta=b, chunk_size=4, initial_state=S0)
    assert torch.equal(o_kw, o)
    for xs in ([x[:0] for x in (q, k, v, b, S0)], [x[:, :0] for x in (q, k, v, b, S0)]):  # B = 0, then H = 0
        o, S, hs = delta_rule_chunked(*xs[:4], chunk_size=4, initial_state=xs[4], chunk_states=True)
        B, H = xs[0].shape[:2]
        assert o.shape == (B, H, 11, 2) and S.shape == (B, H, 3, 2) and hs.shape == (B, H, 3, 3, 2)


def test_lact_checks_its_shapes_and_chunk_size_and_computes_in_fp32():
    """lact_chunked with k, v, eta, m shorter than q dropped q's last outputs silently; a chunk size of 0 was
    reported as a buffer error. Both are ValueErrors now. bf16 fast weights are up-cast (the op's math runs in
    fp32 at least, as its docstring says): the same numbers as fp32 copies of them, fp32 weights returned."""
    q, k, v, eta, m, ws = make_op_inputs(1, 2, 10, 4, 8, seed=4, dtype=torch.float32)
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in ws)
    moms = tuple(torch.zeros_like(w) for w in ws)
    buf = (k[:, :, :0], v[:, :, :0], eta[:, :, :0], m[:, :, :0])
    with pytest.raises(ValueError, match="must match q's"):
        lact_chunked(q, k[:, :, :5], v[:, :, :5], eta[:, :, :5], m[:, :, :5], ws, moms, norms, buf, 4)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="chunk_size must be an int"):
            lact_chunked(q, k, v, eta, m, ws, moms, norms, buf, bad)
    w16 = tuple(w.bfloat16() for w in ws)
    o16, w_out, *_ = lact_chunked(q, k, v, eta, m, w16, moms, norms, buf, 4)
    o32, w_ref, *_ = lact_chunked(q, k, v, eta, m, tuple(w.float() for w in w16), moms, norms, buf, 4)
    assert torch.equal(o16, o32) and all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(w_out, w_ref))


def test_keyword_only_calls_switch_autocast_off_too():
    """autocast_off finds the device in keyword arguments as well: a keyword-only call under CPU bf16 autocast gives
    the fp32 numbers bit for bit (before, it raised StopIteration, which map() swallows: results silently vanished)."""
    q, k, v, b, S0 = inputs(1, 2, 11, 4, 3, dtype=torch.float32)
    o_ref, _ = delta_rule_chunked(q, k, v, b, chunk_size=4, initial_state=S0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = list(map(lambda x: delta_rule_chunked(q=x, k=k, v=v, beta=b, chunk_size=4, initial_state=S0)[0], [q]))
    assert len(got) == 1 and torch.equal(got[0], o_ref)


def test_second_derivatives_raise_or_are_right():
    """A second derivative through the chunked kernel is never silently wrong: ours (a hand-written backward) raises
    RuntimeError "not twice differentiable", whatever the loss; a kernel differentiated by autograd (a student's)
    must give the recurrence's Hessian-vector product. (once_differentiable alone let o.sum() through with a
    graph-less gradient, and a loss with a second path to q got a second derivative missing the kernel's terms.)"""
    q, k, v, b, S0 = inputs(1, 1, 9, 3, 2, grad=True)
    losses = (lambda o, S: o.square().sum() + S.sum(), lambda o, S: o.sum(), lambda o, S: o.sum() + q.square().sum())
    for loss in losses:
        o, S = delta_rule_chunked(q, k, v, b, chunk_size=4, initial_state=S0)
        try:
            (gq,) = torch.autograd.grad(loss(o, S), q, create_graph=True)
        except RuntimeError as e:
            assert "not twice differentiable" in str(e)
            continue
        o_r, S_r = delta_rule_recurrent(q, k, v, b, initial_state=S0)
        (gq_r,) = torch.autograd.grad(loss(o_r, S_r), q, create_graph=True)
        for x in (q, k, v):
            assert rel(torch.autograd.grad(gq.sum(), x, retain_graph=True, materialize_grads=True)[0],
                       torch.autograd.grad(gq_r.sum(), x, retain_graph=True, materialize_grads=True)[0]) < 1e-10
    o, S = delta_rule_chunked(q, k, v, b, chunk_size=4, initial_state=S0)
    (gq,) = torch.autograd.grad(o.square().sum(), q)  # a plain backward still works
    assert gq.shape == q.shape and bool(gq.abs().sum() > 0)
