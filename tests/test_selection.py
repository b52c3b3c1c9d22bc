"""Position selection (method.md §1.2-1.3): entropy, smoothing, per-chunk sampling, edge clamp."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.selection import (edge_clamp, entropy_from_hidden, pad_documents, select_positions, smooth_entropy,
                                   smoothing_kernel, teacher_forced_pass)

TINY = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=64, chunk_size=8, lact_chunk=8, window=8, n_heads_fast=2)


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_teacher_pass_entropy_is_next_token_entropy(mixer):
    """e_t = -sum_v p(v|x_<=t) log p(v|x_<=t) from the logits at t; hidden is the model's post-norm hidden;
    the pass runs in eval mode and restores train mode."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY))
    tokens = torch.randint(0, 64, (2, 24))
    entropy, hidden = teacher_forced_pass(model, tokens)
    assert model.training
    with torch.no_grad():
        logits, ref_hidden, _ = model(tokens)
    p = torch.softmax(logits.double(), -1)
    expected = -(p * p.log()).sum(-1)
    assert entropy.shape == (2, 24) and hidden.shape == (2, 24, 32)
    torch.testing.assert_close(entropy.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref_hidden)


def test_smoothing_is_centred_mean_with_zero_padding():
    """ẽ_t = (e_{t-2} + ... + e_{t+2}) / 5 with out-of-range terms counted as 0 (count_include_pad), kernel 5 for k=5."""
    assert smoothing_kernel(5) == 5 and smoothing_kernel(4) == 5
    e = torch.rand(1, 11, dtype=torch.float64)
    smoothed = smooth_entropy(e, torch.tensor([11]), 5)
    for t in range(11):
        window = [e[0, i] for i in range(t - 2, t + 3) if 0 <= i < 11]
        assert abs(float(smoothed[0, t]) - float(sum(window)) / 5) < 1e-12


def test_smoothing_ignores_right_padding():
    """A document smoothed inside a right-padded batch equals the same document smoothed alone."""
    e = torch.rand(2, 12)
    e[1, 7:] = 100.0  # garbage at pad positions of a 7-token document
    alone = smooth_entropy(e[1:, :7], torch.tensor([7]), 5)
    batched = smooth_entropy(e, torch.tensor([12, 7]), 5)
    torch.testing.assert_close(batched[1, :7], alone[0])


def test_edge_clamp_scales_with_length():
    """20 tokens at 16K on both sides; at least 1 token of prefix and k ground-truth tokens at small lengths."""
    assert edge_clamp(16384, 5) == (19, 16384 - 20 - 1)
    assert edge_clamp(64, 5) == (0, 64 - 5 - 1)
    assert edge_clamp(2048, 5) == (1, 2048 - 5 - 1)
    with pytest.raises(ValueError):
        edge_clamp(5, 5)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(16, 90), c=st.integers(1, 8), k=st.integers(1, 6),
       mode=st.sampled_from(["entropy", "uniform", "argmax", "argmin"]), seed=st.integers(0, 1000))
def test_positions_lie_in_their_chunk_or_on_the_clamp(length, c, k, mode, seed):
    """Position j is in chunk [jC, (j+1)C) (C = floor(L/c)) or on the clamp edge; the last L mod c tokens are never
    chosen unless clamped there; all positions leave k ground-truth tokens; the output is sorted."""
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(1, length, generator=g) * 5
    sel = select_positions(entropy, torch.tensor([length]), c, k, mode, generator=g)
    C = length // c
    lo, hi = edge_clamp(length, k)
    pos = sel.positions[0].tolist()
    assert sel.positions.shape == (1, c) and pos == sorted(pos)
    for j, t in enumerate(pos):
        assert lo <= t <= hi and t + k < length
        assert j * C <= t < (j + 1) * C or t in (lo, hi)
    torch.testing.assert_close(sel.entropy[0], entropy[0, pos])


def test_argmax_and_argmin_use_unsmoothed_entropy():
    """A one-token spike (which smoothing would spread) is exactly what argmax picks; argmin picks the dip."""
    e = torch.ones(1, 40)
    e[0, 13] = 9.0  # chunk 1 of 4 (C = 10)
    e[0, 25:30] = 5.0  # chunk 2: the smoothed maximum is at 27, the raw (first) maximum at 25
    e[0, 36] = 0.0
    sel_max = select_positions(e, torch.tensor([40]), 4, 3, "argmax")
    sel_min = select_positions(e, torch.tensor([40]), 4, 3, "argmin")
    assert sel_max.positions[0, 1] == 13 and sel_max.positions[0, 2] == 25
    assert sel_min.positions[0, 3] == 36


def test_entropy_sampling_follows_softmax_over_the_chunk():
    """With kernel 1 (no smoothing) a chunk with entropies (0, 0, ln 2, ln 4) is drawn with probs (1, 1, 2, 4)/8."""
    rows = 2000
    e = torch.tensor([[0.0, 0.0, math.log(2), math.log(4)] * 2]).expand(rows, 8).contiguous()
    lengths = torch.full((rows,), 8)
    sel = select_positions(e, lengths, 2, 1, "entropy", kernel=1, generator=torch.Generator().manual_seed(0),
                           min_prefix=1, end_margin=1)
    freq = torch.bincount(sel.positions[:, 0], minlength=4).double() / rows
    torch.testing.assert_close(freq, torch.tensor([1, 1, 2, 4], dtype=torch.float64) / 8, atol=0.03, rtol=0)
    uni = select_positions(e, lengths, 2, 1, "uniform", kernel=1, generator=torch.Generator().manual_seed(0),
                           min_prefix=1, end_margin=1)
    freq = torch.bincount(uni.positions[:, 0], minlength=4).double() / rows
    torch.testing.assert_close(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0)


