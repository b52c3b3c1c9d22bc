"""Model-level invariants: carried state == one pass, independent clones, cached generation == naive generation."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.state import ModelState

MIXERS = ["deltanet", "lact"]


def tiny(mixer: str, **kw) -> FastWeightLM:
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=mixer, vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_heads_fast=2,
                      chunk_size=8, lact_chunk=8, window=8, **kw)
    return FastWeightLM(cfg).double().eval()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_returns_per_token_logits_hidden_and_state(mixer):
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (3, 21))
    logits, hidden, state = model(tokens)
    assert logits.shape == (3, 21, 64) and logits.dtype == torch.float64  # an fp64 model keeps fp64 logits
    assert hidden.shape == (3, 21, 32)
    assert isinstance(state, ModelState) and len(state.layers) == 2
    # hidden is post-final-norm: the LM head applied to it gives the logits
    assert torch.allclose(model.lm_head(hidden), logits)


@pytest.mark.parametrize("mixer", MIXERS)
@settings(max_examples=6, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), min_size=1, max_size=4, unique=True))
def test_processing_a_then_b_with_carried_state_equals_processing_ab(mixer, cuts):
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(1))
    full_logits, full_hidden, full_state = model(tokens)
    bounds = [0, *sorted(cuts), 41]
    state, pieces = None, []
    for a, b in zip(bounds, bounds[1:]):
        logits, _, state = model(tokens[:, a:b], state)
        pieces.append(logits)
    assert rel(torch.cat(pieces, 1), full_logits) < 1e-9
    for s_full, s_seg in zip(full_state.layers, state.layers):
        for name, value in vars(s_full).items():
            if isinstance(value, torch.Tensor) and value.numel():
                assert rel(getattr(s_seg, name), value) < 1e-9, name


@pytest.mark.parametrize("mixer", MIXERS)
def test_token_by_token_equals_one_pass(mixer):
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 19))
    full_logits, _, _ = model(tokens)
    state, pieces = None, []
    for t in range(19):
        logits, _, state = model(tokens[:, t:t + 1], state)
        pieces.append(logits)
    assert rel(torch.cat(pieces, 1), full_logits) < 1e-9


@pytest.mark.parametrize("mixer", MIXERS)
def test_clones_are_independent_and_select_repeat_pick_rows(mixer):
    model = tiny(mixer)
    prefix = torch.randint(0, 64, (2, 13))
    _, _, state = model(prefix)
    fork_a, fork_b = state.clone(), state.clone()
    next_a, next_b = torch.tensor([[5], [6]]), torch.tensor([[7], [8]])
    _, _, fork_a = model(next_a, fork_a)  # advancing one fork ...
    logits_b, _, _ = model(next_b, fork_b)  # ... leaves the other exactly where it was
    expected_b, _, _ = model(torch.cat([prefix, next_b], 1))
    assert rel(logits_b[:, -1], expected_b[:, -1]) < 1e-9
    # a state tensor of one fork is never the same storage as another's
    for la, lb in zip(fork_a.layers, fork_b.layers):
        for name, value in vars(la).items():
            if isinstance(value, torch.Tensor) and value.numel():
                assert value.data_ptr() != getattr(lb, name).data_ptr()
    group = state.repeat_interleave(3)  # rows (0, 0, 0, 1, 1, 1)
    picked = state.select(torch.tensor([1, 0]))
    token = torch.tensor([[9], [9], [9], [9], [9], [9]])
    logits_group, _, _ = model(token, group)
    logits_picked, _, _ = model(token[:2], picked)
    assert torch.allclose(logits_group[3], logits_picked[0]) and torch.allclose(logits_group[0], logits_picked[1])


@pytest.mark.parametrize("mixer", MIXERS)
def test_clone_keeps_the_graph_and_detach_cuts_it(mixer):
    model = tiny(mixer)
    _, _, state = model(torch.randint(0, 64, (1, 11)))
    logits, _, _ = model(torch.tensor([[3]]), state.clone())
    logits.sum().backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    model.zero_grad()
    _, _, state = model(torch.randint(0, 64, (1, 11)))
    detached = state.detach()
    assert all(not v.requires_grad for layer in detached.layers for v in vars(layer).values()
               if isinstance(v, torch.Tensor))


def naive_greedy(model, prompt, n):
    """Re-run the whole prefix for every new token: slow and obviously correct."""
    tokens = prompt
    for _ in range(n):
        logits, _, _ = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens[:, prompt.shape[1]:]


@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_greedy_generation_equals_naive_generation(mixer):
    model = tiny(mixer)
    prompt = torch.randint(0, 64, (3, 10))
    fast, _ = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(fast, naive_greedy(model, prompt, 12))


@pytest.mark.parametrize("mixer", MIXERS)
def test_sampling_is_reproducible_from_the_generator_alone(mixer):
    model = tiny(mixer)
    prompt = torch.randint(0, 64, (4, 9))
    draws = [model.generate(prompt, 8, 1.0, torch.Generator().manual_seed(s))[0] for s in (3, 3, 4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_unknown_mixer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig(mixer="mamba")


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("short, long", [(13, 301), (64, 512)])
def test_the_state_holds_only_its_own_memory(mixer, short, long):
    """Every state tensor owns its storage (a view into the pass's (B, T, .) tensors would keep them alive), so
    evaluate.state_bytes, which counts storages, is the same after `short` and `long` tokens (same length modulo
    LaCT's chunk of 8, whose partial-chunk buffer is part of the state)."""
    from refine_mini.evaluate import state_bytes
    model = tiny(mixer)
    sizes = []
    for length in (short, long):
        with torch.no_grad():
            state = model(torch.randint(0, 64, (2, length)))[2]
        for layer_state in state.layers:
            for name, value in vars(layer_state).items():
                if isinstance(value, torch.Tensor):
                    assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), name
        sizes.append(state_bytes(state))
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "n_heads_fast", "conv_size",
                                   "chunk_size", "lact_chunk", "window"])
def test_model_sizes_below_one_are_refused(field):
    """ModelConfig(n_heads=0) divided by zero, and other zero sizes failed inside a layer: one ValueError now."""
    with pytest.raises(ValueError, match="model sizes must be ints >= 1"):
        ModelConfig(**{field: 0})


def test_sampling_temperature_must_be_finite_and_non_negative():
    """A negative temperature sampled from the inverted distribution and inf uniformly, without complaint: both are
    ValueErrors now, for sample_token and generate. A tiny positive one tends to greedy (the max is subtracted
    before dividing) instead of overflowing into a misleading NaN-weights error; at temperature 1 the draw is
    multinomial(softmax(logits)) as before, bit for bit."""
    from refine_mini.model import sample_token
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 5
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
            sample_token(logits, bad, torch.Generator().manual_seed(1))
        with pytest.raises(ValueError, match="temperature must be finite"):
            tiny("deltanet").generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=bad,
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_token(logits, 1e-40, torch.Generator().manual_seed(1)), logits.argmax(-1))
    expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(2))[:, 0]
    assert torch.equal(sample_token(logits, 1.0, torch.Generator().manual_seed(2)), expected)
