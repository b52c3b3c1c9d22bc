"""Each layer against an independent, naive re-implementation written from fast-weights.md alone (float64).

The other layer tests compare a layer with itself (streaming vs one call, causality). These catch a wrong equation:
a missing SiLU, a wrong eps, a norm over the wrong axis, a wrong momentum or Newton-Schulz, a wrong learning-rate
offset. The naive forms share nothing with the code under test but its parameters: per-token loops, fla's three
separate convolutions, the paper's state layout S (Dv, Dk), RoPE as a complex rotation, inner gradients by autograd.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from refine_mini.deltanet import DeltaNet
from refine_mini.lact import LaCT
from tests.test_deltanet import F64, rel


def perturbed(layer, skip=()):
    """Every parameter moved well away from its init (so biases, offsets and norm weights all matter)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.endswith(skip):
                p.add_(0.3 * torch.randn_like(p))
    return layer


# ------------------------------------------------------------------------------------------------------ DeltaNet
def naive_deltanet(layer, x):
    """fast-weights.md §2.1, token by token. Returns y (B, T, D) and the final state in the kernel layout (Dk, Dv)."""
    B, T, _ = x.shape
    H, Dk, Dv, W = layer.n_heads, layer.dk, layer.dv, layer.conv_size
    w = layer.conv.weight  # (channels, 1, W): q's channels, then k's, then v's
    outs = []
    for z, wz in zip((x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T, x @ layer.v_proj.weight.T),
                     w.split([H * Dk, H * Dk, H * Dv])):  # three separate depthwise causal convs, then SiLU
        outs.append(F.silu(F.conv1d(F.pad(z.mT, (W - 1, 0)), wz, groups=z.shape[-1])).mT)
    q, k, v = (o.reshape(B, T, H, -1) for o in outs)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # fla's l2norm
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(x @ layer.b_proj.weight.T)  # (B, T, H)
    S = x.new_zeros(B, H, Dv, Dk)  # the paper's layout: S_t = S_{t-1} - beta (S k - v) k^T
    o = x.new_zeros(B, T, H, Dv)
    for t in range(T):
        kt, qt, bt = k[:, t], q[:, t], beta[:, t, :, None, None]
        pred = (S @ kt[..., None])[..., 0]  # (B, H, Dv)
        S = S - bt * (pred - v[:, t])[..., None] * kt[..., None, :]
        o[:, t] = (S @ qt[..., None])[..., 0] * Dk ** -0.5  # read after writing token t
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight  # RMSNorm over Dv
    return o.reshape(B, T, H * Dv) @ layer.o_proj.weight.T, S.mT


@pytest.mark.parametrize("recurrent_below", [0, 1000], ids=["chunked", "recurrent"])
@pytest.mark.parametrize("T, conv", [(23, 4), (5, 4), (17, 2)])
def test_deltanet_layer_equals_a_naive_fla_style_layer(recurrent_below, T, conv):
    layer = perturbed(DeltaNet(12, 2, head_dim_k=6, head_dim_v=5, conv_size=conv, chunk_size=4,
                               recurrent_below=recurrent_below, norm_eps=1e-5).double())
    x = torch.randn(2, T, 12, dtype=F64, generator=torch.Generator().manual_seed(T))
    y, state = layer(x)
    y_ref, S_ref = naive_deltanet(layer, x)
    assert rel(y, y_ref) < 1e-12 and rel(state.S, S_ref) < 1e-12


# ---------------------------------------------------------------------------------------------------------- LaCT
NS5 = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
       (2.8366, -3.0525, 1.2012)]  # fast-weights.md §3.2


