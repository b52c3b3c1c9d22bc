"""The kernels' conventions, pinned against the specified formula written out per token (float64).

test_deltanet.py proves chunked == recurrent; this file proves the recurrence is the one specified (fast-weights.md
§1): the update h_t = h_{t-1} + k_t (beta_t (v_t - h_{t-1}^T k_t))^T, the read o_t = scale · h_t^T q_t AFTER writing
token t, the default scale Dk^-1/2, beta anywhere in (0, 2) (fla's allow_neg_eigval range), and a fixed grid of
(T, C) pairs the derandomised CI draws might not reach (C = 2, C = 64 with T > 64, C = T ± 1). Then the exact special
cases of fast-weights.md §5: zero keys write nothing, orthonormal keys with beta = 1 are recalled exactly, outputs are
linear in (v, S0) jointly and in the scale, rows and heads are independent, and every transition is non-expansive.
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


# ------------------------------------------------- exact special cases of fast-weights.md §5 (invariants 6, 8, 9)
def test_zero_keys_are_no_ops_and_orthonormal_keys_are_recalled_exactly():
    q, k, v, beta, S0 = inputs(1, 2, 12, 16, 5, seed=6)
    gaps = [2, 3, 7, 11]
    k0 = k.clone()
    k0[:, :, gaps] = 0  # these tokens write nothing
    keep = [t for t in range(12) if t not in gaps]
    _, S_gaps = delta_rule_chunked(q, k0, v, beta, chunk_size=4, initial_state=S0)
    _, S_kept = delta_rule_chunked(q[:, :, keep], k[:, :, keep], v[:, :, keep], beta[:, :, keep], chunk_size=4,
                                   initial_state=S0)
    assert rel(S_gaps, S_kept) < 1e-12
    basis = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
    keys = basis[:12].expand(1, 2, 12, 16)  # 12 orthonormal keys; beta = 1 overwrites what each key reads
    _, S = delta_rule_chunked(q, keys, v, torch.ones_like(beta), chunk_size=5, initial_state=S0)
    recalled = torch.einsum("bhtk,bhkv->bhtv", keys, S)  # h^T k_i for every key: (1, 2, 12, Dv)
    assert rel(recalled, v) < 1e-12


def test_outputs_are_linear_in_values_and_state_jointly_and_in_the_scale():
    q, k, v1, beta, S1 = inputs(2, 2, 19, 6, 4, seed=7)
    _, _, v2, _, S2 = inputs(2, 2, 19, 6, 4, seed=8)
    run = lambda v, S, scale=None: delta_rule_chunked(q, k, v, beta, chunk_size=8, scale=scale, initial_state=S)
    (o1, h1), (o2, h2) = run(v1, S1), run(v2, S2)
    o12, h12 = run(2 * v1 - 3 * v2, 2 * S1 - 3 * S2)
    assert rel(o12, 2 * o1 - 3 * o2) < 1e-12 and rel(h12, 2 * h1 - 3 * h2) < 1e-12
    assert rel(run(v1, S1, scale=0.3)[0], 0.3 * run(v1, S1, scale=1.0)[0]) < 1e-14


def test_rows_and_heads_are_independent():
    q, k, v, beta, S0 = inputs(3, 2, 21, 5, 6, seed=9)
    o, S = delta_rule_chunked(q, k, v, beta, chunk_size=8, initial_state=S0)
    for b in range(3):
        for h in range(2):
            sl = (slice(b, b + 1), slice(h, h + 1))
            o_bh, S_bh = delta_rule_chunked(q[sl], k[sl], v[sl], beta[sl], chunk_size=8, initial_state=S0[sl])
            assert rel(o_bh, o[sl]) < 1e-13 and rel(S_bh, S[sl]) < 1e-13


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_with_unit_keys_every_transition_is_non_expansive(beta_max):
    """I - beta k k^T has spectral norm <= 1 for ||k|| = 1, beta in [0, 2]: with v = 0 no column of S grows."""
    q, k, v, _, S0 = inputs(1, 1, 40, 6, 3, seed=10)
    beta = torch.rand(1, 1, 40, generator=torch.Generator().manual_seed(1), dtype=F64) * beta_max
    norms = [S0.norm(dim=-2)]
    for C in range(1, 41):  # the state after every prefix: chunk C of a C-token prefix
        norms.append(delta_rule_chunked(q[:, :, :C], k[:, :, :C], 0 * v[:, :, :C], beta[:, :, :C], chunk_size=7,
                                        initial_state=S0)[1].norm(dim=-2))  # (1, 1, Dv) column norms
    assert all(bool((b <= a * (1 + 1e-12)).all()) for a, b in zip(norms, norms[1:]))
    assert bool((norms[-1] < 0.9 * norms[0]).all())  # and the state really decays


def test_gradients_never_read_an_uninitialised_buffer(monkeypatch):
    """No kernel output may depend on memory it did not write. Eager PyTorch skips a beta=0 input of baddbmm, but
    inductor's CUDA matmul template computes alpha (a @ b) + beta input, and 0 * NaN garbage is NaN. Here fresh
    memory is NaN (deterministic mode fills torch.empty with NaN) and baddbmm follows the template's formula: the
    chunked gradients must still equal the recurrence's (also: the UT factor's merge writes every block it reads)."""
    def template(inp, a, b, *, beta=1.0, alpha=1.0):
        return alpha * torch.bmm(a, b) + beta * inp
    monkeypatch.setattr(torch, "baddbmm", template)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4).isnan().all()  # the premise: fresh memory reads as NaN
        grads = []
        for fn in (delta_rule_recurrent, lambda *a, **kw: delta_rule_chunked(*a, chunk_size=32, **kw)):
            q, k, v, beta, S0 = inputs(1, 2, 45, 4, 3, grad=True)  # C = 32: the UT factor's 16 -> 32 merge runs too
            o, hT = fn(q, k, v, beta, initial_state=S0)
            (o.sum() + (hT * hT).sum()).backward()  # o.sum(): the expanded dO
            grads.append([x.grad for x in (q, k, v, beta, S0)])
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*grads):
        assert torch.isfinite(b).all() and rel(b, a) < 1e-10
