"""Mimetic initialisation of the DeltaNet layer (deltanet.py, `DeltaNet.mimetic_init_`).

The claim under test: at step 0, before any training, a mimetically initialised model already copies -- on a
sequence that repeats a random half, it predicts the token that followed the current one last time -- while the
default random initialisation does not.
"""
import pytest
import torch

from refine_mini.deltanet import DeltaNet
from refine_mini.model import FastWeightLM, ModelConfig


def test_mimetic_weights_have_the_stated_structure():
    torch.manual_seed(0)
    layer = DeltaNet(d_model=32, n_heads=2, mimetic_init=True)
    hk, W = 32, layer.conv_size
    taps = layer.conv.weight[:, 0]                                       # (channels, W)
    onehot = torch.zeros(W)
    assert torch.equal(taps[:hk], onehot.index_fill(0, torch.tensor(W - 1), 1.0).expand(hk, W))       # q: x_t
    assert torch.equal(taps[hk:2 * hk], onehot.index_fill(0, torch.tensor(W - 2), 1.0).expand(hk, W))  # k: x_{t-1}
    assert torch.equal(taps[2 * hk:], onehot.index_fill(0, torch.tensor(W - 1), 1.0).expand(hk, W))   # v: x_t
    assert torch.equal(layer.k_proj.weight, layer.q_proj.weight)
    # W_o W_v = c I with c = std^2 d: a value read back lands in the residual stream as the token it came from
    product = layer.o_proj.weight @ layer.v_proj.weight                  # (D, H·Dv) @ (H·Dv, D) -> (D, D)
    torch.testing.assert_close(product, 0.02 ** 2 * 32 * torch.eye(32), atol=1e-7, rtol=0)
    assert layer.v_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)


def copy_accuracy(model, half=32, batch=4, seed=0):
    """Next-token accuracy on the second copy of [r, r] for random r (the induction / associative-recall task)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2000, (batch, half), generator=g)
    x = torch.cat([r, r], 1)                                             # (B, 2·half)
    with torch.no_grad():
        pred = model(x)[0][:, half:-1].argmax(-1)                        # predictions for x[:, half+1:]
    return (pred == x[:, half + 1:]).float().mean().item()


def test_mimetic_model_copies_at_step_zero_and_random_init_does_not():
    accs = {}
    for mimetic in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layers=1, tie_embeddings=True, mimetic_init=mimetic)
        accs[mimetic] = copy_accuracy(FastWeightLM(cfg).eval())
    assert accs[True] > 0.5, accs
    assert accs[False] < 0.05, accs
