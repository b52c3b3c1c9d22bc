"""The fast-weight language model: embedding -> N x [mixer + SwiGLU MLP] -> final norm -> LM head.

Question answered: what is the policy that REFINE trains, and what exactly is its recurrent state?

The block is the pre-norm block of fla's DeltaNet and of LaCT (shared doc fast-weights.md §2.2, §3.1):
    x = x + Mixer(RMSNorm(x));   x = x + SwiGLU(RMSNorm(x))
with Mixer = DeltaNet (chunked delta rule) or LaCT (large-chunk test-time training + sliding-window attention).
There is no positional embedding: position lives in the recurrent state (and in LaCT's RoPE).

`forward` always returns per-token logits (B, T, V) *and* the post-final-norm hidden states (B, T, D) -- the
vectors REFINE's cosine reward compares (method.md §1.2, §5) -- *and* the new recurrent state. There is no
"last position only" shortcut: RL needs every position's log-probability.

The recurrent state is an explicit value, `ModelState` (state.py), one entry per layer.

Memory switches (attributes, not config: they change numbers at rounding level only): `fused_head` (on: losses
without the (B, T, V) logits, head_loss.py) and `set_checkpointing` (off: activation checkpointing, whole blocks or
pieces, `_run_block`).
Compute switch: `set_precision` ("fp32", the default; "bf16": every entry point -- encode, encode_recorded,
snapshots, head, head_loss -- runs under bf16 autocast over the fp32 weights, the paper's setting, method.md §2).
Under it the projections, MLPs and the LM head's matmuls run in bf16; the fast-weight kernels (`autocast_off`), the
norms, softmaxes and losses stay fp32, and so do the residual stream, the hidden states and the fast-weight memories
(DeltaNet's conv window caches its bf16 projections as they are).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refine_mini.common import PRECISIONS
from refine_mini.deltanet import DeltaNet
from refine_mini.head_loss import head_loss, head_loss_reference
from refine_mini.lact import LaCT
from refine_mini.state import ModelState
from refine_mini.tokenizer import check_token_ids


@dataclass
class ModelConfig:
    mixer: str = "deltanet"  # sequence mixer: "deltanet" (delta rule) or "lact" (large-chunk TTT + window attention)
    vocab_size: int = 8193  # 8192 GPT-2 BPE ranks + <|endoftext|> (tokenizer.py)
    d_model: int = 128  # residual stream width D (laptop size: pre-training takes ~5 minutes on 2 CPU cores)
    n_layers: int = 4  # number of [mixer + MLP] blocks
    n_heads: int = 2  # DeltaNet heads (head dim D/n_heads = 64) / LaCT sliding-window attention heads
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * D, rounded up to a multiple of 64
    norm_eps: float = 1e-6  # RMSNorm epsilon, as both paper models
    init_std: float = 0.02  # N(0, init_std) for embeddings and linear weights (fla's initializer_range)
    # Tied input/output embeddings. Both paper models are untied, but they start from real pre-training; ours is a few
    # CPU minutes from scratch, and a retrieved value must leave through the head as the token it is. Pre-training
    # with answer-weighted NTP (trainer.py), 300 steps, S-NIAH recall at 512 tokens on 40 needles: tied 97.5 %
    # (noise haystack) / 92.5 % (essay), untied 7.5 % / 2.5 %.
    tie_embeddings: bool = True
    # DeltaNet
    conv_size: int = 4  # causal depthwise short convolution on q, k, v
    chunk_size: int = 64  # WY/UT chunk of the chunked delta-rule kernel
    # Start each DeltaNet layer as a previous-token + copy lookup (DeltaNet.mimetic_init_) instead of noise. Default
    # pre-training (same steps, same data): validation loss 1.00 -> 0.91 nats/token. Not fla's init; only matters
    # when training from scratch.
    mimetic_init: bool = True
    # LaCT
    n_heads_fast: int = 1  # fast-weight heads (SwiGLU fast weights W0, W1, W2 per head, d = D/n_heads_fast)
    lact_chunk: int = 128  # tokens per fast-weight update (the paper's model uses 2048 at 32K context)
    window: int = 128  # sliding-window attention span; must be >= lact_chunk
    use_muon: bool = False  # Newton-Schulz orthogonalised fast-weight updates

    def __post_init__(self):
        if self.mixer not in ("deltanet", "lact"):
            raise ValueError(f"unknown model {self.mixer!r}: choose 'deltanet' or 'lact'")
        sizes = dict(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                     n_heads_fast=self.n_heads_fast, conv_size=self.conv_size, chunk_size=self.chunk_size,
                     lact_chunk=self.lact_chunk, window=self.window)
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
            raise ValueError(f"model sizes must be ints >= 1, got {sizes}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


class SwiGLU(nn.Module):
    """MLP(x) = W_down (silu(W_gate x) * W_up x), bias-free, as in both paper models."""

    def __init__(self, d_model: int, ratio: float):
        super().__init__()
        hidden = 64 * math.ceil(ratio * d_model * 2 / 3 / 64)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.mixer == "deltanet":
            self.mixer = DeltaNet(cfg.d_model, cfg.n_heads, conv_size=cfg.conv_size,
                                  chunk_size=cfg.chunk_size, norm_eps=cfg.norm_eps, mimetic_init=cfg.mimetic_init)
        else:
            self.mixer = LaCT(cfg.d_model, cfg.n_heads, cfg.n_heads_fast, chunk_size=cfg.lact_chunk,
                              window=cfg.window, use_muon=cfg.use_muon, norm_eps=cfg.norm_eps)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_ratio)

    def forward(self, x, state=None):
        return self._residuals(x, *self.mixer(self.mixer_norm(x), state))

    def forward_recorded(self, x, state=None):
        """forward(x, state) with the mixer's record for snapshots as well: (x, state, record)."""
        mixed, state, record = self.mixer.forward_recorded(self.mixer_norm(x), state)
        return (*self._residuals(x, mixed, state), record)

    def _residuals(self, x, mixed, extra):
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), extra  # (B, T, D), the mixer's state or record


