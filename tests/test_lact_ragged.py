"""Stacked LaCT states at different positions (lact_ragged.py) equal streaming each row on its own."""
import pytest
import torch

from refine_mini.lact_ragged import to_ragged
from refine_mini.state import ModelState

from tests.test_lact import make_layer

F64 = torch.float64


def prefix_states(layer, x, ends):
    """Streaming states after x[:, :t] for each t in ends (single rows of x (1, L, D))."""
    states = []
    for t in ends:
        _, s = layer(x[:, :t])
        states.append(s)
    return states


@pytest.mark.parametrize("muon", [False, True])
@pytest.mark.parametrize("n_new", [1, 5])
def test_ragged_stack_equals_per_row_streaming(muon, n_new):
    """Rows at positions with an empty/partial/almost-full chunk buffer and a partly filled attention window
    (C=3, window=4): outputs of the next n_new tokens, every later output (through the carried state), and the
    gradients into the layer's parameters equal per-row streaming, in fp64."""
    layer = make_layer(0, use_muon=muon)
    torch.manual_seed(1)
    x = torch.randn(1, 20, 16, dtype=F64)
    ends = [1, 2, 3, 5, 8, 13]  # buffer fill 1, 2, 0, 2, 2, 1; window fill 1, 2, 3, 3, 3, 3
    new = torch.randn(len(ends), n_new + 3, 16, dtype=F64)

    def per_row():
        ys = []
        for i, s in enumerate(prefix_states(layer, x, ends)):
            y, s = layer(new[i:i + 1, :n_new], s)
            y2, _ = layer(new[i:i + 1, n_new:], s)  # continue from the carried state
            ys.append(torch.cat([y, y2], 1))
        return torch.cat(ys)

    def stacked():
        rows = [ModelState([to_ragged(s, layer.chunk_size, layer.window)]) for s in prefix_states(layer, x, ends)]
        state = ModelState.cat(rows).layers[0]
        y, state = layer(new[:, :n_new], state)
        y2, _ = layer(new[:, n_new:], state)
        return torch.cat([y, y2], 1)

    ref, out = per_row(), stacked()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g_ref = torch.autograd.grad(ref.square().sum(), list(layer.parameters()), allow_unused=True)
    g_out = torch.autograd.grad(stacked().square().sum(), list(layer.parameters()), allow_unused=True)
    for a, b in zip(g_out, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
