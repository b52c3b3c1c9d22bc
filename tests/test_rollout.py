"""Rollouts from forked prefix states (method.md §1.4-1.5, §9; house style rule 6)."""
import math

import pytest
import torch

from refine_mini.deltanet import DeltaNet
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.rollout import (can_stack, document_forward, fork, rollout_logp, rollouts_forked,
                                 rollouts_reference, segmented_forward)
from tests.test_deltanet import rel

TINY = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=64, chunk_size=8, lact_chunk=8, window=8, n_heads_fast=2)
MIXERS = ["deltanet", "lact"]


def make(mixer, seed=0):
    torch.manual_seed(seed)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY))
    docs = [torch.randint(0, 64, (40,)), torch.randint(0, 64, (33,))]
    positions = torch.tensor([[5, 17, 17, 30], [3, 9, 20, 27]])  # includes a repeated position
    return model, docs, positions


@pytest.mark.parametrize("mixer", MIXERS)
def test_segmented_pass_equals_full_pass_and_prefix_encoding(mixer):
    """One streaming pass split at the positions gives the full-document logits, and each snapshot continues exactly
    like the prefix encoded from scratch (the state after x_0..x_t)."""
    model, docs, positions = make(mixer)
    with torch.no_grad():
        hidden, snaps = segmented_forward(model, docs[0], positions[0])
        logits = model.head(hidden)
        full_logits, full_hidden, _ = model(docs[0][None])
        torch.testing.assert_close(logits, full_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, full_hidden[0], atol=1e-5, rtol=1e-5)
        probe = torch.tensor([[7, 11]])
        for t, snap in zip(positions[0].tolist(), snaps):
            from_snapshot = model(probe, snap)[0]
            from_scratch = model(torch.cat([docs[0][None, :t + 1], probe], 1))[0][:, -2:]
            torch.testing.assert_close(from_snapshot, from_scratch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv_size", [1, 2, 4])
def test_deltanet_snapshots_of_a_segment_recorded_after_a_carried_state(conv_size):
    """A DeltaNet record of a later segment (forward_recorded(x2, state after x1)) rebuilds the states after its
    first tokens too, whose conv windows still reach into x1 (its record keeps the incoming window): equal, in
    fp64, to one pass over x1 and x2 up to that token. Conv size 1 has no window at all."""
    torch.manual_seed(0)
    layer = DeltaNet(32, 2, conv_size=conv_size, chunk_size=8).double()
    x = torch.randn(2, 30, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ends = [[0, 1, 9], [2, 8, 18]]  # positions in the segment: 0 and 1 take conv inputs from before it
    with torch.no_grad():
        _, carried = layer(x[:, :11])
        snapshots = layer.snapshots(layer.forward_recorded(x[:, 11:], carried)[2], ends)
        for (b, t), got in zip([(b, t) for b, row in enumerate(ends) for t in row], snapshots, strict=True):
            want = layer(x[b:b + 1, :11 + t + 1])[1]
            assert rel(got.S, want.S) < 1e-10, (b, t)
            torch.testing.assert_close(got.conv, want.conv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer", MIXERS)
def test_snapshots_from_one_recorded_pass_equal_segmented_snapshots(mixer):
    """The recorded pass (one right-padded batch; DeltaNet: chunk-entry states + the partial chunk replayed, conv
    window; LaCT: chunk history, partial chunk, attention window) == segmenting each document's pass, in fp64: every
    field of every snapshot, the hidden states, and the gradient of a loss that reads the snapshots."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY)).double()
    docs = [torch.randint(0, 64, (40,)), torch.randint(0, 64, (33,))]
    positions = torch.tensor([[0, 7, 15, 39], [3, 8, 20, 27]])  # chunk-aligned, partial, window partly filled, last

    def run(batched):
        model.zero_grad(set_to_none=True)
        if batched:
            fwd = document_forward(model, docs, positions)
        else:
            hidden, snaps = zip(*(segmented_forward(model, d, p) for d, p in zip(docs, positions)))
            fwd = (list(hidden), [s for doc_snaps in snaps for s in doc_snaps])
        hidden, snaps = (fwd.hidden, fwd.snapshots) if batched else fwd
        loss = sum(h.square().sum() for h in hidden)
        for s in snaps:
            loss = loss + sum(t.square().sum() for layer in s.layers for t in vars(layer).values()
                              if isinstance(t, torch.Tensor))
        loss.backward()
        return hidden, snaps, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (h_a, s_a, g_a), (h_b, s_b, g_b) = run(True), run(False)
    assert model.can_snapshot() and len(s_a) == len(s_b) == 8  # document_forward takes the recorded path
    for a, b in zip(h_a, h_b):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for sa, sb in zip(s_a, s_b):
        for la, lb in zip(sa.layers, sb.layers):
            for name, value in vars(lb).items():
                other = getattr(la, name)
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(other, value, atol=1e-10, rtol=1e-10)
                else:
                    assert other == value, name
    assert g_a.keys() == g_b.keys()
    for name in g_b:
        torch.testing.assert_close(g_a[name], g_b[name], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mixer", MIXERS)
def test_forked_rollouts_have_exactly_k_tokens_and_correct_logp_and_hidden(mixer):
    """Shapes (B·K·n, k); row order doc-major; old_logp and h_pred equal a from-scratch forward over [prefix; rollout]."""
    model, docs, positions = make(mixer)
    k, n = 3, 2
    ro = rollouts_forked(model, docs, positions, k, n, torch.Generator().manual_seed(0))
    N = 2 * 4 * n
    assert ro.tokens.shape == (N, k) and ro.old_logp.shape == (N, k) and ro.h_pred.shape == (N, k, 32)
    assert ro.doc.tolist() == [0] * 8 + [1] * 8
    assert ro.pos.tolist() == positions.reshape(-1).repeat_interleave(n).tolist()
    assert not ro.old_logp.requires_grad and not ro.h_pred.requires_grad
    with torch.no_grad():
        for row in range(N):
            t, doc = int(ro.pos[row]), docs[int(ro.doc[row])]
            logits, hidden, _ = model(torch.cat([doc[:t + 1], ro.tokens[row]])[None])
            logp = torch.log_softmax(logits[0, t:t + k], -1).gather(1, ro.tokens[row, :, None])[:, 0]
            torch.testing.assert_close(ro.old_logp[row], logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ro.h_pred[row], hidden[0, t + 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_reference_rollouts_match_their_own_recomputation_and_shapes(mixer):
    """The re-encoding path returns the same structure; its old_logp equals the attached-snapshot log-probs."""
    model, docs, positions = make(mixer)
    ro = rollouts_reference(model, docs, positions, 3, 1, torch.Generator().manual_seed(0))
    assert ro.tokens.shape == (8, 3) and ro.h_pred.shape == (8, 3, 32)
    with torch.no_grad():
        fwd = document_forward(model, docs, positions)
        logp = rollout_logp(model, fwd.first_logits, fwd.snapshots, ro.tokens, ro.n)
    torch.testing.assert_close(logp, ro.old_logp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_same_seed_gives_same_rollouts(mixer):
    model, docs, positions = make(mixer)
    a = rollouts_forked(model, docs, positions, 3, 2, torch.Generator().manual_seed(3))
    b = rollouts_forked(model, docs, positions, 3, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.old_logp, b.old_logp)


@pytest.mark.parametrize("mixer", MIXERS)
def test_forked_states_are_independent(mixer):
    """Forks of one prefix state share no memory: writing into fork 0 changes neither fork 1 nor the original,
    and fork 1 still decodes exactly as the original state does."""
    model, docs, positions = make(mixer)
    with torch.no_grad():
        _, snaps = segmented_forward(model, docs[0], positions[0])
        original = snaps[1]
        before = original.clone()
        forks = fork(original, 2)
        for layer in forks.layers:
            for value in vars(layer).values():
                if isinstance(value, torch.Tensor) and value.numel():
                    value[0].add_(1.0)  # corrupt fork 0 only
        for layer, layer_before, layer_fork in zip(original.layers, before.layers, forks.layers):
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, getattr(layer_before, name))
                    assert torch.equal(getattr(layer_fork, name)[1:], value)
        token = torch.tensor([[5], [5]])
        out_fork = model(token, forks)[0]
        out_orig = model(token[:1], original)[0]
        torch.testing.assert_close(out_fork[1], out_orig[0])
        assert not torch.allclose(out_fork[0], out_orig[0])


@pytest.mark.parametrize("mixer", MIXERS)
def test_rows_of_a_group_draw_different_first_tokens(mixer):
    """n samples of one prefix must each draw their own x̂_1. Regression guard for the classic bug of sampling the
    first token once from the prefix logits and broadcasting it to every fork (nanochat test_engine.py 158-198):
    the GRPO group would then share its first token and the advantage would see no variety there."""
    model, docs, positions = make(mixer)
    ro = rollouts_forked(model, docs[:1], positions[:1, :1], 2, 16, torch.Generator().manual_seed(0))
    assert ro.tokens.shape == (16, 2)
    assert len(set(ro.tokens[:, 0].tolist())) > 1


def test_deltanet_states_stack_and_lact_states_at_different_positions_do_not():
    """DeltaNet forks of the whole batch decode as one batch; LaCT (int pos, ragged buffers) decodes per prefix."""
    for mixer, expected in (("deltanet", True), ("lact", False)):
        model, docs, positions = make(mixer)
        with torch.no_grad():
            fwd = document_forward(model, docs, positions)
        assert can_stack(fwd.snapshots) is expected


@pytest.mark.parametrize("mixer", MIXERS)
def test_reference_rollout_hidden_is_taken_at_the_rollout_tokens(mixer):
    """method.md §1.5: h_pred(r+j) is the final hidden state AT rollout token x̂_{r+j} (after reading it), as in a
    forward over [prefix ; rollout]."""
    model, docs, _ = make(mixer)
    positions = torch.tensor([[6, 15, 22]])
    ro = rollouts_reference(model, docs[:1], positions, 3, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for row, t in enumerate(positions[0].tolist()):
            _, hidden, _ = model(torch.cat([docs[0][:t + 1], ro.tokens[row]])[None])
            torch.testing.assert_close(ro.h_pred[row], hidden[0, t + 1:t + 4], atol=1e-5, rtol=1e-5)


def test_rollouts_are_sampled_at_temperature_one_from_the_policy():
    """method.md §1.4: temperature 1, no top-k/top-p: x̂ ~ π_θ itself, the distribution old_logp describes. With
    every position's head fixed to p(1) = 3/4, p(0) = 1/4, token 1 makes up 3/4 of 4000 draws."""
    model, docs, _ = make("deltanet")

    def fixed_head(hidden):  # (..., D) -> (..., V): log-odds log 3 between tokens 1 and 0, ~0 mass elsewhere
        logits = torch.full((*hidden.shape[:-1], model.cfg.vocab_size), -40.0)
        logits[..., 1] = math.log(3.0)
        logits[..., 0] = 0.0
        return logits

    model.head = fixed_head
    ro = rollouts_forked(model, docs[:1], torch.tensor([[10]]), 2, 2000, torch.Generator().manual_seed(0))
    assert set(ro.tokens.unique().tolist()) <= {0, 1}
    assert abs(float((ro.tokens == 1).double().mean()) - 0.75) < 0.03  # 4000 draws: 4.4 standard deviations
    expected = torch.where(ro.tokens == 1, math.log(0.75), math.log(0.25)).double()
    torch.testing.assert_close(ro.old_logp.double(), expected, atol=1e-5, rtol=0)
