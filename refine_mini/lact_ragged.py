"""LaCT states of rows at DIFFERENT positions, stacked into one batch (REFINE rollouts, method.md §1.4 / §9).

Question answered: the c prefix snapshots of a document sit at different positions, so their LaCT states differ in
more than values: the RoPE position, how many tokens wait in the partial fast-weight chunk (pos mod C) and, early
in a document, how many keys the attention window holds. `LaCTState` keeps those as an int and variable-length
tensors, which cannot be concatenated; decoding each prefix alone costs a whole model call per token per prefix.

`LaCTRaggedState` holds the same information with fixed shapes and per-row counters, so ModelState.cat / select /
repeat_interleave work on it like on any state:
- partial chunk: buffers of capacity C, row b's first n_buf[b] slots valid;
- attention window: W-1 slots, row b's last n_kv[b] valid (right-aligned: the newest key is always last);
- position: pos[b].
`ragged_forward` reads tokens one at a time (rollouts feed k <= a few tokens), exactly as the streaming layer would
for each row alone: attend over the valid window, apply the fast weights, append to the buffer, and for the rows
whose buffer is now full take the fast-weight update (computed for all rows, kept by torch.where where full).
Equality with per-row streaming, outputs and gradients, is tested in tests/test_lact_ragged.py.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_mini.common import autocast_off
from refine_mini.lact_ops import closed_form_grads, swiglu_fw, update_fast_weights
from refine_mini.rope import apply_rope


@dataclass
class LaCTRaggedState:
    """Every field is a tensor with the batch at dim 0 (shapes as LaCTState's unless noted)."""
    w0: torch.Tensor  # (B, Hf, h, d) fast weights
    w1: torch.Tensor  # (B, Hf, d, h)
    w2: torch.Tensor  # (B, Hf, h, d)
    m0: torch.Tensor  # momenta, same shapes
    m1: torch.Tensor
    m2: torch.Tensor
    n0: torch.Tensor  # (B, Hf, h, 1) row norms
    n1: torch.Tensor  # (B, Hf, d, 1)
    n2: torch.Tensor  # (B, Hf, h, 1)
    buf_k: torch.Tensor  # (B, C, Hf, d) partial chunk, slots < n_buf[b] valid
    buf_v: torch.Tensor  # (B, C, Hf, d)
    buf_eta: torch.Tensor  # (B, C, Hf, 3)
    buf_m: torch.Tensor  # (B, C, Hf)
    n_buf: torch.Tensor  # (B,) long, < C
    swa_k: torch.Tensor  # (B, W-1, Ha, dh) post-RoPE keys, the last n_kv[b] slots valid
    swa_v: torch.Tensor  # (B, W-1, Ha, dh)
    n_kv: torch.Tensor  # (B,) long, <= W-1
    pos: torch.Tensor  # (B,) long: absolute position of each row's next token


def to_ragged(state, chunk_size: int, window: int) -> LaCTRaggedState:
    """A LaCTState (all rows at one position) -> LaCTRaggedState: pad buffers to C slots, the window to W-1 slots."""
    B, n_buf, n_kv = state.w0.shape[0], state.buf_k.shape[1], state.swa_k.shape[1]
    grow = chunk_size - n_buf  # empty buffer slots, appended at the end
    shift = window - 1 - n_kv  # empty window slots, prepended
    full = dict(device=state.w0.device, dtype=torch.long)
    return LaCTRaggedState(
        state.w0, state.w1, state.w2, state.m0, state.m1, state.m2, state.n0, state.n1, state.n2,
        buf_k=F.pad(state.buf_k, (0, 0, 0, 0, 0, grow)), buf_v=F.pad(state.buf_v, (0, 0, 0, 0, 0, grow)),
        buf_eta=F.pad(state.buf_eta, (0, 0, 0, 0, 0, grow)), buf_m=F.pad(state.buf_m, (0, 0, 0, grow)),
        n_buf=torch.full((B,), n_buf, **full),
        swa_k=F.pad(state.swa_k, (0, 0, 0, 0, shift, 0)), swa_v=F.pad(state.swa_v, (0, 0, 0, 0, shift, 0)),
        n_kv=torch.full((B,), n_kv, **full), pos=torch.full((B,), state.pos, **full))


def _attend(layer, q, k, v, s: LaCTRaggedState):
    """One token of sliding-window attention per row. q, k, v (B, 1, Ha, dh) -> (B, 1, Ha·dh), new window."""
    W = layer.window
    qa = apply_rope(q, s.pos, layer.rope_theta)  # (B, 1, Ha, dh)
    keys = torch.cat([s.swa_k, apply_rope(k, s.pos, layer.rope_theta)], 1)  # (B, W, Ha, dh): window + itself
    vals = torch.cat([s.swa_v, v], 1)  # (B, W, Ha, dh)
    valid = torch.arange(W, device=q.device)[None, :] >= (W - 1 - s.n_kv)[:, None]  # (B, W)
    scores = torch.einsum("bqhd,bkhd->bhqk", qa, keys) * q.shape[-1] ** -0.5  # (B, Ha, 1, W)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), vals)  # (B, 1, Ha, dh)
    return out.flatten(2), keys[:, 1:], vals[:, 1:], torch.clamp(s.n_kv + 1, max=W - 1)  # out (B, 1, Ha·dh)


@autocast_off  # the fast weights in fp32 under bf16 autocast too, as lact_chunked
def _fast_step(layer, fq, fk, fv, eta, mom, s: LaCTRaggedState):
    """One token of the TTT branch per row: apply, append to the chunk, update the rows whose chunk is full.
    fq, fk, fv (B, Hf, d); eta (B, Hf, 3); mom (B, Hf). Returns o (B, Hf, d) and the new fast-weight fields."""
    C = s.buf_k.shape[1]
    ws, ms, norms = (s.w0, s.w1, s.w2), (s.m0, s.m1, s.m2), (s.n0, s.n1, s.n2)
    o = swiglu_fw(*ws, fq[:, :, None])[:, :, 0]  # (B, Hf, 1, d) -> (B, Hf, d): applied BEFORE this token's update
    slot = torch.arange(C, device=fq.device)[None, :] == s.n_buf[:, None]  # (B, C): where this token goes
    buf_k = torch.where(slot[..., None, None], fk[:, None], s.buf_k)  # (B, C, Hf, d)
    buf_v = torch.where(slot[..., None, None], fv[:, None], s.buf_v)
    buf_eta = torch.where(slot[..., None, None], eta[:, None], s.buf_eta)  # (B, C, Hf, 3)
    buf_m = torch.where(slot[..., None], mom[:, None], s.buf_m)  # (B, C, Hf)
    n_buf = s.n_buf + 1
    full = n_buf == C  # (B,)
    if bool(full.any()):
        # the buffered chunk (B, C, Hf, d) -> kernel layout (B, Hf, C, d)
        grads = closed_form_grads(*ws, buf_k.transpose(1, 2), buf_v.transpose(1, 2), buf_eta.transpose(1, 2))
        new_ws, new_ms = update_fast_weights(ws, ms, norms, grads, buf_m.mean(1), layer.use_momentum,
                                             layer.use_muon)  # mu: (B, C, Hf) -> (B, Hf)
        keep = full[:, None, None, None]
        ws = tuple(torch.where(keep, new, old) for new, old in zip(new_ws, ws))
        ms = tuple(torch.where(keep, new, old) for new, old in zip(new_ms, ms))
        n_buf = torch.where(full, 0, n_buf)
    return o, dict(w0=ws[0], w1=ws[1], w2=ws[2], m0=ms[0], m1=ms[1], m2=ms[2], buf_k=buf_k, buf_v=buf_v,
                   buf_eta=buf_eta, buf_m=buf_m, n_buf=n_buf)


def ragged_forward(layer, x, state: LaCTRaggedState):
    """LaCT.forward for stacked rows at different positions, token by token. x (B, T, D) -> (y (B, T, D), state)."""
    B, T, D = x.shape
    if state.w0.shape[0] != B:
        raise ValueError(f"state batch {state.w0.shape[0]} != input batch {B}")
    Ha, dh = layer.n_heads_attn, layer.head_dim_attn
    q, k, v = layer.qkv(x).chunk(3, dim=-1)  # (B, T, 3D) -> 3 x (B, T, D)
    sd = state.w0.dtype
    fq, fk, fv, eta, mom = (t.to(sd) for t in layer.fast_inputs(x, q, k, v, sd))  # (B, T, Hf, .)
    attn, outs = [], []
    for t in range(T):
        # token t of q, k, v: (B, T, D) -> (B, 1, Ha, dh)
        a, swa_k, swa_v, n_kv = _attend(layer, *(z[:, t:t + 1].view(B, 1, Ha, dh) for z in (q, k, v)), state)
        o, fast = _fast_step(layer, fq[:, t], fk[:, t], fv[:, t], eta[:, t], mom[:, t], state)
        state = LaCTRaggedState(n0=state.n0, n1=state.n1, n2=state.n2, swa_k=swa_k, swa_v=swa_v, n_kv=n_kv,
                                pos=state.pos + 1, **fast)
        attn.append(a)  # (B, 1, D)
        outs.append(o.to(x.dtype))  # (B, Hf, d)
    y = layer.combine(x, torch.cat(attn, 1), torch.stack(outs, 1))  # (B, T, D), (B, T, Hf, d) -> (B, T, D)
    return y, state
