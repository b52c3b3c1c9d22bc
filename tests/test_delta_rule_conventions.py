"""The kernels' conventions, pinned against the issue's formula written out per token (float64).

test_deltanet.py proves chunked == recurrent; this file proves the recurrence is the one specified: the update
h_t = h_{t-1} + k_t (beta_t (v_t - h_{t-1}^T k_t))^T, the read o_t = scale · h_t^T q_t AFTER writing token t, the
default scale Dk^-1/2, beta anywhere in (0, 2) (fla's allow_neg_eigval range), and a fixed grid of (T, C) pairs the
derandomised CI draws might not reach (C = 2, C = 64 with T > 64, C = T ± 1).
"""
import pytest
import torch

from refine_mini.delta_rule import delta_rule_chunked, delta_rule_recurrent
from tests.test_deltanet import F64, inputs, rel


def per_token(q, k, v, beta, scale, h):
    """The issue's definition, one (batch, head) at a time: no batching, no tricks."""
    o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=F64)
    h = h.clone()
    for b in range(q.shape[0]):
        for n in range(q.shape[1]):
            for t in range(q.shape[2]):
                kt, vt = k[b, n, t], v[b, n, t]
                h[b, n] = h[b, n] + torch.outer(kt, beta[b, n, t] * (vt - h[b, n].T @ kt))
                o[b, n, t] = scale * h[b, n].T @ q[b, n, t]
    return o, h


@pytest.mark.parametrize("Dk, Dv", [(4, 7), (9, 3)])
def test_recurrent_is_the_specified_update_and_read_with_default_scale(Dk, Dv):
    q, k, v, beta, S0 = inputs(2, 2, 11, Dk, Dv, seed=3)
    o, S = delta_rule_recurrent(q, k, v, beta, initial_state=S0)  # scale=None
    o_ref, S_ref = per_token(q, k, v, beta, Dk ** -0.5, S0)
    assert rel(o, o_ref) < 1e-13 and rel(S, S_ref) < 1e-13
    o1, _ = delta_rule_chunked(q, k, v, beta, chunk_size=4, scale=1.0, initial_state=S0)
    assert rel(o1, per_token(q, k, v, beta, 1.0, S0)[0]) < 1e-12  # an explicit scale is used as given


@pytest.mark.parametrize("C", [1, 3, 8])
def test_beta_up_to_two_chunked_equals_the_definition(C):
    """beta in (0, 2): I - beta k k^T has a negative eigenvalue; the UT factor must still be exact."""
    q, k, v, _, S0 = inputs(1, 2, 29, 5, 6, seed=4)
    beta = torch.rand(1, 2, 29, generator=torch.Generator().manual_seed(5), dtype=F64) * 1.98 + 0.01
    o, S = delta_rule_chunked(q, k, v, beta, chunk_size=C, initial_state=S0)
    o_ref, S_ref = per_token(q, k, v, beta, 5 ** -0.5, S0)
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10


@pytest.mark.parametrize("T, C", [(130, 64), (129, 64), (65, 64), (63, 64), (64, 64), (9, 2), (10, 2), (31, 32),
                                  (33, 32), (7, 1)])
def test_fixed_grid_of_lengths_and_chunks(T, C):
    q, k, v, beta, S0 = inputs(1, 1, T, 8, 8, seed=T)
    o, S = delta_rule_chunked(q, k, v, beta, chunk_size=C, initial_state=S0)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, initial_state=S0)
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10