def test_same_generator_seed_gives_same_positions():
    e = torch.rand(3, 50)
    lengths = torch.tensor([50, 44, 37])
    a = select_positions(e, lengths, 4, 5, generator=torch.Generator().manual_seed(7))
    b = select_positions(e, lengths, 4, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.positions, b.positions)


def test_bad_inputs_raise_value_error():
    e = torch.rand(1, 6)
    with pytest.raises(ValueError):
        select_positions(e, torch.tensor([6]), 8, 1)  # fewer tokens than chunks
    with pytest.raises(ValueError):
        select_positions(e, torch.tensor([6]), 2, 1, mode="topk")
    with pytest.raises(ValueError):
        smooth_entropy(e, torch.tensor([6]), 4)


def test_pad_documents_right_pads():
    tokens, lengths = pad_documents([torch.tensor([1, 2, 3]), torch.tensor([4])])
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]


def test_blocked_entropy_equals_the_full_logits_formula():
    """entropy_from_hidden (the head loss's row blocks, a ragged last one: 3·97 rows in blocks of 256) equals
    -Σ p log p of the full logits, with the fused and with the plain head."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer="deltanet", **TINY))
    hidden = torch.randn(3, 97, 32)
    p = torch.softmax(model.head(hidden).double(), -1)
    for fused in (True, False):
        model.fused_head = fused
        torch.testing.assert_close(entropy_from_hidden(model, hidden).double(), -(p * p.log()).sum(-1),
                                   atol=1e-5, rtol=1e-5)


def test_entropy_sampling_uses_the_smoothed_entropy():
    """method.md §1.3: positions are drawn from the softmax over the chunk of the SMOOTHED entropy (kernel 5 for
    k = 5). A one-token spike e_5 = 10 smooths to 2 on positions 3..7, so each of those five is drawn with
    e²/(5e² + 5) ≈ 0.18, not the ≈1 that a softmax over the raw spike would give."""
    rows = 1000
    e = torch.zeros(rows, 20)
    e[:, 5] = 10.0
    sel = select_positions(e, torch.full((rows,), 20), 2, 5, "entropy", generator=torch.Generator().manual_seed(0),
                           min_prefix=1, end_margin=5)
    freq = torch.bincount(sel.positions[:, 0], minlength=10).double() / rows
    smoothed = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(freq, torch.softmax(smoothed, 0), atol=0.05, rtol=0)


def test_selection_temperature_divides_the_entropy():
    """p_j(t) ∝ exp(ẽ_t / τ) (paper Eq. 6): at τ = 2, entropies (0, 0, 2 ln 2, 2 ln 4) are drawn with
    probabilities (1, 1, 2, 4) / 8."""
    rows = 2000
    e = torch.tensor([[0.0, 0.0, 2 * math.log(2), 2 * math.log(4)] * 2]).expand(rows, 8).contiguous()
    sel = select_positions(e, torch.full((rows,), 8), 2, 1, "entropy", tau=2.0, kernel=1,
                           generator=torch.Generator().manual_seed(0), min_prefix=1, end_margin=1)
    freq = torch.bincount(sel.positions[:, 0], minlength=4).double() / rows
    torch.testing.assert_close(freq, torch.tensor([1, 1, 2, 4], dtype=torch.float64) / 8, atol=0.03, rtol=0)


def test_sampling_without_an_explicit_generator_is_refused():
    """One seed drives everything: a sampler handed no generator would draw from torch's global RNG instead."""
    from refine_mini.model import sample_token
    entropy, lengths = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([64, 64])
    for mode in ("entropy", "uniform"):
        with pytest.raises(ValueError, match="(?i)generator"):  # the word select_positions' docstring promises
            select_positions(entropy, lengths, 4, 3, mode)
    for mode in ("argmax", "argmin"):  # deterministic modes need none
        assert select_positions(entropy, lengths, 4, 3, mode).positions.shape == (2, 4)
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        sample_token(logits, 1.0, None)
    assert torch.equal(sample_token(logits, 0.0, None), logits.argmax(-1))  # greedy needs none
    draws = [sample_token(logits, 1.0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*draws)  # the generator alone decides the draw


@pytest.mark.parametrize("bad, message", [
    (dict(c=0), None), (dict(c=-1), None), (dict(c=2.0), None), (dict(k=0), None), (dict(tau=float("nan")), "tau"),
    (dict(tau=float("inf")), "tau"), (dict(lengths=[40, 41]), "lengths"), (dict(lengths=[40]), "lengths"),
    (dict(entropy=torch.rand(0, 40)), "lengths"), (dict(entropy=torch.rand(0, 40), lengths=[]), "lengths")])
def test_select_positions_refuses_bad_arguments(bad, message):
    """Counts, tau, lengths past T and an empty batch are one-line ValueErrors (before: ZeroDivisionError, a
    multinomial error for tau = NaN, shape RuntimeErrors); lengths given as a list of ints are accepted. The messages
    are matched only on the words the docstring promises (a student's version words them its own way)."""
    args = dict(entropy=torch.rand(2, 40, generator=torch.Generator().manual_seed(0)), lengths=[40, 30], c=4, k=3,
                tau=1.0)
    good = select_positions(**args, generator=torch.Generator().manual_seed(1))
    assert torch.equal(good.positions, select_positions(**{**args, "lengths": torch.tensor([40, 30])},
                                                        generator=torch.Generator().manual_seed(1)).positions)
    with pytest.raises(ValueError, match=message):
        select_positions(**{**args, **bad}, generator=torch.Generator().manual_seed(1))
