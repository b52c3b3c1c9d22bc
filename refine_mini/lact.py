"""LaCT layer (Large-Chunk Test-Time Training): sliding-window attention + SwiGLU fast weights, streamable.

Spec: /work/shared/docs/fast-weights.md §3.1 (dataflow), §3.2 (update rule, in lact_ops.py), §3.4 (the
streaming state built here instead of the released re-run-the-prefix generation), §7 pitfalls 12-16;
LaCT paper (Zhang et al. 2025, arXiv 2505.23884).

Dataflow: [q; k; v] = W_qkv x. (a) SWA branch: causal softmax attention over the last `window` tokens
(itself included), RoPE with ABSOLUTE positions. (b) TTT branch on the same q, k, v: learnable per-channel
scale/offset on q, k; SiLU on q, k, v; per-fast-head L2 norm of q, k; per-token lrs
eta = softplus(W_lr x + b_lr + softplus^-1(1e-3)) (3 per head) and momentum m = sigmoid(W_m x + b_m);
apply-then-update fast-weight op; per-head RMSNorm (eps 1e-5) times silu(W_s x). Output o_proj(a + b).

Deviations:
- NoPE on the fast path (no RoPE on the fast q, k; the LaCT author notes NoPE also works).
- Every complete chunk updates the fast weights, the last one included (see lact_ops.py): outputs equal the
  released code's, the returned state is the one streaming needs.
- Newton-Schulz (use_muon) runs in bf16 on CUDA and in at least fp32 on CPU (fp64 inputs stay fp64; lact_ops.py).
- Slow linears start at N(0, 0.02), as DeltaNet's, not the released initializer_range 0.006.
- `norm_eps` is accepted for parity with DeltaNet's constructor and unused: the block RMSNorms live in the
  model, and the TTT output norm uses the released eps 1e-5.
Streaming: forward(x, state) on any segmentation equals one full pass (outputs and final state).
REFINE's prefix states (method.md §1.4): `forward_recorded` keeps the fast weights after each complete chunk (the
chunk history) and the per-token keys, values and rates, from which `snapshots` rebuilds the state after any
position; states of rows at different positions are stacked in the ragged layout of lact_ragged.py
(`ragged_state`), which batched rollouts decode from.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refine_mini.lact_ops import lact_chunked
from refine_mini.lact_ragged import LaCTRaggedState, ragged_forward, to_ragged
from refine_mini.rope import apply_rope
from refine_mini.state import check_ends, check_fields

TTT_NORM_EPS = 1e-5  # per-head RMSNorm on the TTT output (released value)
QK_L2_EPS = 1e-5  # x / (||x|| + eps) on the fast q, k
BASE_LR = 1e-3  # softplus(0 + softplus^-1(BASE_LR)) = BASE_LR


@dataclass
class LaCTState:
    """Streaming state; every tensor field has the batch at dim 0 (ModelState handles them generically)."""
    w0: torch.Tensor  # (B, Hf, h, d) fast weight W0, fp32 (fp64 for fp64 inputs)
    w1: torch.Tensor  # (B, Hf, d, h) fast weight W1
    w2: torch.Tensor  # (B, Hf, h, d) fast weight W2
    m0: torch.Tensor  # (B, Hf, h, d) momentum buffers (pre-Muon), zeros at sequence start
    m1: torch.Tensor  # (B, Hf, d, h)
    m2: torch.Tensor  # (B, Hf, h, d)
    n0: torch.Tensor  # (B, Hf, h, 1) target row norms, from the initial weights
    n1: torch.Tensor  # (B, Hf, d, 1)
    n2: torch.Tensor  # (B, Hf, h, 1)
    buf_k: torch.Tensor  # (B, n_buf, Hf, d) fast keys of the current partial chunk, n_buf < C
    buf_v: torch.Tensor  # (B, n_buf, Hf, d) fast values
    buf_eta: torch.Tensor  # (B, n_buf, Hf, 3) per-token lrs (eta0, eta1, eta2)
    buf_m: torch.Tensor  # (B, n_buf, Hf) per-token momentum
    swa_k: torch.Tensor  # (B, n_kv, Ha, dh) last n_kv <= window-1 attention keys, post-RoPE
    swa_v: torch.Tensor  # (B, n_kv, Ha, dh) their values
    pos: int  # absolute position of the next token (same for every row)


def sliding_window_attention(q, k, v, n_past, window):
    """Causal softmax attention where each query sees itself and the previous window-1 tokens.

    q (B, H, T, dh) are the new tokens; k, v (B, H, n_past + T, dh) hold n_past cached tokens then the new
    ones. Queries are processed in blocks of `window` against only the keys they can see, so memory is
    O(T * window). Returns (B, H, T, dh).
    """
    T, dh = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dh)
    outs = []
    for q_lo in range(0, T, window):
        q_hi = min(q_lo + window, T)
        k_lo = max(0, n_past + q_lo - window + 1)  # first key any query of the block can see
        k_hi = n_past + q_hi
        qi = torch.arange(n_past + q_lo, n_past + q_hi, device=q.device)  # query positions in key coords
        kj = torch.arange(k_lo, k_hi, device=q.device)
        lag = qi[:, None] - kj[None, :]  # (Tq, Tk)
        visible = (lag >= 0) & (lag < window)
        scores = q[:, :, q_lo:q_hi] @ k[:, :, k_lo:k_hi].mT * scale  # (B,H,Tq,dh) @ (B,H,dh,Tk) -> (B,H,Tq,Tk)
        scores = scores.masked_fill(~visible, float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v[:, :, k_lo:k_hi])  # (B,H,Tq,Tk) @ (B,H,Tk,dh) -> (B,H,Tq,dh)
    return torch.cat(outs, 2)  # (B,H,T,dh)


def to_kernel(t):
    """(B, T, H, ...) <-> (B, H, T, ...): state/layer layout to kernel layout and back."""
    return t.transpose(1, 2)


class LaCT(nn.Module):
    """LaCT mixer: forward(x (B, T, D), state=None) -> (y (B, T, D), LaCTState)."""

    def __init__(self, d_model, n_heads_attn, n_heads_fast, chunk_size, window, inter_multi=1,
                 use_momentum=True, use_muon=False, rope_theta=1e4, norm_eps=1e-6):
        super().__init__()
        if d_model % n_heads_attn or d_model % n_heads_fast:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads_attn {n_heads_attn} "
                             f"and n_heads_fast {n_heads_fast}")
        if (d_model // n_heads_attn) % 2:
            raise ValueError(f"attention head dim {d_model // n_heads_attn} must be even for RoPE")
        if chunk_size < 1 or inter_multi < 1:
            raise ValueError(f"chunk_size {chunk_size} and inter_multi {inter_multi} must be >= 1")
        if window < chunk_size:
            raise ValueError(f"window {window} must be >= chunk_size {chunk_size} (SWA gives in-chunk causality)")
        self.d_model, self.n_heads_attn, self.n_heads_fast = d_model, n_heads_attn, n_heads_fast
        self.chunk_size, self.window, self.rope_theta = chunk_size, window, rope_theta
        self.use_momentum, self.use_muon, self.norm_eps = use_momentum, use_muon, norm_eps
        self.head_dim_attn = d_model // n_heads_attn  # dh
        self.head_dim_fast = d = d_model // n_heads_fast  # d
        self.hidden_fast = h = d * inter_multi  # h
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.qk_scale = nn.Parameter(torch.ones(2, d_model))  # s_q, s_k
        self.qk_offset = nn.Parameter(torch.zeros(2, d_model))  # b_q, b_k
        self.lr_proj = nn.Linear(d_model, 3 * n_heads_fast)  # -> (eta0, eta1, eta2) per fast head
        self.momentum_proj = nn.Linear(d_model, n_heads_fast) if use_momentum else None
        self.ttt_scale_proj = nn.Linear(d_model, n_heads_fast)  # silu gate per head
        self.ttt_norm_weight = nn.Parameter(torch.ones(d))  # RMSNorm affine, shared by the fast heads
        self.w0_init = nn.Parameter(torch.randn(n_heads_fast, h, d) / math.sqrt(d))  # (Hf, h, d)
        self.w1_init = nn.Parameter(torch.randn(n_heads_fast, d, h) / math.sqrt(h))  # (Hf, d, h)
        self.w2_init = nn.Parameter(torch.randn(n_heads_fast, h, d) / math.sqrt(d))  # (Hf, h, d)
        for lin in (self.qkv, self.o_proj, self.lr_proj, self.momentum_proj, self.ttt_scale_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        """Fresh state: fast weights = the slow initial weights repeated over the batch, empty buffers."""
        device = device if device is not None else self.w0_init.device
        sd = torch.promote_types(dtype, torch.float32)  # fast-weight dtype: fp32 (fp64 for fp64 inputs)
        B, Hf, d, Ha, dh = batch_size, self.n_heads_fast, self.head_dim_fast, self.n_heads_attn, self.head_dim_attn
        ws = [p.to(device=device, dtype=sd).unsqueeze(0).repeat(B, 1, 1, 1)  # (Hf,r,c) -> (B,Hf,r,c)
              for p in (self.w0_init, self.w1_init, self.w2_init)]
        norms = [w.norm(dim=-1, keepdim=True) for w in ws]  # (B, Hf, rows, 1)
        moms = [torch.zeros_like(w) for w in ws]
        empty = dict(device=device, dtype=sd)
        return LaCTState(*ws, *moms, *norms,
                         buf_k=torch.zeros(B, 0, Hf, d, **empty), buf_v=torch.zeros(B, 0, Hf, d, **empty),
                         buf_eta=torch.zeros(B, 0, Hf, 3, **empty), buf_m=torch.zeros(B, 0, Hf, **empty),
                         swa_k=torch.zeros(B, 0, Ha, dh, device=device, dtype=dtype),
                         swa_v=torch.zeros(B, 0, Ha, dh, device=device, dtype=dtype), pos=0)

    def fast_inputs(self, x, q, k, v, sd):
        """TTT-branch inputs from x (B, T, D) and its q, k, v (B, T, D): fast q, k, v (B, T, Hf, d), per-token lrs
        eta (B, T, Hf, 3) and momentum (B, T, Hf) in the fast-weight dtype sd."""
        B, T, _ = x.shape
        Hf, d = self.n_heads_fast, self.head_dim_fast
        fq = q * self.qk_scale[0] + self.qk_offset[0]  # (B, T, D)
        fk = k * self.qk_scale[1] + self.qk_offset[1]
        fq, fk, fv = (F.silu(t).view(B, T, Hf, d) for t in (fq, fk, v))  # (B, T, Hf, d)
        fq = fq / (fq.norm(dim=-1, keepdim=True) + QK_L2_EPS)
        fk = fk / (fk.norm(dim=-1, keepdim=True) + QK_L2_EPS)
        base = math.log(math.expm1(BASE_LR))  # softplus^-1(1e-3)
        eta = F.softplus(self.lr_proj(x).to(sd) + base).view(B, T, Hf, 3)  # (B, T, 3 Hf) -> (B, T, Hf, 3)
        if self.use_momentum:
            mom = torch.sigmoid(self.momentum_proj(x).to(sd))  # (B, T, Hf)
        else:
            mom = torch.zeros(B, T, Hf, device=x.device, dtype=sd)
        return fq, fk, fv, eta, mom

    def combine(self, x, attn, o):
        """Output: o_proj(attn + gated, normed TTT output). attn (B, T, D), o (B, T, Hf, d) -> (B, T, D)."""
        B, T, D = x.shape
        o = o.float() if o.dtype != torch.float64 else o  # the norm in fp32 whatever x's dtype, as DeltaNet's
        o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + TTT_NORM_EPS) * self.ttt_norm_weight).to(x.dtype)
        o = o * F.silu(self.ttt_scale_proj(x)).unsqueeze(-1)  # (B, T, Hf, d) * (B, T, Hf, 1)
        return self.o_proj(attn + o.reshape(B, T, D))  # (B, T, Hf, d) -> (B, T, D); shared o_proj

    def ragged_state(self, state: "LaCTState") -> LaCTRaggedState:
        """The same state in the stackable layout of lact_ragged.py (fixed-size buffers, per-row counts)."""
        return to_ragged(state, self.chunk_size, self.window)

    def forward(self, x, state=None):
        y, new_state, _, _ = self._run(x, state)
        return y, new_state

    def forward_recorded(self, x, state=None):
        """forward(x, state) plus a record from which `snapshots` rebuilds the state after any position: (y, state,
        record). From the start (state None), or a later segment of a pass whose records `merge_records` joins."""
        y, final, inputs, history = self._run(x, state, with_history=True)
        return y, final, (history, final, inputs)

    def merge_records(self, records: list):
        """The record of the whole pass from those of its consecutive segments (the first from the start, all but
        the last a multiple of chunk_size tokens, so no partial chunk crosses a boundary): the fast-weight history
        without the entry each later segment starts with (its incoming weights), the window keys and values without
        the rows each later one repeats, the fast inputs along T."""
        T = [r[2][2].shape[1] for r in records]  # tokens of each segment (fk: (B, T, Hf, d))
        if any(n % self.chunk_size for n in T[:-1]):
            raise ValueError(f"recorded segments must be multiples of the chunk size {self.chunk_size} tokens")
        history = records[0][0] + [entry for r in records[1:] for entry in r[0][1:]]
        ka, va = (torch.cat([r[2][i][:, r[2][i].shape[1] - n:] for r, n in zip(records, T)], 1)  # (B, T, Ha, dh)
                  for i in (0, 1))
        fk, fv, eta, mom = (torch.cat([r[2][i] for r in records], 1) for i in range(2, 6))  # (B, T, Hf, .)
        return history, records[-1][1], (ka, va, fk, fv, eta, mom)

    def snapshots(self, record, ends):
        """States after each position t of ends[b] (after reading x[b, :t+1]; batch 1, attached to the graph) of a
        record from the start (a ValueError for a later segment's own record; DeltaNet's snapshots take those):
        fast weights after the chunks complete by then, the partial chunk's tokens, the attention window, the
        position. Equal to segmenting each row's pass (tested); REFINE takes its prefix snapshots this way."""
        history, final, (ka, va, fk, fv, eta, mom) = record
        C, keep, sd = self.chunk_size, self.window - 1, final.w0.dtype
        check_ends(ends, *fk.shape[:2])  # fk (B, T, Hf, d)
        if final.pos != fk.shape[1]:  # history, buffers and window would be read from the segment's own start
            raise ValueError(f"LaCT snapshots need a record from the start of the sequence (or merged records), got "
                             f"a segment of {fk.shape[1]} tokens ending at position {final.pos}")
        snaps = []
        for b, row in enumerate(ends):
            r = slice(b, b + 1)
            for t in row:
                j = (t + 1) // C  # chunks complete after t+1 tokens; history[j] = fast weights after them
                (w0, w1, w2), (m0, m1, m2) = history[j]
                lo = max(0, t + 1 - keep)  # the window keeps the last W-1 keys
                # copies of the token rows: views would keep the record's whole (B, T, ...) tensors alive
                snaps.append(LaCTState(w0[r], w1[r], w2[r], m0[r], m1[r], m2[r], final.n0[r], final.n1[r],
                                       final.n2[r], buf_k=fk[r, j * C:t + 1].to(sd, copy=True),
                                       buf_v=fv[r, j * C:t + 1].to(sd, copy=True), buf_eta=eta[r, j * C:t + 1].clone(),
                                       buf_m=mom[r, j * C:t + 1].clone(), swa_k=ka[r, lo:t + 1].clone(),
                                       swa_v=va[r, lo:t + 1].clone(), pos=t + 1))
        return snaps

    def _check_state(self, state, B, device):
        """ValueError unless every field fits a batch of B on `device`: buffers hold the pos mod C tokens since the
        last chunk boundary, the window min(W-1, pos) keys (any other state would cut chunks at the wrong tokens)."""
        pos = state.pos
        if type(pos) is not int or pos < 0:
            raise ValueError(f"LaCTState.pos must be an int >= 0, got {pos!r}")
        Hf, d, h = self.n_heads_fast, self.head_dim_fast, self.hidden_fast
        Ha, dh = self.n_heads_attn, self.head_dim_attn
        nb, nkv = pos % self.chunk_size, min(self.window - 1, pos)
        wide, tall, buf, win = (B, Hf, h, d), (B, Hf, d, h), (B, nb, Hf), (B, nkv, Ha, dh)
        check_fields(state, dict(w0=wide, w1=tall, w2=wide, m0=wide, m1=tall, m2=wide, n0=(B, Hf, h, 1),
                                 n1=(B, Hf, d, 1), n2=(B, Hf, h, 1), buf_k=(*buf, d), buf_v=(*buf, d),
                                 buf_eta=(*buf, 3), buf_m=buf, swa_k=win, swa_v=win), device,
                     f" (at position {pos}: {nb} buffered tokens, {nkv} window keys)")

    def _run(self, x, state, with_history=False):
        """forward, plus what snapshots need: post-RoPE keys/values (B, n_kv + T, Ha, dh), the fast inputs and (with
        with_history) the fast weights entering each chunk: (y, state, inputs, history or None)."""
        B, T, D = x.shape
        if D != self.d_model or T < 1:
            raise ValueError(f"expected x of shape (B, T>=1, {self.d_model}), got {tuple(x.shape)}")
        if state is None:
            state = self.initial_state(B, x.dtype, x.device)
        if isinstance(state, LaCTRaggedState):  # stacked rows at different positions (rollouts)
            return (*ragged_forward(self, x, state), None, None)
        if not isinstance(state, LaCTState):
            raise ValueError(f"a LaCT layer needs a LaCTState or LaCTRaggedState, got a {type(state).__name__}")
        Ha, dh = self.n_heads_attn, self.head_dim_attn
        self._check_state(state, B, x.device)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, 3D) -> 3 x (B, T, D)

        # (a) sliding-window attention with absolute-position RoPE; cache keeps post-RoPE keys.
        qa = apply_rope(q.view(B, T, Ha, dh), state.pos, self.rope_theta)  # (B, T, Ha, dh)
        ka = torch.cat([state.swa_k, apply_rope(k.view(B, T, Ha, dh), state.pos, self.rope_theta)], 1)
        va = torch.cat([state.swa_v, v.view(B, T, Ha, dh)], 1)  # (B, n_kv + T, Ha, dh)
        n_kv = state.swa_k.shape[1]
        attn = sliding_window_attention(qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2),
                                        n_kv, self.window)  # (B, Ha, T, dh)
        attn = attn.transpose(1, 2).reshape(B, T, D)  # (B, Ha, T, dh) -> (B, T, D)
        keep = min(self.window - 1, n_kv + T)
        swa_k, swa_v = ka[:, ka.shape[1] - keep:], va[:, va.shape[1] - keep:]  # (B, keep, Ha, dh)

        # (b) TTT branch on the same q, k, v (NoPE).
        fq, fk, fv, eta, mom = self.fast_inputs(x, q, k, v, state.w0.dtype)  # (B, T, Hf, .)
        buffer = tuple(map(to_kernel, (state.buf_k, state.buf_v, state.buf_eta, state.buf_m)))  # (B, Hf, n_buf, .)
        o, ws, ms, buffer, history = lact_chunked(
            to_kernel(fq), to_kernel(fk), to_kernel(fv), to_kernel(eta), to_kernel(mom),  # (B, Hf, T, .)
            (state.w0, state.w1, state.w2), (state.m0, state.m1, state.m2), (state.n0, state.n1, state.n2),
            buffer, self.chunk_size, self.use_momentum, self.use_muon, with_history)  # o (B, Hf, T, d)
        y = self.combine(x, attn, o.transpose(1, 2))  # (B, T, D)

        # back to (B, n_buf, Hf, ...); copies, as views would keep the whole (B, T, ...) inputs alive in the state
        buf_k, buf_v, buf_eta, buf_m, swa_k, swa_v = (t.clone() for t in (*map(to_kernel, buffer), swa_k, swa_v))
        new_state = LaCTState(*ws, *ms, state.n0, state.n1, state.n2, buf_k=buf_k, buf_v=buf_v,
                              buf_eta=buf_eta, buf_m=buf_m, swa_k=swa_k, swa_v=swa_v, pos=state.pos + T)
        return y, new_state, (ka, va, fk, fv, eta, mom), history