def newton_schulz(G):
    X = G.T if G.shape[0] > G.shape[1] else G  # work on the wide orientation
    X = X / (X.norm() + 1e-7)
    for a, b, c in NS5:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def rope(x, theta):
    """x (B, T, H, dh): channel pairs (i, i + dh/2) as complex numbers, rotated by t · theta^(-2i/dh)."""
    T, dh = x.shape[1], x.shape[-1]
    angle = torch.arange(T, dtype=F64)[:, None] * theta ** (-torch.arange(0, dh, 2, dtype=F64) / dh)  # (T, dh/2)
    z = torch.complex(x[..., :dh // 2], x[..., dh // 2:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    return torch.cat([z.real, z.imag], -1)


def naive_lact(L, x):
    """fast-weights.md §3.1-3.2, per token, per row, per head. Returns y (B, T, D) and the final W0 (B, Hf, h, d)."""
    B, T, D = x.shape
    Ha, Hf, C, win = L.n_heads_attn, L.n_heads_fast, L.chunk_size, L.window
    dh, d = D // Ha, D // Hf
    q, k, v = (x @ L.qkv.weight.T).chunk(3, -1)  # (B, T, D) each
    qa, ka = (rope(z.view(B, T, Ha, dh), L.rope_theta).transpose(1, 2) for z in (q, k))  # (B, Ha, T, dh)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    scores = (qa @ ka.mT / math.sqrt(dh)).masked_fill(~((lag >= 0) & (lag < win)), float("-inf"))
    attn = (scores.softmax(-1) @ v.view(B, T, Ha, dh).transpose(1, 2)).transpose(1, 2).reshape(B, T, D)
    fq = F.silu(q * L.qk_scale[0] + L.qk_offset[0]).view(B, T, Hf, d)
    fk = F.silu(k * L.qk_scale[1] + L.qk_offset[1]).view(B, T, Hf, d)
    fv = F.silu(v).view(B, T, Hf, d)
    fq, fk = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5), fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
    eta = F.softplus(x @ L.lr_proj.weight.T + L.lr_proj.bias + math.log(math.expm1(1e-3))).view(B, T, Hf, 3)
    mom = torch.sigmoid(x @ L.momentum_proj.weight.T + L.momentum_proj.bias) if L.use_momentum else None

    def f(W, z):  # SwiGLU fast weights: W1 (silu(W0 z) * (W2 z))
        return W[1] @ (F.silu(W[0] @ z) * (W[2] @ z))

    o, final_w0 = x.new_zeros(B, T, Hf, d), x.new_zeros(B, Hf, *L.w0_init.shape[1:])
    for b in range(B):
        for h in range(Hf):
            Ws = [L.w0_init[h], L.w1_init[h], L.w2_init[h]]
            norms = [w.norm(dim=1, keepdim=True) for w in Ws]  # target row norms: the initial weights'
            Ms = [torch.zeros_like(w) for w in Ws]
            for start in range(0, T, C):
                chunk = range(start, min(start + C, T))
                for t in chunk:  # apply with the weights before this chunk's update
                    o[b, t, h] = f(Ws, fq[b, t, h])
                if start + C > T:
                    break  # a partial chunk never updates
                with torch.enable_grad():  # the update ascends Σ_t eta_j,t <f_W(k_t), v_t>, one eta per matrix
                    Wv = [w.detach().requires_grad_() for w in Ws]
                    grads = []
                    for j in range(3):
                        Wj = [Wv[i] if i == j else Wv[i].detach() for i in range(3)]
                        gain = sum(eta[b, t, h, j] * (f(Wj, fk[b, t, h]) @ fv[b, t, h]) for t in chunk)
                        grads.append(torch.autograd.grad(gain, Wv[j])[0])
                mu = mom[b, list(chunk), h].mean() if mom is not None else 0.0  # the chunk's mean momentum
                for j in range(3):
                    Ms[j] = grads[j] + mu * Ms[j]  # the buffer keeps the pre-Muon update
                    step = newton_schulz(Ms[j]) if L.use_muon else Ms[j]
                    new = Ws[j] + step
                    Ws[j] = new / (new.norm(dim=1, keepdim=True) + 1e-5) * norms[j]  # row norms preserved
            final_w0[b, h] = Ws[0]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * L.ttt_norm_weight
    o = o * F.silu(x @ L.ttt_scale_proj.weight.T + L.ttt_scale_proj.bias)[..., None]
    return (attn + o.reshape(B, T, D)) @ L.o_proj.weight.T, final_w0


@pytest.mark.parametrize("T, Ha, Hf, inter, momentum, muon", [
    (14, 2, 2, 1, True, False),    # 4 complete chunks and a partial one
    (12, 2, 2, 1, False, False),   # no momentum, T a multiple of C
    (11, 2, 2, 1, True, True),     # Muon
    (13, 4, 2, 2, True, False),    # more attention heads than fast heads, hidden = 2 d
    (10, 2, 4, 1, True, True),     # more fast heads than attention heads
    (2, 2, 2, 1, True, False),     # shorter than one chunk: no update at all
])
def test_lact_layer_equals_a_naive_per_token_layer(T, Ha, Hf, inter, momentum, muon):
    torch.manual_seed(0)
    layer = perturbed(LaCT(16, Ha, Hf, chunk_size=3, window=5, inter_multi=inter, use_momentum=momentum,
                           use_muon=muon).double(), skip=("_init",))
    x = torch.randn(2, T, 16, dtype=F64, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        y, state = layer(x)
        y_ref, w0_ref = naive_lact(layer, x)
    assert rel(y, y_ref) < 1e-10 and rel(state.w0, w0_ref) < 1e-10
