"""REFINE steps 1-2: which positions of a document get a rollout? (method.md §1.2, §1.3, §2, §8.6, §9)

One teacher-forced pass over the documents (refine.py: the training forward itself in the default "single"
schedule, its values read detached; else a separate no-grad pass in eval mode) gives, at every position t,
  e_t = H(softmax(logits_t)) in nats: the entropy of predicting x_{t+1}. This is the code's convention (§1.2): the
        prefix ends at t, so a position is weighted by how uncertain the FIRST rollout token is (the paper's
        formula is off by one; smoothing hides most of the difference);
  h_gt(t) = the post-final-norm hidden state after reading x_t: the reward's ground-truth vectors (§1.6, §5).
The entropy is smoothed by a centred average pool (kernel k if k is odd, else k+1; zero padding counted in the
mean, as avg_pool1d(count_include_pad=True)). The T real tokens are cut into c chunks of C = floor(T/c) tokens
(chunk j = [jC, (j+1)C); the last T mod c tokens are never eligible) and one position is drawn per chunk with
p_j(t) = softmax_{t in chunk j}(ẽ_t / τ), τ = 1, from an explicit torch.Generator.
Ablations (paper Tab. 7): "uniform" (equal weights, same draw), "argmax" / "argmin" of the UNSMOOTHED entropy.

Deviations and choices:
- Documents are unpadded 1-D tensors, batched by RIGHT padding. A causal model never lets a later (pad) token
  change an earlier position, so s0 = 0 and no pad token ever enters a state (§9 "avoid left-padding").
  Before smoothing the pad positions are zeroed, so the pool sees exactly the zero padding of a lone document.
- Edge clamp scaled to the document length T. The code clamps the rollout start r = t+1 to [s0+20, S-20] at
  S = 16384. We use r >= min_prefix = max(1, round(20·T/16384)) and r <= T - end_margin with
  end_margin = max(k, round(20·T/16384)) >= k, so min_prefix tokens precede the rollout and all k ground-truth
  tokens x_r..x_{r+k-1} exist. Both are overridable. Clamping can make two chunks pick the same t.
- τ is a parameter (the paper has one; the code has none, i.e. τ = 1).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_mini.head_loss import IGNORE

MODES = ("entropy", "uniform", "argmax", "argmin")
CLAMP_TOKENS, CLAMP_REF_LEN = 20, 16384  # the official code's clamp: 20 tokens at a 16K context


@dataclass
class Selection:
    positions: torch.Tensor  # (B, K) long: prefix end t (inclusive); the rollout predicts x_{t+1..t+k}
    entropy: torch.Tensor  # (B, K) unsmoothed e_t at the selected positions, in nats (for logging)


def pad_documents(docs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D token tensors -> right-padded tokens (B, T_max) and lengths (B,)."""
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.long)
    tokens = torch.full((len(docs), int(lengths.max())), pad_id, dtype=torch.long, device=docs[0].device)
    for b, doc in enumerate(docs):
        tokens[b, :len(doc)] = doc
    return tokens, lengths


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run a block with model.eval(), then restore the previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def entropy_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (..., D) -> next-token entropy (...) in nats, read off the model's blockwise head loss with no targets
    (head_loss.py): the (rows, V) logits stay in cache instead of one (B, T, V) tensor (at V = 8193 that is 134 MB
    for B·T = 4096, read and written 4 times; on a 2-core CPU row blocks made the entropy pass 2x faster)."""
    no_targets = torch.full(hidden.shape[:-1], IGNORE, device=hidden.device)  # (...)
    return model.head_loss(hidden, no_targets, with_entropy=True)[2]


@torch.no_grad()
def teacher_forced_pass(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) -> entropy e (B, T) in nats (e_t = H(p(.|x_<=t))) and post-norm hidden h_gt (B, T, D)."""
    with eval_mode(model):
        hidden, _ = model.encode(tokens)  # (B, T, D)
        return entropy_from_hidden(model, hidden), hidden


def smoothing_kernel(k: int) -> int:
    """The code's kernel: k if k is odd, else k+1 (a centred window needs an odd size)."""
    return k if k % 2 else k + 1


