"""One REFINE optimizer step: NTP + GRPO on next-k-token rollouts (method.md §1.1, §1.8, §1.9, §2, §8, §9).

    L = λ_NTP · NTP(whole documents) + λ_RL · PPO-clip(rollouts),   one backward, one AdamW step.

`refine_step` reads as four steps (method.md §1 counts seven): 1) select positions by entropy, 2) rollouts,
3) rewards, 4) GRPO + NTP loss. The policy gradient flows THROUGH THE PREFIX: the state conditioning each rollout is
part of the autograd graph, so the slow weights learn to write fast-weight memory that supports the continuation (§8.2;
`detach_prefix=True` reproduces the pre-release no_grad-prefix shortcut, as an ablation).

Two paths compute `refine_loss` for FIXED rollouts and agree in loss and every gradient (tests/test_refine_step.py):
- fast (default): ONE batched forward with grad over the documents (rollout.document_forward), from whose record
  the prefix snapshots are rebuilt (segmented_forward, one document split at its positions, as the fallback).
  It gives the hidden states (-> the NTP term by model.head_loss, blockwise: no (B, T, V) logits, head_loss.py)
  and the attached state snapshots; logp(x̂_1) comes from the logits at the c prefix ends only, and x̂_1..x̂_{k-1}
  go through ONE multi-token call from all attached snapshots stacked and forked (rollout.stack_states).
  In `refine_step` the same forward also feeds the rollouts (sampled from DETACHED copies of the snapshots).
- reference (clarity, as the official code): NTP on each whole document, plus [prefix ; rollout] re-encoded from
  scratch with grad for every prefix.

Schedules (`schedule`):
- "single" (default): one optimizer step per batch. Rollouts are sampled from the very forward that is
  differentiated, so it is on-policy (ratio = 1 up to rounding: the rollouts decode token by token and the loss
  reads them in one call, a last-bit difference, <= 1e-6 in fp32; clipping never acts) and the cheapest: no separate
  rollout pass. This equals the official loop with one mini-batch.
- "minibatch" (official, §1.8): rollouts for the whole batch first (no grad), then `minibatches` optimizer steps over
  contiguous document slices, each recomputing its forward. Later mini-batches are slightly off-policy, which is
  the only place where the PPO clip acts. Advantages are computed once on the whole batch (groups never straddle
  mini-batches: a group lies inside one document).

The "single" schedule runs ONE forward in all: the teacher-forced pass of step 1 is the training forward itself
(with grad; entropies, from the same blockwise logits as the NTP term, and h_gt are read off it detached -- the
same values, the models have no dropout), and the prefix snapshots are rebuilt afterwards from its record
(model.snapshots: DeltaNet from the kernel's chunk-entry states, LaCT from its chunk history).
Deviations: the NTP term is the token-mean CE over all documents of the (mini-)batch (verl averages per micro-batch);
see selection.py / grpo.py for theirs. Documents of unequal length are read as one right-padded batch (causal, so
the padding changes nothing before it; padded positions get no NTP target, no rollout and no reward).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_mini.common import clock
from refine_mini.grpo import group_advantages, group_ids, ppo_clip_loss
from refine_mini.rewards import REWARDS, compute_rewards
from refine_mini.rollout import (Rollouts, document_forward, log_probs, recorded_forward, rollout_logp,
                                 rollouts_forked, sample_rollouts)
from refine_mini.selection import (MODES, Selection, check_document_length, pad_documents,
                                  select_positions, teacher_forced_pass)
from refine_mini.tokenizer import check_token_ids
from refine_mini.trainer import IGNORE, clip_and_step


@dataclass
class RefineConfig:
    c: int = 8  # chunks per document = selected positions K per document (method.md §2)
    k: int = 5  # rollout length L: tokens sampled after each prefix (exactly k, temperature 1)
    n: int = 1  # rollouts per position; n=1: a GRPO group = the c rollouts of a document, n>1: the n samples of a prefix
    selection: str = "entropy"  # entropy | uniform | argmax | argmin (paper Tab. 7 ablation)
    reward: str = "cosine"  # reward driving the advantage: cosine (mid) | binary (TTT) | hybrid (post); all are logged
    lambda_ntp: float = 1.0  # λ_SFT: weight of the whole-document NTP loss
    lambda_rl: float = 0.2  # λ_RL: weight of the PPO-clip loss (0.4 for TTT with the binary reward)
    clip_eps: float = 0.2  # PPO clip ε (low = high)
    dual_clip: float = 3.0  # dual clip c: for A < 0 the token loss is capped at -A·c
    adv_eps: float = 1e-6  # A = (R - mean) / (std + adv_eps)
    smooth_kernel: int | None = None  # entropy smoothing kernel (odd); None -> k if k is odd else k+1
    tau: float = 1.0  # temperature of the per-chunk softmax(ẽ/τ)
    min_prefix: int | None = None  # tokens before the rollout start r = t+1; None -> max(1, round(20·T/16384))
    end_margin: int | None = None  # r <= T - end_margin (>= k); None -> max(k, round(20·T/16384))
    schedule: str = "single"  # "single": one on-policy step per batch | "minibatch": official, several steps
    minibatches: int = 4  # optimizer steps per batch with schedule="minibatch" (documents split evenly)
    detach_prefix: bool = False  # ablation: no policy gradient through the prefix (pre-release shortcut, §8.2)

    def __post_init__(self):
        if self.selection not in MODES:
            raise ValueError(f"unknown selection {self.selection!r}: choose one of {MODES}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}: choose one of {REWARDS}")
        if self.schedule not in ("single", "minibatch"):
            raise ValueError(f"unknown schedule {self.schedule!r}: choose 'single' or 'minibatch'")
        counts = (self.c, self.k, self.n, self.minibatches)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in counts):
            raise ValueError(f"c, k, n and minibatches must all be ints >= 1, got {counts}")
        if not (0 < self.clip_eps < 1 and 1 < self.dual_clip < math.inf and 0 < self.adv_eps < math.inf):
            raise ValueError(f"need 0 < clip_eps < 1, a finite dual_clip > 1 and a finite adv_eps > 0, got "
                             f"{self.clip_eps}, {self.dual_clip}, {self.adv_eps}")
        if not (0 < self.tau < math.inf):
            raise ValueError(f"tau must be finite and > 0, got {self.tau}")
        if self.smooth_kernel is not None and not (isinstance(self.smooth_kernel, int) and self.smooth_kernel >= 1
                                                   and self.smooth_kernel % 2 == 1):
            raise ValueError(f"smooth_kernel must be None or a positive odd int, got {self.smooth_kernel!r}")
        if not (0 <= self.lambda_ntp < float("inf") and 0 <= self.lambda_rl < float("inf")):
            raise ValueError(f"lambda_ntp and lambda_rl must be finite and >= 0, got {self.lambda_ntp}, {self.lambda_rl}")

    def check_length(self, length: int) -> None:
        """Raise ValueError unless c prefix ends, each followed by k rollout tokens, fit a `length`-token document."""
        check_document_length(length, self.c, self.k, self.min_prefix, self.end_margin)


def as_documents(tokens, vocab_size: int | None = None) -> list[torch.Tensor]:
    """(B, T) LongTensor or a list of 1-D LongTensors (documents of different lengths) -> list of 1-D tensors.
    ValueError unless they are int64/int32 token ids, in [0, vocab_size) when it is given."""
    docs = list(tokens.unbind(0)) if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else list(tokens)
    if not docs or any(not isinstance(d, torch.Tensor) or d.dim() != 1 or len(d) < 2 for d in docs):
        raise ValueError("tokens must be a (B, T) tensor or a non-empty list of 1-D tensors of >= 2 tokens")
    if any(d.dtype not in (torch.int64, torch.int32) for d in docs):  # each document's (cat would promote bool)
        raise ValueError(f"tokens must be int64 or int32 ids, got {sorted({str(d.dtype) for d in docs})}")
    if vocab_size is not None:  # one host sync per batch
        check_token_ids(torch.cat([d.to(docs[0].device) for d in docs]), vocab_size)
    return docs


def _ntp_targets(docs: list, width: int | None = None) -> torch.Tensor:
    """Next-token targets, position t of a document predicting its t+1: (ΣT_b,) for the concatenated documents, or
    (B, width) for the right-padded batch. Positions without a target (each document's last, and padding) get
    IGNORE -- not [:-1] slices, whose backward would zero-fill a whole (T, V) tensor."""
    rows = [F.pad(doc[1:], (0, 1 + (width - len(doc) if width else 0)), value=IGNORE) for doc in docs]
    return torch.stack(rows) if width else torch.cat(rows)  # doc shifted left


def _ntp_sum(logits: torch.Tensor, docs: list) -> torch.Tensor:
    """Summed next-token CE from full logits (T, V) of one document: the reference path's plain form."""
    return F.cross_entropy(logits, _ntp_targets(docs), ignore_index=IGNORE, reduction="sum")  # (T, V) vs (T,)


def _reference_logp(model, docs, rollouts: Rollouts, detach_prefix: bool) -> torch.Tensor:
    """log π_θ(x̂_j | prefix, x̂_<j) (N, k) by re-encoding [prefix ; rollout] from scratch for every prefix."""
    n, out = rollouts.n, []
    for row in range(0, rollouts.tokens.shape[0], n):  # one prefix and its n samples
        b, t = int(rollouts.doc[row]), int(rollouts.pos[row])
        prefix = docs[b][None, :t + 1].expand(n, -1)  # (n, t+1)
        sampled = rollouts.tokens[row:row + n]  # (n, k)
        if detach_prefix:
            with torch.no_grad():
                prefix_logits, _, state = model(prefix)  # (n, t+1, V)
            logits = prefix_logits[:, -1:]  # (n, 1, V): predicts x̂_1, no grad
            if sampled.shape[1] > 1:
                logits = torch.cat([logits, model(sampled[:, :-1], state)[0]], 1)  # (n, k, V)
        else:
            full_logits, _, _ = model(torch.cat([prefix, sampled[:, :-1]], 1))  # (n, t+k, V)
            logits = full_logits[:, t:]  # logits at t..t+k-1 predict x̂_1..x̂_k: (n, k, V)
        logp = log_probs(logits)  # (n, k, V)
        out.append(logp.gather(2, sampled[..., None])[..., 0])  # (n, k, V) gather (n, k, 1) -> (n, k)
    return torch.cat(out)  # (N, k)


def refine_loss(model, docs: list, selection: Selection, rollouts: Rollouts, advantages: torch.Tensor,
                cfg: RefineConfig, path: str = "fast", doc_forward=None):
    """λ_NTP·NTP + λ_RL·PPO-clip for FIXED rollouts -> (loss with grad, stats). `doc_forward` reuses a fast forward.

    NTP: the summed next-token CE of all documents / Σ_b (L_b - 1), a token mean (doc_forward.ntp_sum, when set, is
    that sum). PPO: grpo.ppo_clip_loss(logp, rollouts.old_logp, advantages, cfg.clip_eps, cfg.dual_clip) with
    logp (N, k) WITH grad: path "fast" from document_forward's first_logits and snapshots (rollout.rollout_logp),
    "reference" by re-encoding every [prefix ; rollout] from scratch; another path is a ValueError.
    cfg.detach_prefix: no gradient through the prefix at all, neither its state nor the prefix-end logits that score
    x̂_1 (reference: the prefix runs under no_grad, the rollout from its state). stats: ppo_clip_loss's, plus the
    floats `loss`, `ntp_loss`, `policy_loss`."""
    n_targets = sum(len(d) - 1 for d in docs)
    if path == "fast":
        fwd = doc_forward if doc_forward is not None else document_forward(model, docs, selection.positions)
        ntp_sum = (fwd.ntp_sum if fwd.ntp_sum is not None  # refine_step's "single" schedule computed it already
                   else model.head_loss(torch.cat(fwd.hidden), _ntp_targets(docs))[0])  # hidden (ΣL, D), fused head
        first_logits, snapshots = fwd.first_logits, fwd.snapshots  # attached: grad flows into the prefix
        if cfg.detach_prefix:
            first_logits, snapshots = first_logits.detach(), [s.detach() for s in snapshots]
        logp = rollout_logp(model, first_logits, snapshots, rollouts.tokens, rollouts.n)  # (N, k)
    elif path == "reference":
        ntp_sum = sum(_ntp_sum(model(doc[None])[0][0], [doc]) for doc in docs)  # (1, T, V) -> (T, V)
        logp = _reference_logp(model, docs, rollouts, cfg.detach_prefix)  # (N, k)
    else:
        raise ValueError(f"unknown path {path!r}: choose 'fast' or 'reference'")
    ntp = ntp_sum / n_targets
    policy, stats = ppo_clip_loss(logp, rollouts.old_logp, advantages, cfg.clip_eps, cfg.dual_clip)
    loss = cfg.lambda_ntp * ntp + cfg.lambda_rl * policy
    stats.update(loss=loss.item(), ntp_loss=ntp.item(), policy_loss=policy.item())
    return loss, stats


def _batch_metrics(rewards: dict, flat: torch.Tensor, selection: Selection) -> dict:
    out = {}
    for name, values in rewards.items():
        out[f"reward_{name}_mean"] = float(values.mean())
        out[f"reward_{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
    out["frac_zero_std_groups"] = float(flat.float().mean())
    out["selected_entropy_mean"] = float(selection.entropy.mean())
    return out


def _update(model, optimizer, loss, grad_clip: float) -> float:
    loss.backward()
    return clip_and_step(model, optimizer, grad_clip)  # skips the step on a non-finite grad norm


def refine_step(model, optimizer, tokens, cfg: RefineConfig, generator: torch.Generator, grad_clip: float = 1.0):
    """One REFINE batch -> metrics dict ("single") or a list of dicts, one per optimizer step ("minibatch")."""
    docs = as_documents(tokens, model.cfg.vocab_size)
    device = docs[0].device
    start_time = clock(device)
    padded, lengths = pad_documents(docs)  # (B, T_max), (B,)
    optimizer.zero_grad(set_to_none=True)

    # 1) select positions by entropy: a teacher-forced pass gives e_t and h_gt
    recorded = cfg.schedule == "single" and model.can_snapshot()
    if recorded:  # the training forward (WITH grad) is that pass; snapshots are rebuilt from its record below
        full, records = model.encode_recorded(padded)  # (B, T_max, D)
        targets = _ntp_targets(docs, padded.shape[1])  # (B, T_max)
        ntp_sum, _, entropy = model.head_loss(full, targets, with_entropy=True)  # the NTP term and the entropies
        h_gt = full.detach()  # share one pass over the LM head's logits (blockwise: no (B, T_max, V) tensor)
    else:  # a separate no-grad pass (eval mode)
        entropy, h_gt = teacher_forced_pass(model, padded)  # (B, T_max), (B, T_max, D)
    selection = select_positions(entropy, lengths, cfg.c, cfg.k, cfg.selection, cfg.tau, cfg.smooth_kernel,
                                 generator, cfg.min_prefix, cfg.end_margin)  # positions (B, c)

    # 2) rollouts: k tokens from every prefix state, n times
    if cfg.schedule == "single":
        fwd = (recorded_forward(model, full, records, lengths.tolist(), selection.positions, ntp_sum) if recorded
               else document_forward(model, docs, selection.positions))  # WITH grad: hidden + attached snapshots
        rollouts = sample_rollouts(model, fwd, selection.positions, cfg.k, cfg.n, generator)  # detached copies
    else:
        fwd = None
        rollouts = rollouts_forked(model, docs, selection.positions, cfg.k, cfg.n, generator)  # no grad
    rollout_time = clock(device) - start_time

    # 3) rewards (all three logged) and GRPO advantages within each group
    rewards = compute_rewards(rollouts, padded, h_gt, lengths)  # dict of (N,)
    advantages, flat = group_advantages(rewards[cfg.reward], group_ids(rollouts), cfg.adv_eps)  # (N,), (n_groups,)
    batch_metrics = _batch_metrics(rewards, flat, selection)

    # 4) GRPO + NTP loss, one backward, one optimizer step (per mini-batch in the official schedule)
    if cfg.schedule == "single":
        loss, stats = refine_loss(model, docs, selection, rollouts, advantages, cfg, "fast", doc_forward=fwd)
        grad_norm = _update(model, optimizer, loss, grad_clip)
        elapsed = clock(device) - start_time
        return {**stats, **batch_metrics, "grad_norm": grad_norm, "step_s": elapsed,
                "tokens_per_s": float(lengths.sum()) / elapsed}

    metrics = []
    for doc_ids in torch.arange(len(docs)).tensor_split(min(cfg.minibatches, len(docs))):
        mb_start = clock(device)
        lo, hi = int(doc_ids[0]), int(doc_ids[-1]) + 1
        mb_rollouts = rollouts.docs_slice(lo, hi)
        rows = (rollouts.doc >= lo) & (rollouts.doc < hi)  # (N,) rows of this mini-batch
        mb_selection = Selection(selection.positions[lo:hi], selection.entropy[lo:hi])
        loss, stats = refine_loss(model, docs[lo:hi], mb_selection, mb_rollouts, advantages[rows], cfg, "fast")
        grad_norm = _update(model, optimizer, loss, grad_clip)
        elapsed = clock(device) - mb_start + rollout_time / len(docs) * (hi - lo)
        metrics.append({**stats, **batch_metrics, "grad_norm": grad_norm, "step_s": elapsed,
                        "tokens_per_s": float(lengths[lo:hi].sum()) / elapsed})
    return metrics
