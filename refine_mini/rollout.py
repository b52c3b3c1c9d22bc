"""REFINE steps 3-4: sample k-token rollouts after each selected prefix (method.md §1.4, §1.5, §4, §9).

From the recurrent state after the prefix x_0..x_t the current policy samples EXACTLY k tokens at temperature 1
(top-p 1, no top-k, no early stop), recording per token
  old_logp_j = log π_old(x̂_j | x_<=t, x̂_<j)        and
  h_pred_j   = post-norm hidden after reading x̂_j  (so the k-th token needs one more single-token forward).

Fast path ("fast weight transfer", the paper's future work, §4 / §9): the K prefix states of every document come
from ONE batched pass over the documents (`document_forward`): the pass records what each layer needs to rebuild
its state after any position (`model.snapshots`: DeltaNet's chunk-entry states advanced over the partial chunk,
LaCT's chunk history, partial chunk and window), all attached to the pass's graph. `segmented_forward` (one
document split at the positions, segment calls carrying the state) is the plain version they are tested against,
and the fallback for mixers that cannot record. Each snapshot is forked n times (`fork` = ModelState.repeat_interleave,
new memory per row). The K·n forks of the whole batch decode as ONE batch: DeltaNet states stack as they are; LaCT
states at different positions (int `pos`, variable-length chunk buffers) are first converted to the fixed-shape
layout of lact_ragged.py (`stack_states`).
`rollout_logp` recomputes the same log-probs WITH grad from the attached snapshots (for the PPO loss).

Reference path (`rollouts_reference`), as the official code does it: every prefix is encoded from scratch, the k
tokens are sampled by `generate`, then a second full forward over [prefix ; rollout] gives old_logp and h_pred.
Deviation: the official LaCT generation re-encodes the whole prefix at EVERY decode step and left-pads prefixes
into the fast weights (§4, §8.8); our reference prefills once, carries the state and never pads.

Row order everywhere: document-major, then position, then sample: row = (b·K + j)·n + s, N = B·K·n.
"""
import dataclasses
from dataclasses import dataclass

import torch

from refine_mini.model import sample_token
from refine_mini.state import ModelState, stack_problem
from refine_mini.selection import eval_mode, pad_documents


@dataclass
class Rollouts:
    tokens: torch.Tensor  # (N, L) long: sampled x̂_1..x̂_L after each prefix
    old_logp: torch.Tensor  # (N, L) log π_old(x̂_j | prefix, x̂_<j) at temperature 1, no grad
    h_pred: torch.Tensor  # (N, L, D) post-norm hidden after reading x̂_j, no grad
    doc: torch.Tensor  # (N,) long: document index b
    pos: torch.Tensor  # (N,) long: prefix end t (inclusive); the ground truth is x_{t+1..t+L}
    n: int  # samples per prefix (consecutive rows)

    def docs_slice(self, start: int, stop: int) -> "Rollouts":
        """Rows of documents start..stop-1 (contiguous, since rows are document-major), re-indexed from 0."""
        rows = (self.doc >= start) & (self.doc < stop)  # (N,) bool
        fields = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self) if f.name != "n"}
        fields["doc"] = fields["doc"] - start
        return Rollouts(n=self.n, **fields)


