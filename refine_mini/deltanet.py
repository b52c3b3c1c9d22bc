"""DeltaNet layer: the fast-weight token mixer of the REFINE DeltaNet models.

Question answered: how does one layer turn x (B, T, D) into y (B, T, D) while carrying an explicit recurrent state, so
that any split of a sequence (prefill, token-by-token decode, multi-token cached calls) gives the same output?

Source: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
(arXiv 2406.06484), built the way fla's `fla/layers/delta_net.py` builds it; spec /work/shared/docs/fast-weights.md §2.1
and §2.3. State layout is fla's h = Sᵀ (B, H, Dk, Dv), fp32. The kernels live in `delta_rule.py` and are re-exported.

Dataflow: q, k, v = W_q x, W_k x, W_v x (bias-free); beta = sigmoid(W_b x); causal depthwise short conv (kernel W,
no bias) on q, k, v, then SiLU on each; split heads; L2-normalise q, k (x / sqrt(Σx² + 1e-6)); delta rule (chunked
when T > recurrent_below, else recurrent; fla switches at 64, we at 8 because on CPU the token loop's backward
costs more than one padded chunk already for ~8 tokens, and REFINE's prefix segments are often shorter than 64);
per-head RMSNorm over Dv (weight shared across heads); merge; o_proj.

Deviations from fla: the three depthwise convs are one depthwise conv over the concatenated [q | k | v] channels
(identical maths, one cache tensor); the conv cache holds the last W-1 pre-conv inputs batch-first (B, W-1, channels)
instead of fla's (N, channels, W); no gate, no allow_neg_eigval, no varlen/padding masks; the short conv keeps
PyTorch's default init instead of fla's N(0, 0.02) (see __init__). Optional mimetic
initialisation (`mimetic_init_`, on by default in ModelConfig): the layer starts as an induction (copy) circuit.

REFINE's prefix states (method.md §1.4): `forward_recorded` runs the same pass and keeps a record (the layer input
and the kernel's chunk-entry states), from which `snapshots` rebuilds the state after any position without
re-running the prefix; `merge_records` joins the records of consecutive segments (checkpointed pieces).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refine_mini.delta_rule import delta_rule_chunked, delta_rule_recurrent
from refine_mini.state import check_ends, check_fields

__all__ = ["delta_rule_recurrent", "delta_rule_chunked", "DeltaNetState", "DeltaNet"]


@dataclass
class DeltaNetState:
    """Everything a DeltaNet layer needs to continue a sequence. All tensor fields are batch-first."""
    S: torch.Tensor     # fast-weight memory h = Sᵀ, (B, H, Dk, Dv) float32
    conv: torch.Tensor  # last W-1 pre-conv [q | k | v] projections, (B, W-1, 2·H·Dk + H·Dv); zeros before the start


class DeltaNet(nn.Module):
    """DeltaNet token mixer. forward(x (B,T,D), state=None) -> (y (B,T,D), DeltaNetState)."""

    def __init__(self, d_model: int, n_heads: int, head_dim_k: int | None = None, head_dim_v: int | None = None,
                 conv_size: int = 4, chunk_size: int = 64, recurrent_below: int = 8, norm_eps: float = 1e-6,
                 mimetic_init: bool = False):
        super().__init__()
        if d_model < 1 or n_heads < 1 or conv_size < 1 or chunk_size < 1:
            raise ValueError(f"d_model, n_heads, conv_size, chunk_size must be >= 1, got "
                             f"{d_model}, {n_heads}, {conv_size}, {chunk_size}")
        self.n_heads = n_heads
        self.dk = head_dim_k or d_model // n_heads
        self.dv = head_dim_v or d_model // n_heads
        if self.dk < 1 or self.dv < 1:
            raise ValueError(f"head dims must be >= 1 (d_model {d_model} < n_heads {n_heads}?)")
        self.conv_size, self.chunk_size, self.recurrent_below, self.norm_eps = conv_size, chunk_size, \
            recurrent_below, norm_eps
        hk, hv = n_heads * self.dk, n_heads * self.dv
        self.channels = 2 * hk + hv
        self.q_proj = nn.Linear(d_model, hk, bias=False)
        self.k_proj = nn.Linear(d_model, hk, bias=False)
        self.v_proj = nn.Linear(d_model, hv, bias=False)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        # depthwise causal conv over [q | k | v]: weight (channels, 1, W); tap W-1 multiplies the current token
        self.conv = nn.Conv1d(self.channels, self.channels, conv_size, groups=self.channels, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.dv))           # RMSNorm over Dv, shared across heads
        self.o_proj = nn.Linear(hv, d_model, bias=False)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.o_proj):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        # The short conv keeps PyTorch's default init (uniform, bound 1/sqrt(W)): an N(0, 0.02) conv would scale
        # q, k, v and every gradient into the projections by ~0.02, and a tiny model then needs far longer to learn
        # the previous-token keys that associative recall is built from.
        if mimetic_init:
            self.mimetic_init_()

    @torch.no_grad()
    def mimetic_init_(self, std: float = 0.02) -> None:
        """Start the layer as a working lookup (induction) circuit instead of noise.

        Mimetic initialisation (Trockman & Kolter 2023; for recurrent models Trockman et al. 2024, "Mimetic
        initialization helps state space models learn to recall"): set the weights so that, at step 0,
          * the short conv feeds q and v the current token and k the previous one (one-hot taps),
          * W_k = W_q, so the key written at t (token t-1) matches a later query of the same token,
          * W_o = W_vᵀ with W_v semi-orthogonal, so a retrieved value lands in the residual stream as the token it is.
        The write at t then stores (x_{t-1} -> x_t) and a query with x_s reads back what followed x_s earlier: the
        previous-token + copy circuit that a randomly initialised tiny model did not find in 400 steps of a copy task
        (its loss sits on a plateau until it does; README). Training is unchanged; only the starting point moves.
        With conv_size 1 there is no previous token, and k reads the current one.
        """
        hk, W = self.n_heads * self.dk, self.conv_size
        taps = torch.zeros_like(self.conv.weight)  # (channels, 1, W); tap W-1 multiplies the current token
        taps[:hk, 0, W - 1] = 1.0                  # q: current token
        taps[hk:2 * hk, 0, max(W - 2, 0)] = 1.0    # k: previous token
        taps[2 * hk:, 0, W - 1] = 1.0              # v: current token
        self.conv.weight.copy_(taps)
        self.k_proj.weight.copy_(self.q_proj.weight)  # (H·Dk, D)
        d_model = self.v_proj.weight.shape[1]
        nn.init.orthogonal_(self.v_proj.weight, gain=std * d_model ** 0.5)  # (H·Dv, D), entries ~ N(0, std)
        self.o_proj.weight.copy_(self.v_proj.weight.T)  # (D, H·Dv)

    def initial_state(self, batch: int, device=None) -> DeltaNetState:
        """Zero memory and an all-zero conv window (the state before the first token)."""
        return DeltaNetState(S=torch.zeros(batch, self.n_heads, self.dk, self.dv, device=device),
                             conv=torch.zeros(batch, self.conv_size - 1, self.channels, device=device))

    def forward(self, x: torch.Tensor, state: DeltaNetState | None = None) -> tuple[torch.Tensor, DeltaNetState]:
        y, state, _ = self._run(x, state)
        return y, state

    def forward_recorded(self, x: torch.Tensor, state: DeltaNetState | None = None):
        """forward(x, state) plus a record from which `snapshots` rebuilds the state after any position: (y, state,
        record). From the start (state None), or a later segment of a pass whose records `merge_records` joins.
        The record: the incoming conv window, x, k, v, beta, the states entering each chunk, the final state."""
        return self._run(x, state, record=True)

    def merge_records(self, records: list):
        """The record of the whole pass from those of its consecutive segments (the first from the start, all but
        the last a multiple of chunk_size tokens, so chunk boundaries stay where one pass puts them): the first
        segment's incoming conv window, x along T, k, v, beta along T, the chunk-entry states along N."""
        if any(r[1].shape[1] % self.chunk_size for r in records[:-1]):
            raise ValueError(f"recorded segments must be multiples of the chunk size {self.chunk_size} tokens")
        x = torch.cat([r[1] for r in records], 1)  # (B, T, D)
        k, v, beta, hs = (torch.cat([r[i] for r in records], 2) for i in range(2, 6))  # (B, H, T or N, ...)
        return records[0][0], x, k, v, beta, hs, records[-1][6]

    def snapshots(self, record, ends) -> list:
        """States after each position t of ends[b] (after reading x[b, :t+1]; batch 1, attached to the graph): the
        state entering t's chunk (an output of the chunked kernel) advanced over the r < C tokens of that chunk up
        to t, and the conv window of the last W-1 projections. Equal to segmenting each row's pass (tested).
        The record holds what these need and little more (2 KiB a token at the default width, 3.6 with q and the
        conv inputs): the layer's input x, from which the W-1 window rows are projected again, k, v and beta.
        Every piece is ONE gather over all snapshots: a slice per snapshot would cost, in the backward, a zero-filled
        gradient of the whole (B, H, T, .) tensor per slice."""
        conv0, x, k, v, beta, hs, final = record  # conv0 (B, W-1, ch) before x (B, T, D); k, v, beta (B, H, T, .)
        C, W, T, dev = self.chunk_size, self.conv_size, x.shape[1], x.device
        check_ends(ends, x.shape[0], T)
        hs = torch.cat([hs, final[:, :, None]], 2)  # (B, H, N+1, Dk, Dv): + the state after the last chunk
        b_of = torch.tensor([b for b, row in enumerate(ends) for _ in row], device=dev)  # (S,) row of each snapshot
        t_of = torch.tensor([t for row in ends for t in row], device=dev)  # (S,) its position
        n_of = (t_of + 1) // C  # complete chunks by t
        S = hs[b_of, :, n_of]  # (S, H, Dk, Dv): the state entering t's chunk
        R = max((t + 1) % C for row in ends for t in row)  # longest partial chunk (< C); from the list: no sync
        if R:  # ONE kernel call advances every snapshot over its partial chunk; rows past t are zeroed, and a row
            # with k = 0 and beta = 0 is an exact no-op
            pos = n_of[:, None] * C + torch.arange(R, device=dev)  # (S, R) token index of each partial-chunk row
            keep = pos <= t_of[:, None]  # (S, R)

            def partial(z):  # z[b, :, n*C .. n*C+R) of every snapshot, rows past t zeroed: (S, H, R, .)
                g = z[b_of[:, None], :, pos.clamp(max=T - 1)]  # (S, R, H, .)
                return (g * keep.view(*keep.shape, *[1] * (g.dim() - 2)).to(g.dtype)).movedim(1, 2)

            k_r, v_r, beta_r = map(partial, (k, v, beta))
            S = delta_rule_chunked(k_r, k_r, v_r, beta_r, chunk_size=C, initial_state=S)[1]  # q only reaches o: unused
        # the conv window: the pre-conv projections of tokens t-W+2 .. t, projected again from the record's input
        win = t_of[:, None] + torch.arange(2 - W, 1, device=dev)  # (S, W-1) token indices
        conv = self._project(x[b_of[:, None], win.clamp(min=0)])  # (S, W-1, D) -> (S, W-1, ch)
        if W > 1:  # tokens before the record's start: its incoming window (zeros from the start of a sequence)
            conv = torch.where((win < 0)[..., None], conv0.to(conv.dtype)[b_of[:, None], (win + W - 1).clamp(0, W - 2)],
                               conv)
        return [DeltaNetState(S=s, conv=c) for s, c in zip(S.split(1), conv.split(1))]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-conv [q | k | v] projections: (B, T, D) -> (B, T, 2·H·Dk + H·Dv)."""
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def _run(self, x: torch.Tensor, state: DeltaNetState | None, record: bool = False):
        """x (B, T, D), state or None (zeros) -> (y (B, T, D), the new DeltaNetState, record or None). The record
        (record=True) is (incoming conv window, x, k, v, beta, chunk-entry states, final S), what `snapshots` reads."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Dk, Dv = self.n_heads, self.dk, self.dv
        if state is None:
            state = self.initial_state(B, x.device)
        elif not isinstance(state, DeltaNetState):
            raise ValueError(f"a DeltaNet layer needs a DeltaNetState, got a {type(state).__name__}")
        check_fields(state, {"S": None, "conv": None}, x.device)  # floating-point tensors on x's device
        if state.S.shape != (B, H, Dk, Dv) or state.conv.shape != (B, self.conv_size - 1, self.channels):
            raise ValueError(f"state S {tuple(state.S.shape)}, conv {tuple(state.conv.shape)} does not fit input "
                             f"batch {B}: expected S {(B, H, Dk, Dv)}, conv {(B, self.conv_size - 1, self.channels)}")

        # projections, then causal depthwise conv with the cached left context (pitfall 7: multi-token cached calls)
        proj = self._project(x)                                                      # (B,T,2HDk+HDv)
        ctx = torch.cat([state.conv.to(proj.dtype), proj], dim=1)                    # (B,W-1+T,channels)
        # y_t = Σ_j w[j] x_{t-W+1+j}, written as W shifted multiply-adds: on CPU this is >100x faster to
        # differentiate than the depthwise F.conv1d (whose backward took 2/3 of a training step), same maths.
        weight = self.conv.weight[:, 0, :]                                           # (channels, W)
        conv_out = sum(ctx[:, j:j + T] * weight[:, j] for j in range(self.conv_size))  # (B,T,channels)
        conv_out = F.silu(conv_out)
        # (B,W-1,channels) pre-conv; a copy, as a view would keep all of ctx (B,W-1+T,channels) alive in the state
        new_conv = ctx[:, ctx.shape[1] - (self.conv_size - 1):].clone()
        q, k, v = conv_out.split([H * Dk, H * Dk, H * Dv], dim=-1)                   # (B,T,H·D) each
        q = q.reshape(B, T, H, Dk).transpose(1, 2)                                   # (B,H,T,Dk)
        k = k.reshape(B, T, H, Dk).transpose(1, 2)                                   # (B,H,T,Dk)
        v = v.reshape(B, T, H, Dv).transpose(1, 2)                                   # (B,H,T,Dv)
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)                   # fla l2norm eps
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)                         # (B,T,H) -> (B,H,T)

        # kernel switch as in fla: chunked for long calls, recurrent for short ones (both agree, tested)
        hs = None
        if record:  # the states entering every chunk too, for snapshots
            o, S, hs = delta_rule_chunked(q, k, v, beta, chunk_size=self.chunk_size, initial_state=state.S,
                                          chunk_states=True)
        elif T > self.recurrent_below:
            o, S = delta_rule_chunked(q, k, v, beta, chunk_size=self.chunk_size, initial_state=state.S)
        else:
            o, S = delta_rule_recurrent(q, k, v, beta, initial_state=state.S)         # o (B,H,T,Dv)

        # per-head RMSNorm over Dv, weight shared across heads; merge heads; output projection
        o32 = o.float() if o.dtype != torch.float64 else o                          # norm in fp32 (weights fp32)
        o = (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight).to(x.dtype)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, H * Dv))                    # (B,T,H·Dv) -> (B,T,D)
        saved = (state.conv, x, k, v, beta, hs, S) if record else None              # what snapshots() reads
        return y, DeltaNetState(S=S, conv=new_conv), saved                          # S fp32 (fp64 for fp64 x)
