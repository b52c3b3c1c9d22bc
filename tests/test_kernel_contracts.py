"""Kernel contracts the property tests did not pin (found by mutation testing of delta_rule*.py, ut_factor.py,
lact_ops.py): gradients when only ONE input requires grad (the kernel decides from q, k, v, beta and S0 whether to
save for backward), chunk states edited in place by the caller, the no-grad forward's memory (T and W let go: peak
4x the output, not 6x), and lact_chunked's output dtype and buffer check.
"""
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


def test_no_grad_forward_lets_go_of_what_only_the_backward_needs():
    """Under torch.no_grad() the forward's peak tensor memory is 4x the output o plus one state per head (T and W
    freed once used, nothing saved), also when the inputs require grad; with autograd on it is 6x (fp32, Dk = Dv =
    C = 64: the module docstring's figures, measured by bench/kernels.py's probe)."""
    from bench.kernels import forward_peak, inputs as bench_inputs
    xs, xg = bench_inputs(1, 2, 512, 64), bench_inputs(1, 2, 512, 64, grad=True)
    o_bytes, h_bytes = 2 * 512 * 64 * 4, 2 * 64 * 64 * 4
    peaks = [forward_peak(x, 64, grad) for x, grad in ((xs, False), (xg, False), (xg, True))]
    if None in peaks:
        pytest.skip("this PyTorch's profiler exposes no allocation records")
    assert peaks[0] == peaks[1] <= 4 * o_bytes + 2 * h_bytes       # CPU: exactly 4 o + h (measured)
    assert peaks[2] >= 6 * o_bytes


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