def smooth_entropy(entropy: torch.Tensor, lengths: torch.Tensor, kernel: int) -> torch.Tensor:
    """Centred moving average, zero padding counted: ẽ_t = (1/kernel) sum_{|i| <= kernel//2} e_{t+i}. (B, T) -> (B, T).
    ValueError unless kernel is a positive odd int."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"smoothing kernel must be a positive odd integer, got {kernel}")
    T = entropy.shape[1]
    real = torch.arange(T, device=entropy.device)[None, :] < lengths.to(entropy.device)[:, None]  # (B, T)
    padded = torch.where(real, entropy, torch.zeros_like(entropy))  # pad positions -> the pool's zero padding
    pooled = F.avg_pool1d(padded[:, None, :], kernel, stride=1, padding=kernel // 2,
                          count_include_pad=True)  # (B, 1, T) -> (B, 1, T)
    return pooled[:, 0, :]  # (B, T)


def edge_clamp(length: int, k: int, min_prefix: int | None = None,
               end_margin: int | None = None) -> tuple[int, int]:
    """Allowed range [lo, hi] of the prefix end t = r - 1 for a document of `length` tokens (see module doc)."""
    scaled = round(CLAMP_TOKENS * length / CLAMP_REF_LEN)
    min_prefix = max(1, scaled) if min_prefix is None else min_prefix
    end_margin = max(k, scaled) if end_margin is None else end_margin
    if min_prefix < 1 or end_margin < k:
        raise ValueError(f"need min_prefix >= 1 and end_margin >= k={k}, got {min_prefix} and {end_margin}")
    lo, hi = min_prefix - 1, length - end_margin - 1  # r in [min_prefix, T - end_margin], t = r - 1
    if lo > hi:
        raise ValueError(f"document of {length} tokens is too short for min_prefix={min_prefix}, "
                         f"end_margin={end_margin}")
    return lo, hi


def check_document_length(length: int, c: int, k: int, min_prefix: int | None = None,
                          end_margin: int | None = None) -> None:
    """Raise ValueError (one line) unless select_positions can place c prefix ends in a `length`-token document."""
    if length < c:
        raise ValueError(f"documents of {length} tokens cannot be cut into c={c} chunks")
    edge_clamp(length, k, min_prefix, end_margin)


def select_positions(entropy: torch.Tensor, lengths: torch.Tensor, c: int, k: int, mode: str = "entropy",
                     tau: float = 1.0, kernel: int | None = None, generator: torch.Generator | None = None,
                     min_prefix: int | None = None, end_margin: int | None = None) -> Selection:
    """entropy (B, T) (right-padded), lengths (B,) -> one prefix end per chunk: Selection with (B, c) tensors.
    ValueError for: an unknown mode; c or k not an int >= 1; a tau that is not finite and > 0 (the message names
    "tau"); lengths not (B,) in [1, T] or an empty batch (it names "lengths"); a sampling mode ("entropy",
    "uniform") without a generator (it names the "generator": never torch's global RNG); a document too short for
    c chunks and k-token rollouts (check_document_length)."""
    if mode not in MODES:
        raise ValueError(f"unknown selection mode {mode!r}: choose one of {MODES}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (c, k)):
        raise ValueError(f"c and k must be ints >= 1, got c={c!r}, k={k!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    lengths = torch.as_tensor(lengths, device=entropy.device)  # a list of ints too
    lens = lengths.tolist()  # (B,) as ints: one host sync for the checks and the per-document loop below
    if entropy.dim() != 2 or len(entropy) < 1 or lengths.shape != entropy.shape[:1] or \
            not all(1 <= n <= entropy.shape[1] for n in lens):
        raise ValueError(f"need entropy (B >= 1, T) and lengths (B,) in [1, T], got {tuple(entropy.shape)} and {lens}")
    if generator is None and mode in ("entropy", "uniform"):  # never torch's global RNG (model.sample_token)
        raise ValueError(f"selection mode {mode!r} samples: it needs an explicit torch.Generator")
    if not bool(torch.isfinite(entropy).all()):
        raise FloatingPointError("non-finite next-token entropies (the logits overflowed); stopping")
    smoothed = smooth_entropy(entropy, lengths, smoothing_kernel(k) if kernel is None else kernel)  # (B, T)
    rows = []
    for b, length in enumerate(lens):
        check_document_length(length, c, k, min_prefix, end_margin)
        C = length // c  # chunk size; the last length mod c tokens are never eligible
        raw = entropy[b, :c * C].reshape(c, C)  # (c*C,) -> (c, C): row j = chunk [jC, (j+1)C)
        if mode == "argmax":
            offset = raw.argmax(dim=1)  # (c,)
        elif mode == "argmin":
            offset = raw.argmin(dim=1)  # (c,)
        else:
            scores = smoothed[b, :c * C].reshape(c, C) / tau if mode == "entropy" else torch.zeros_like(raw)  # (c, C)
            probs = torch.softmax(scores.float(), dim=1)  # p_j(t) = exp(ẽ_t/τ) / sum_{t' in chunk j} exp(ẽ_t'/τ)
            offset = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (c, 1) -> (c,)
        t = offset + torch.arange(c, device=offset.device) * C  # chunk offset -> absolute position, (c,)
        lo, hi = edge_clamp(length, k, min_prefix, end_margin)
        rows.append(t.clamp(lo, hi))
    positions = torch.stack(rows)  # (B, c)
    return Selection(positions=positions, entropy=entropy.gather(1, positions))  # (B, T) gather (B, c) -> (B, c)
