"""The fused, blockwise LM-head cross-entropy (head_loss.py) == the plain full-logits path, and it never holds the
(N, V) logits."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench.measure import cpu_peak_bytes
from refine_mini import head_loss as head_loss_module
from refine_mini.head_loss import IGNORE, head_loss, head_loss_reference
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.refine import RefineConfig, refine_step
from refine_mini.trainer import ntp_loss, ntp_loss_from_hidden

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def problem(n, d, v, dtype, seed, ignore_every=0, weights=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    row_weights = torch.rand(n, generator=g, dtype=dtype) * 5 if weights else None
    return hidden, weight, targets, row_weights


def run(fn, hidden, weight, targets, row_weights, scale=1.0, **kw):
    """(loss, nll, entropy, ∂(scale·loss)/∂hidden, ∂(scale·loss)/∂weight)."""
    hidden.grad = weight.grad = None
    loss, nll, entropy = fn(hidden, weight, targets, row_weights, with_entropy=True, **kw)
    (scale * loss).backward()
    return loss.detach(), nll, entropy, hidden.grad.clone(), weight.grad.clone()


@given(n=st.integers(1, 70), d=st.integers(1, 9), v=st.integers(2, 40), block=st.integers(1, 80),
       dtype=st.sampled_from([torch.float64, torch.float32]), ignore_every=st.sampled_from([0, 1, 2, 7]),
       weights=st.booleans(), scale=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_fused_equals_the_full_logits_path_in_value_entropy_and_both_gradients(n, d, v, block, dtype, ignore_every,
                                                                               weights, scale, seed):
    """Blocks that do and do not divide N (block 1, block > N), ignored rows (all of them at ignore_every = 1), row
    weights, a scaled upstream gradient (∂loss/∂L ≠ 1, negative too)."""
    args = problem(n, d, v, dtype, seed, ignore_every, weights)
    fused = run(head_loss, *args, scale=scale, block_rows=block)
    plain = run(head_loss_reference, *args, scale=scale)
    for name, a, b in zip(("loss", "nll", "entropy", "d hidden", "d weight"), fused, plain):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if b.norm() == 0:
            assert a.norm() == 0, name
        else:
            assert rel(a, b) < TOL[dtype], name
    if ignore_every:
        assert (fused[1][args[2] == IGNORE] == 0).all()  # an ignored row has nll 0 and no gradient
        assert (fused[3][args[2] == IGNORE] == 0).all()


def test_fused_passes_gradcheck():
    hidden, weight, targets, row_weights = problem(11, 3, 7, torch.float64, 0, ignore_every=4)
    torch.autograd.gradcheck(lambda h, w: head_loss(h, w, targets, row_weights, block_rows=4)[0], (hidden, weight))


def test_the_entropy_and_nll_are_the_textbook_formulas():
    hidden, weight, targets, _ = problem(5, 4, 6, torch.float64, 1)
    _, nll, entropy = head_loss(hidden, weight, targets, with_entropy=True, block_rows=2)
    p = torch.softmax(hidden @ weight.T, -1)  # (5, 6)
    torch.testing.assert_close(nll, -p[torch.arange(5), targets].log())
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))


def test_no_gradient_is_computed_or_kept_without_grad_mode_and_one_sided_grads_work(monkeypatch):
    """Under no_grad (evaluation's answer NLL) the blocks skip the gradient work, which the fused path otherwise does
    in its forward: autograd.Function still reports needs_input_grad there, so head_loss must check grad mode."""
    hidden, weight, targets, _ = problem(9, 3, 5, torch.float64, 2)
    seen, real_block = [], head_loss_module._block
    monkeypatch.setattr(head_loss_module, "_block", lambda *a: (seen.append(a[-1] is None), real_block(*a))[1])
    with torch.no_grad():
        loss, _, _ = head_loss(hidden, weight, targets, block_rows=4)
    assert seen == [True] * 3  # 9 rows in blocks of 4, none with a gradient accumulator
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, head_loss_reference(hidden, weight, targets)[0], rtol=1e-12, atol=0)  # sum order
    for frozen in ("hidden", "weight"):  # only the other input requires grad (e.g. a frozen head)
        h, w = (hidden.detach(), weight) if frozen == "hidden" else (hidden, weight.detach())
        for t in (hidden, weight):
            t.grad = None
        head_loss(h, w, targets, block_rows=4)[0].backward()
        live = weight if frozen == "hidden" else hidden
        expected = torch.autograd.grad(head_loss_reference(h, w, targets)[0], live)[0]
        torch.testing.assert_close(live.grad, expected)


def test_fused_never_holds_the_logits_and_the_plain_path_does():
    """Peak tensor memory of forward + backward at N = 4096 rows, V = 8193, D = 128: the plain path holds several
    (N, V) fp32 tensors (128 MiB each), the fused one a few (256, V) blocks and (N, D) gradients (ours: 22 MiB).
    The bound is half of ONE (N, V) tensor, so any version that never holds the logits passes: a plain _block with a
    new tensor per op peaks at 38-54 MiB (a teaching-table student check), the full-logits path at >= 256 MiB."""
    hidden, weight, targets, _ = problem(4096, 128, 8193, torch.float32, 3)
    logits_bytes = 4096 * 8193 * 4

    def peak(fn):
        return cpu_peak_bytes(lambda: fn(hidden, weight, targets)[0].backward())

    fused, plain = peak(head_loss), peak(head_loss_reference)
    if fused is None:
        pytest.skip("this PyTorch's profiler does not expose its memory events")
    assert plain >= 2 * logits_bytes
    assert fused < logits_bytes / 2


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_the_model_head_loss_with_tied_embeddings_equals_full_logits_ntp(mixer):
    """Through a tied model (the head's gradient and the embedding's add up in one matrix): the NTP loss from
    hidden states (fused) == ntp_loss of forward's full logits, and so is every parameter's gradient."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, d_model=16, n_layers=2, vocab_size=50, chunk_size=8,
                                     lact_chunk=8, window=8)).double()
    tokens = torch.randint(0, 50, (3, 29), generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = (ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens) if fused
                else ntp_loss(model(tokens)[0], tokens))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, g_a), (loss_b, g_b) = grads
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    for name in g_b:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_a_refine_step_is_the_same_with_the_plain_head(mixer):
    """refine_step's one recorded forward takes the NTP term and the selection entropies from the fused head loss;
    with `fused_head = False` (full logits) it selects the same positions and takes the same step (fp64)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = FastWeightLM(ModelConfig(mixer=mixer, d_model=32, n_layers=2, vocab_size=64, chunk_size=8,
                                         lact_chunk=8, window=8)).double()
        model.fused_head = fused
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        docs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 33)]
        metrics = refine_step(model, optimizer, docs, RefineConfig(c=4, k=3), torch.Generator().manual_seed(0))
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m_a, p_a), (m_b, p_b) = results
    for key in ("loss", "ntp_loss", "policy_loss", "selected_entropy_mean", "reward_cosine_mean", "grad_norm"):
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-10, abs=1e-13), key
    for a, b in zip(p_a, p_b):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


def test_bad_block_size_is_a_value_error():
    hidden, weight, targets, _ = problem(3, 2, 4, torch.float64, 0)
    with pytest.raises(ValueError, match="block_rows"):
        head_loss(hidden, weight, targets, block_rows=0)


def test_double_backward_raises():
    """The fused path's gradient is precomputed in the forward, so it has no second derivative: a backward that
    builds a graph (create_graph=True) raises, where the plain path gives the Hessian-vector product."""
    hidden, weight, targets, row_weights = problem(7, 4, 11, torch.float64, seed=5)
    loss, _, _ = head_loss(hidden, weight, targets, row_weights, block_rows=3)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    loss, _, _ = head_loss_reference(hidden, weight, targets, row_weights)
    (g,) = torch.autograd.grad(loss, hidden, create_graph=True)
    assert g.requires_grad  # the reference path is twice differentiable
