"""The plain baselines that bench/kernels.py times for calibration compute the delta rule exactly.

A speed ratio against a wrong baseline would mean nothing, so both are checked against the oracle
`delta_rule_recurrent` in fp64: outputs, final state and the gradients of a loss touching both."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench import baselines
from refine_mini.delta_rule import delta_rule_recurrent
from tests.test_deltanet import inputs, rel


def _loss_and_grads(kernel, xs, **kw):
    o, S = kernel(*xs[:4], initial_state=xs[4], **kw)
    w_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)   # a loss that weighs every output differently
    loss = (w_o * o).sum() + (S * S).sum()
    return (o.detach(), S.detach()), torch.autograd.grad(loss, xs)


@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 4), C=st.sampled_from([1, 3, 8, 16]),
       Dk=st.integers(1, 9), Dv=st.integers(1, 9), seed=st.integers(0, 99))
def test_baselines_equal_the_oracle(B, H, N, C, Dk, Dv, seed):
    xs = inputs(B, H, N * C, Dk, Dv, seed=seed, grad=True)
    (o, S), grads = _loss_and_grads(delta_rule_recurrent, xs)
    for kernel, kw in ((baselines.delta_rule_recurrent_indexed, {}), (baselines.delta_rule_chunked_plain,
                                                                         {"chunk_size": C})):
        (o2, S2), grads2 = _loss_and_grads(kernel, xs, **kw)
        assert rel(o2, o) < 1e-10 and rel(S2, S) < 1e-10, kernel.__name__
        for name, g2, g in zip(("q", "k", "v", "beta", "h0"), grads2, grads):
            assert rel(g2, g) < 1e-9, (kernel.__name__, name)


def test_plain_chunked_rejects_a_ragged_length():
    xs = inputs(1, 1, 10, 4, 4)
    with pytest.raises(ValueError, match="T % C == 0"):
        baselines.delta_rule_chunked_plain(*xs[:4], chunk_size=4)
