"""Long-sequence invariants and exhaustive checks (excluded by default: run with `python -m pytest -m slow`)."""
import pytest
import torch
import torch.nn.functional as F

from refine_mini.deltanet import delta_rule_chunked, delta_rule_recurrent
from refine_mini.model import FastWeightLM, ModelConfig

pytestmark = pytest.mark.slow


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_chunked_equals_recurrent_at_paper_scale_head_dims():
    """T = 1999 (ragged), Dk = Dv = 128 as the 1.3B DeltaNet, fp64: outputs, final state and gradients agree."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 1999, 128
    q, k = (F.normalize(torch.randn(B, H, T, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, D, D, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, beta, h0)]
    results = []
    for kernel in (lambda *a: delta_rule_chunked(*a[:4], chunk_size=64, initial_state=a[4]),
                   lambda *a: delta_rule_recurrent(*a[:4], initial_state=a[4])):
        o, h = kernel(*inputs)
        grads = torch.autograd.grad(o.square().sum() + h.square().sum(), inputs)
        results.append((o, h, grads))
    (o1, h1, g1), (o2, h2, g2) = results
    assert rel(o1, o2) < 1e-10 and rel(h1, h2) < 1e-10
    assert all(rel(a, b) < 1e-9 for a, b in zip(g1, g2))


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_default_model_streams_a_long_document_exactly(mixer):
    """The default-size model: 1,500 tokens in uneven segments == one pass (fp64)."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer)).double().eval()
    tokens = torch.randint(0, 8193, (1, 1500))
    with torch.no_grad():
        full, _, _ = model(tokens)
        state, pieces = None, []
        for a, b in [(0, 1), (1, 700), (700, 701), (701, 1337), (1337, 1500)]:
            logits, _, state = model(tokens[:, a:b], state)
            pieces.append(logits)
    assert rel(torch.cat(pieces, 1), full) < 1e-9


def test_inductor_compiles_the_chunked_kernel_whole():
    """torch.compile(fullgraph=True) with the default inductor backend (the CUDA default of train.py; ~30 s of
    compiling on CPU): ragged T, fp32, forward and hand-written backward equal the eager recurrence."""
    import torch._dynamo
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 100, 16
    q, k = (F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) for _ in range(2))
    v, beta, h0 = torch.randn(B, H, T, D, generator=g), torch.rand(B, H, T, generator=g), torch.randn(B, H, D, D)
    torch._dynamo.reset()
    compiled = torch.compile(delta_rule_chunked, fullgraph=True)
    results = []
    for kernel in (lambda *a: compiled(*a[:4], chunk_size=16, initial_state=a[4]),
                   lambda *a: delta_rule_recurrent(*a[:4], initial_state=a[4])):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, beta, h0)]
        o, h = kernel(*inputs)
        grads = torch.autograd.grad(o.square().sum() + h.sum(), inputs)
        results.append((o, h, grads))
    torch._dynamo.reset()
    (o1, h1, g1), (o2, h2, g2) = results
    assert rel(o1, o2) < 1e-5 and rel(h1, h2) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(g1, g2))


def test_no_value_takes_more_than_value_max_tokens():
    """All nine million 7-digit values (every split's): " n" takes at most VALUE_MAX_TOKENS tokens, the figure that
    niah.min_length assumes for a needle's value. Encoded a million at a time as "\n n\n n...": the pre-tokeniser
    cuts before each " n" and "\n" is always token 198, so the ids between two 198s are exactly encode(" n")'s."""
    import numpy as np
    from refine_mini.textgen import VALUE_MAX_TOKENS
    from refine_mini.tokenizer import encode, get_tokenizer
    enc, newline = get_tokenizer(), 198
    assert encode("\n") == [newline]
    longest = 0
    for start in range(1_000_000, 10_000_000, 1_000_000):
        ids = np.array(enc.encode_ordinary("".join(f"\n {n}" for n in range(start, start + 1_000_000))))
        cuts = np.flatnonzero(ids == newline)
        assert len(cuts) == 1_000_000  # one newline token per value: no merge across the cut
        counts = np.diff(np.append(cuts, len(ids))) - 1  # (1_000_000,) tokens of each " n"
        assert [len(encode(f" {n}")) for n in range(start, start + 500)] == counts[:500].tolist()
        longest = max(longest, int(counts.max()))
    assert longest == VALUE_MAX_TOKENS