def _in_precision(method):
    """Run a FastWeightLM entry point under the model's compute precision (set_precision): bf16 autocast or none."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.autocast(self.embed.weight.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return method(self, *args, **kwargs)
    return run


class FastWeightLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, module in self.named_modules():
            # Mixers initialise their own special parameters (fast-weight inits, lr biases); we only set the
            # generic ones: embeddings and the LM head / MLP linears.
            if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and ".mixer" not in f".{name}"):
                nn.init.normal_(module.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # (V, D): one matrix reads and writes tokens
        self.fused_head = True  # head_loss: blockwise fused cross-entropy (False: the plain full-logits reference)
        self.grad_checkpoint, self.checkpoint_segment = False, 0  # set_checkpointing: off, whole sequences
        self.precision = "fp32"  # set_precision: no autocast

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @_in_precision
    def encode(self, tokens: torch.Tensor, state: ModelState | None = None):
        """tokens (B, T) -> hidden (B, T, D) after the final norm, new ModelState. No LM head: callers that need
        logits at a few positions only (rollouts, REFINE's first token) or in row blocks (entropy) apply `head`."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty (B, T) tensor, got shape {tuple(tokens.shape)}")
        layer_states = state.layers if state is not None else [None] * len(self.blocks)
        if len(layer_states) != len(self.blocks):  # zip would silently run only as many blocks as states
            raise ValueError(f"state has {len(layer_states)} layer states, the model {len(self.blocks)} blocks")
        x = self.embed(tokens)  # (B, T, D)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            x, layer_state, _ = self._run_block(block, x, layer_state)
            new_states.append(layer_state)
        return self.final_norm(x), ModelState(new_states)  # (B, T, D): the vector REFINE's cosine reward compares

    def set_checkpointing(self, enabled: bool, segment: int = 0) -> None:
        """Activation checkpointing per block, on `segment`-token pieces if segment > 0 (which turns it on). ValueError
        for a segment the recorded pass could not join: it must be a multiple of every mixer's chunk."""
        chunks = sorted({block.mixer.chunk_size for block in self.blocks})
        if segment < 0 or any(segment % c for c in chunks):
            raise ValueError(f"--checkpoint-segment {segment} must be a multiple of the model's chunk size "
                             f"({', '.join(map(str, chunks))} tokens)")
        self.grad_checkpoint, self.checkpoint_segment = enabled or segment > 0, segment

    def set_precision(self, precision: str) -> None:
        """"fp32" or "bf16" (bf16 autocast in every entry point; the weights stay fp32). ValueError otherwise."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision

    def _run_block(self, block, x, state, recorded: bool = False):
        """block(x, state) -> (x, state, the mixer's record if `recorded` else None).

        With `grad_checkpoint` on and autograd recording, the block's inner activations are not kept: the backward
        recomputes them from its inputs (method.md §2: the paper trains with per-layer gradient checkpointing), a
        non-reentrant checkpoint (use_reentrant=False: the incoming ModelState is no tensor but needs grads). With
        `checkpoint_segment` S > 0 the block reads S-token pieces one after another, each checkpointed on its own,
        carrying the state: the same numbers (a split pass equals one pass), and the backward recomputes one piece
        at a time. Without grad the pieces apply too (one piece's transient activations at a time). A recorded pass
        joins the pieces' records (mixer.merge_records)."""
        def run(piece, piece_state):  # -> (y (B, S, D), state, record or None)
            return block.forward_recorded(piece, piece_state) if recorded else (*block(piece, piece_state), None)
        checkpointed = self.grad_checkpoint and torch.is_grad_enabled()
        if not (checkpointed or self.checkpoint_segment):
            return run(x, state)
        ys, records = [], []
        for piece in x.split(self.checkpoint_segment or x.shape[1], dim=1):  # (B, S, D) each, the last one shorter
            y, state, record = (checkpoint(run, piece, state, use_reentrant=False) if checkpointed  # no random draws
                                else run(piece, state))
            ys.append(y)
            records.append(record)
        if recorded and len(records) > 1:
            records = [block.mixer.merge_records(records)]
        return torch.cat(ys, 1) if len(ys) > 1 else ys[0], state, records[0]  # (B, T, D), state, record or None

    def can_snapshot(self) -> bool:
        """True when every mixer can rebuild prefix states from a recorded full pass (DeltaNet and LaCT both can)."""
        return all(hasattr(block.mixer, "forward_recorded") for block in self.blocks)

    @_in_precision
    def encode_recorded(self, tokens: torch.Tensor, ends: list | None = None):
        """encode(tokens) from the start, plus per-layer records for `snapshots`; or, given `ends`, the snapshots, each
        layer's built once its pass ends, so no record ((B, T, .) tensors) outlives its layer. Needs can_snapshot()."""
        x = self.embed(tokens)  # (B, T, D)
        out = []
        for block in self.blocks:
            x, _, record = self._run_block(block, x, None, recorded=True)
            out.append(record if ends is None else block.mixer.snapshots(record, ends))
            del record  # with ends, the last reference to this layer's record
        return self.final_norm(x), (out if ends is None else [ModelState(list(layers)) for layers in zip(*out)])

    @_in_precision
    def snapshots(self, records: list, ends: list) -> list:
        """For each row b and position t in ends[b], the ModelState after reading tokens[b, :t+1] (batch 1,
        attached to the recorded pass's graph), row-major."""
        per_layer = [block.mixer.snapshots(rec, ends) for block, rec in zip(self.blocks, records)]
        return [ModelState(list(layers)) for layers in zip(*per_layer)]

    @_in_precision
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V) in fp32 at least (an fp64 model stays fp64)."""
        logits = self.lm_head(hidden)  # (..., D) @ (D, V) -> (..., V)
        return logits if logits.dtype == torch.float64 else logits.float()

    @_in_precision
    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor | None = None,
                  with_entropy: bool = False):
        """Σ_r w_r · CE(head(hidden_r), targets_r) without the (..., V) logits (head_loss.py): hidden (..., D),
        targets (...) with IGNORE where there is none -> (loss with grad, nll (...), entropy (...) or None, both
        detached). `fused_head = False` (an attribute, default True) takes the plain full-logits path instead."""
        loss_fn = head_loss if self.fused_head else head_loss_reference
        return loss_fn(hidden, self.lm_head.weight, targets, row_weights, with_entropy)

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None):
        """tokens (B, T) -> logits (B, T, V), hidden (B, T, D) after the final norm, new ModelState."""
        hidden, state = self.encode(tokens, state)
        return self.head(hidden), hidden, state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, state: ModelState | None = None,
                 stop_tokens: tuple[int, ...] = ()):
        """Prefill `prompt` (B, T) of token ids once, then decode token by token from the carried state.

        Never re-encodes the prefix: each step feeds one token and the state. temperature 0 is greedy. Decoding ends
        early once every row has emitted one of `stop_tokens` (later tokens of finished rows are still produced, and
        callers cut at the first stop token). Returns (new tokens (B, N), ModelState): the state has read the prompt and
        every new token but the last, which is sampled and never fed (feed it to go on)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_token_ids(prompt, self.embed.num_embeddings)  # once per call, not per decoded token
        logits, _, state = self(prompt, state)
        if not bool(torch.isfinite(logits[:, -1]).all()):  # once per call: greedy argmax would hide it
            raise FloatingPointError("non-finite logits after the prompt (NaN or inf weights or activations)")
        out = []
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        stops = torch.tensor(stop_tokens, dtype=torch.long, device=prompt.device)  # (S,)
        for step in range(max_new_tokens):
            next_token = sample_token(logits[:, -1], temperature, generator)  # (B,)
            out.append(next_token)
            if stop_tokens:
                finished |= torch.isin(next_token, stops)
                if bool(finished.all()):
                    break
            if step + 1 < max_new_tokens:
                logits, _, state = self(next_token[:, None], state)  # (B, 1) -> logits (B, 1, V)
        return torch.stack(out, dim=1), state  # (B, N)


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy at temperature 0, else a draw from softmax(logits / temperature).
    The max is subtracted before dividing (softmax does it anyway; at temperature 1 the numbers are the same), so a
    tiny temperature tends to greedy instead of overflowing to inf / inf."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    if generator is None:  # never torch's global RNG: one seed drives everything, through explicit generators
        raise ValueError("sampling needs an explicit torch.Generator (common.make_generator)")
    logits = logits.float()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)  # (B, V)
    if not bool(torch.isfinite(probs).all()):
        raise FloatingPointError("cannot sample from non-finite logits (NaN or inf weights or activations)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B, 1) -> (B,)