@dataclass
class DocumentForward:
    hidden: list  # per document (T_b, D): post-norm hidden states of the whole document (the NTP logits' input)
    first_logits: torch.Tensor  # (B·K, V) logits at each prefix end t: they give p(x̂_1)
    snapshots: list  # B·K ModelStates (batch 1): state after reading x_0..x_t (attached when built with grad)
    ntp_sum: torch.Tensor | None = None  # summed NTP cross-entropy of the documents (with grad), if the caller has it


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary in at least fp32 (bf16 logits are upcast; fp64 logits stay fp64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def segmented_forward(model, doc: torch.Tensor, positions: torch.Tensor):
    """One streaming pass over doc (T,) split after each position t_1 <= ... <= t_K (segment calls carry the state).

    Returns the hidden states (T, D) of the whole document and K snapshots (state after reading x_0..x_{t_j}).
    Equal positions give an empty segment: the snapshot is then the previous one. No LM head here: the caller
    applies model.head where it needs logits (all positions for NTP, the K prefix ends for x̂_1).
    """
    T = doc.shape[0]
    state, start, hidden, snapshots = None, 0, [], []
    for t in positions.tolist() + [T - 1]:  # segment j covers [start, t]; the last one runs to the document end
        if t + 1 > start:
            seg_hidden, state = model.encode(doc[None, start:t + 1], state)  # (1, S, D)
            hidden.append(seg_hidden[0])
            start = t + 1
        snapshots.append(state)
    return torch.cat(hidden), snapshots[:-1]  # (T, D), K states


def document_forward(model, docs: list, positions: torch.Tensor) -> DocumentForward:
    """The document hidden states and the B·K prefix snapshots; grad flows through them unless under no_grad.

    Both models read all documents as ONE right-padded batch (causal, so padding changes nothing before it) and
    rebuild the snapshots from that pass's records, each layer's as soon as its pass ends (model.encode_recorded
    with ends). A model whose mixers cannot record falls back to segmented_forward per document, which is also the
    reference the recorded snapshots are tested against."""
    if model.can_snapshot():
        padded, lengths = pad_documents(docs)  # (B, T_max), (B,)
        full, snapshots = model.encode_recorded(padded, [p.tolist() for p in positions])  # (B, T_max, D), B·K
        return _assemble(model, [full[b, :n] for b, n in enumerate(lengths.tolist())], positions, snapshots)
    hidden, snapshots = [], []
    for b, doc in enumerate(docs):
        doc_hidden, doc_snaps = segmented_forward(model, doc, positions[b])
        hidden.append(doc_hidden)
        snapshots += doc_snaps
    return _assemble(model, hidden, positions, snapshots)


def recorded_forward(model, full: torch.Tensor, records: list, lengths: list, positions: torch.Tensor,
                     ntp_sum: torch.Tensor | None = None):
    """DocumentForward from a recorded padded pass (model.encode_recorded): hidden (B, T_max, D) cut to lengths;
    `ntp_sum` if the caller already computed the documents' NTP loss from `full` (refine_step: entropy + NTP)."""
    snapshots = model.snapshots(records, [p.tolist() for p in positions])
    return _assemble(model, [full[b, :n] for b, n in enumerate(lengths)], positions, snapshots, ntp_sum)


def _assemble(model, hidden: list, positions: torch.Tensor, snapshots: list, ntp_sum=None) -> DocumentForward:
    ends = torch.cat([h[p] for h, p in zip(hidden, positions)])  # (T_b, D) index (K,) -> (B·K, D)
    return DocumentForward(hidden=hidden, first_logits=model.head(ends), snapshots=snapshots,  # (B·K, V)
                           ntp_sum=ntp_sum)


def can_stack(states: list) -> bool:
    """True when ModelState.cat may join these states (state.stack_problem finds nothing)."""
    return stack_problem(states) is None


def stack_states(model, states: list) -> ModelState:
    """One batch of the S single-row snapshots. Snapshots at different positions of a LaCT model differ in layout
    (int position, partial-chunk lengths); they are first converted to the stackable lact_ragged layout."""
    if not can_stack(states):
        states = [ModelState([block.mixer.ragged_state(layer) if hasattr(block.mixer, "ragged_state") else layer
                              for block, layer in zip(model.blocks, s.layers)]) for s in states]
    return ModelState.cat(states)


def fork(state: ModelState, n: int) -> ModelState:
    """n independent copies of every row (rows a, b -> a, a, b, b): new memory, still differentiable."""
    return state.repeat_interleave(n)


def _decode(model, state: ModelState, first_logits: torch.Tensor, k: int, n: int, generator):
    """Sample k tokens from each of the S states, n times each: tokens (S·n, k), old_logp (S·n, k), h (S·n, k, D)."""
    state = fork(state, n)  # S rows -> S·n rows
    logits = first_logits.repeat_interleave(n, dim=0)  # (S, V) -> (S·n, V)
    tokens, logps, hiddens = [], [], []
    for _ in range(k):
        token = sample_token(logits, 1.0, generator)  # (S·n,): every row draws its own token
        logp = log_probs(logits)  # (S·n, V)
        logps.append(logp.gather(1, token[:, None])[:, 0])  # (S·n, V) gather (S·n, 1) -> (S·n,)
        step_logits, step_hidden, state = model(token[:, None], state)  # (S·n, 1, V), (S·n, 1, D)
        logits = step_logits[:, 0]  # (S·n, V)
        tokens.append(token)
        hiddens.append(step_hidden[:, 0])  # hidden after reading x̂_j; the k-th forward exists only for this
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(hiddens, 1)  # (N, k), (N, k), (N, k, D)


@torch.no_grad()
def sample_from_states(model, states: list, first_logits: torch.Tensor, k: int, n: int,
                       generator: torch.Generator):
    """States (S of batch 1) + logits at each prefix end (S, V) -> tokens (S·n, k), old_logp (S·n, k), h_pred."""
    with eval_mode(model):
        return _decode(model, stack_states(model, states), first_logits, k, n, generator)  # one batch of S·n forks


def sample_rollouts(model, fwd: DocumentForward, positions: torch.Tensor, k: int, n: int,
                    generator: torch.Generator) -> Rollouts:
    """Rollouts from DETACHED copies of a document_forward's snapshots (the forward itself is not re-run)."""
    B, K = positions.shape
    tokens, old_logp, h_pred = sample_from_states(model, [s.detach() for s in fwd.snapshots],
                                                  fwd.first_logits.detach(), k, n, generator)
    doc = torch.arange(B, device=positions.device).repeat_interleave(K * n)  # (N,)
    return Rollouts(tokens=tokens, old_logp=old_logp, h_pred=h_pred, doc=doc,
                    pos=positions.reshape(-1).repeat_interleave(n), n=n)  # (B, K) -> (B·K,) -> (N,)


@torch.no_grad()
def rollouts_forked(model, docs: list, positions: torch.Tensor, k: int, n: int,
                    generator: torch.Generator) -> Rollouts:
    """The fast rollout phase on its own: one no-grad batched pass (snapshots rebuilt from it), then forked decoding."""
    with eval_mode(model):
        fwd = document_forward(model, docs, positions)
    return sample_rollouts(model, fwd, positions, k, n, generator)


@torch.no_grad()
def rollouts_reference(model, docs: list, positions: torch.Tensor, k: int, n: int,
                       generator: torch.Generator) -> Rollouts:
    """The official rollout phase: every prefix re-encoded from scratch, twice (generate, then old-logp pass)."""
    tokens, old_logp, h_pred = [], [], []
    with eval_mode(model):
        for b, doc in enumerate(docs):
            for t in positions[b].tolist():
                prefix = doc[None, :t + 1].expand(n, -1)  # (n, t+1)
                sampled, _ = model.generate(prefix, k, temperature=1.0, generator=generator)  # (n, k)
                logits, hidden, _ = model(torch.cat([prefix, sampled], 1))  # (n, t+1+k, V), (n, t+1+k, D)
                logp = log_probs(logits[:, t:t + k])  # logits at t..t+k-1: (n, k, V)
                old_logp.append(logp.gather(2, sampled[..., None])[..., 0])  # (n, k, V) gather (n, k, 1) -> (n, k)
                h_pred.append(hidden[:, t + 1:])  # hidden after reading x̂_1..x̂_k: (n, k, D)
                tokens.append(sampled)
    B, K = positions.shape
    doc = torch.arange(B, device=positions.device).repeat_interleave(K * n)  # (N,)
    return Rollouts(tokens=torch.cat(tokens), old_logp=torch.cat(old_logp), h_pred=torch.cat(h_pred), doc=doc,
                    pos=positions.reshape(-1).repeat_interleave(n), n=n)  # (B, K) -> (B·K,) -> (N,)


def rollout_logp(model, first_logits: torch.Tensor, snapshots: list, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """log π_θ(x̂_j | prefix, x̂_<j) WITH grad, (N, k), from the (attached) prefix snapshots.

    x̂_1 is scored by the document logits at the prefix end; x̂_2..x̂_k by ONE multi-token call that feeds
    x̂_1..x̂_{k-1} from the forked prefix state, so the gradient reaches every token of the prefix through the state.
    """
    N, k = tokens.shape
    first = log_probs(first_logits).repeat_interleave(n, dim=0)  # (S, V) -> (N, V)
    logp_first = first.gather(1, tokens[:, :1])  # (N, V) gather (N, 1) -> (N, 1)
    if k == 1:
        return logp_first
    logits, _, _ = model(tokens[:, :-1], fork(stack_states(model, snapshots), n))  # (N, k-1, V)
    logp_rest = log_probs(logits).gather(2, tokens[:, 1:, None])[..., 0]  # (N, k-1, 1) -> (N, k-1)
    return torch.cat([logp_first, logp_rest], dim=1)  # (N, k)
