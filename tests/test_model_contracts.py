"""Contracts of the model and the pre-training plumbing that the self-consistency tests cannot see.

Streaming == one pass, cached == naive generation and resume == uninterrupted all compare the code with itself, so a
change made everywhere at once passes them. These tests compare against references written out here instead:
- RoPE is the rotate-half formula at positions pos0 .. pos0+T-1 (int or per-row start);
- a block is x + Mixer(mixer_norm(x)), then x + down(silu(gate(mlp_norm(x))) * up(...)), the head is tied, SwiGLU's
  hidden width is rounded UP to a multiple of 64;
- generate: a temperature divides the logits, stop tokens are sticky per row, the returned state has read everything
  but the last new token;
- AdamW groups (decay only >=2-D weights), betas, the LR schedule's peak and floor, gradient clipping at the given
  norm, a NaN gradient step leaves the weights alone, and pretrain's steps equal a hand-written loop.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from refine_mini import model as model_module
from refine_mini.common import load_checkpoint
from refine_mini.head_loss import head_loss_reference
from refine_mini.model import FastWeightLM, SwiGLU, sample_token
from refine_mini.rope import apply_rope
from refine_mini.trainer import (TrainConfig, _step_generator, answer_weighted_loss, clip_and_step, lr_at,
                                 make_optimizer, pretrain, token_nll)

from tests.test_model import tiny
from tests.test_train import RandomCorpus, _pieces, short_run, tiny_cfg


def test_rope_is_the_rotate_half_formula_at_absolute_positions():
    """Channel i < dh/2 pairs with i + dh/2 and turns by pos · theta^(-2i/dh); an int start and a per-row start."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1, 4, generator=g, dtype=torch.float64)  # (B, T, H, dh=4)
    theta = 100.0

    def reference(row, pos0):
        out = torch.empty(3, 4, dtype=torch.float64)
        for t in range(3):
            for i in range(2):
                a = (pos0 + t) * theta ** (-2 * i / 4)
                x1, x2 = x[row, t, 0, i], x[row, t, 0, i + 2]
                out[t, i], out[t, i + 2] = x1 * math.cos(a) - x2 * math.sin(a), x1 * math.sin(a) + x2 * math.cos(a)
        return out

    got = apply_rope(x, 5, theta)
    for b in range(2):
        torch.testing.assert_close(got[b, :, 0], reference(b, 5), atol=1e-12, rtol=0)
    got = apply_rope(x, torch.tensor([2, 9]), theta)
    torch.testing.assert_close(got[0, :, 0], reference(0, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1, :, 0], reference(1, 9), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_forward_is_pre_norm_blocks_then_final_norm_then_the_tied_head(mixer):
    """The model equals the block equations written out, with every RMSNorm gain made distinct (at init they are
    all ones, which hides a swapped norm)."""
    model = tiny(mixer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    logits, hidden, _ = model(tokens)
    with torch.no_grad():
        x = model.embed.weight[tokens]
        for block in model.blocks:
            x = x + block.mixer(block.mixer_norm(x))[0]
            h = block.mlp_norm(x)
            x = x + block.mlp.down(F.silu(block.mlp.gate(h)) * block.mlp.up(h))
        ref_hidden = model.final_norm(x)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-12, rtol=1e-12)
    assert model.lm_head.weight is model.embed.weight  # tied: one (V, D) matrix reads and writes tokens
    torch.testing.assert_close(logits, ref_hidden @ model.embed.weight.T, atol=1e-12, rtol=1e-12)
    untied = tiny(mixer, tie_embeddings=False)
    assert untied.num_params() == model.num_params() + 64 * 32


def test_swiglu_hidden_width_is_rounded_up_to_a_multiple_of_64():
    """hidden = 64 · ceil(2/3 · ratio · D / 64): D = 32 -> 128 (85.3 up), D = 128 -> 384 (341.3 up)."""
    assert SwiGLU(32, 4.0).gate.out_features == 128 and SwiGLU(128, 4.0).up.out_features == 384


def test_sampling_divides_the_logits_by_the_temperature():
    """At any temperature > 0 the draw is multinomial(softmax(logits / T)) with the caller's generator; 0 is argmax."""
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.2, 0.0]]).expand(64, 5)
    for temperature in (0.5, 2.0):
        expected = torch.multinomial(torch.softmax(logits / temperature, -1), 1,
                                     generator=torch.Generator().manual_seed(7)).squeeze(1)
        got = sample_token(logits, temperature, torch.Generator().manual_seed(7))
        assert torch.equal(got, expected), temperature
    assert sample_token(logits, 0, None).tolist() == [1] * 64


def scripted_head(schedule, vocab=64):
    """A head whose argmax at decoding call s is schedule[row][s] (call 0 is the prefill)."""
    calls = [0]

    def head(hidden):  # (B, T, D) -> (B, T, V)
        logits = torch.zeros(*hidden.shape[:-1], vocab, dtype=hidden.dtype)
        for row, tokens in enumerate(schedule):
            logits[row, :, tokens[calls[0]]] = 1.0
        calls[0] += 1
        return logits
    return head


def test_generation_stops_once_every_row_has_emitted_a_stop_token():
    """Row 0 stops at its 2nd token and then goes on emitting other tokens, row 1 stops at its 4th: decoding ends
    after the 4th token (finished rows stay finished; one finished row does not end the batch)."""
    model = tiny("deltanet")
    model.head = scripted_head([[3, 9, 4, 5, 6, 7], [3, 4, 5, 9, 6, 7]])
    out, _ = model.generate(torch.randint(0, 64, (2, 5)), 6, temperature=0, stop_tokens=(9,))
    assert out.tolist() == [[3, 9, 4, 5], [3, 4, 5, 9]]


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_generate_returns_the_state_before_its_last_token(mixer):
    """The returned state has read the prompt and every new token but the last; feeding that last token continues
    exactly as encoding prompt + all new tokens from scratch (the caller feeds it, as evaluate.greedy_decode does)."""
    model = tiny(mixer)
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    out, state = model.generate(prompt, 4, temperature=0)
    with torch.no_grad():
        continued = model(out[:, -1:], state)[0][:, -1]
        scratch = model(torch.cat([prompt, out], 1))[0][:, -1]
    torch.testing.assert_close(continued, scratch, atol=1e-10, rtol=1e-10)


def test_generate_refuses_a_budget_below_one_token():
    """max_new_tokens 0 is a one-line ValueError (it used to be torch.stack's 'non-empty TensorList')."""
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        tiny("deltanet").generate(torch.randint(0, 64, (2, 5)), 0, temperature=0)


def test_generate_refuses_prompt_ids_outside_the_embedding_table():
    """An id past the table is an IndexError deep in the embedding on CPU and kills the process on CUDA (a device-side
    assert); a float or bool prompt is not a row index at all. Each is one ValueError, checked once per call."""
    model = tiny("deltanet")  # vocab_size 64
    for bad, message in ((torch.tensor([[3, 64]]), r"token ids must lie in \[0, 64\), got ids in \[3, 64\]"),
                         (torch.tensor([[-1, 5]]), r"token ids must lie in \[0, 64\), got ids in \[-1, 5\]"),
                         (torch.tensor([[1.0, 2.0]]), "tokens must be int64 or int32 ids, got torch.float32"),
                         (torch.tensor([[True, False]]), "tokens must be int64 or int32 ids, got torch.bool")):
        with pytest.raises(ValueError, match=message):
            model.generate(bad, 2, temperature=0)
    ok = torch.tensor([[0, 63]])
    assert torch.equal(model.generate(ok.int(), 2, temperature=0)[0], model.generate(ok, 2, temperature=0)[0])


def test_generate_refuses_non_finite_logits_also_when_greedy():
    """Finite weights whose activations overflow (a learning rate far too large) give NaN logits: greedy argmax
    would turn them into a silent score of 0, so generate raises instead, at any temperature."""
    model = tiny("deltanet")
    with torch.no_grad():
        model.final_norm.weight.fill_(torch.finfo(model.final_norm.weight.dtype).max)  # finite weights...
        model.embed.weight.mul_(1e3)  # ... whose logits (hidden · embedding) overflow to inf
    for temperature in (0, 1.0):
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            model.generate(torch.randint(0, 64, (2, 5)), 3, temperature=temperature)


def test_optimizer_decays_exactly_the_matrices_and_uses_the_configured_betas():
    """Group 0: every >=2-D parameter, weight_decay = cfg's; group 1: every 1-D one (norm gains...), no decay."""
    model = tiny("lact")
    cfg = TrainConfig(weight_decay=0.3, beta1=0.8, beta2=0.97)
    decay, no_decay = make_optimizer(model, cfg).param_groups
    params = list(model.parameters())
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() < 2}
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0 and no_decay["params"]
    assert decay["betas"] == no_decay["betas"] == (0.8, 0.97)


def test_learning_rate_peaks_at_lr_and_stays_on_the_floor_after_max_steps():
    """Never above cfg.lr: warm-up reaches it at step warmup-1, the cosine starts from it at step warmup; after
    max_steps (a resumed run with more steps) it stays at lr · min_lr_ratio."""
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert max(lr_at(s, cfg) for s in range(200)) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(11, cfg) < 1.0
    assert lr_at(150, cfg) == pytest.approx(0.1) and lr_at(199, cfg) == pytest.approx(0.1)


def test_clip_and_step_clips_to_the_given_norm_and_skips_nan_gradients():
    """With SGD(lr=1) the update IS the clipped gradient: norm 5 clipped to 0.5 moves the weights by grad/10; the
    returned norm is the unclipped one and the gradients are cleared. A NaN gradient leaves the weights untouched."""
    layer = torch.nn.Linear(3, 4, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = layer.weight.detach().clone()
    grad = torch.zeros(4, 3)
    grad[0, 0], grad[1, 2] = 3.0, 4.0  # norm 5
    layer.weight.grad = grad.clone()
    assert clip_and_step(layer, opt, 0.5) == pytest.approx(5.0)
    torch.testing.assert_close(layer.weight.detach(), before - grad / 10)
    assert layer.weight.grad is None
    after = layer.weight.detach().clone()
    layer.weight.grad = torch.full((4, 3), float("nan"))
    assert math.isnan(clip_and_step(layer, opt, 0.5))
    assert torch.equal(layer.weight.detach(), after) and layer.weight.grad is None


class MixedCorpus(RandomCorpus):
    """Random filler drawn from the generator, then a question and its answer: the batch changes every step, and
    the answer-weighted loss differs from plain NTP."""

    def batch(self, batch_size, generator):
        qa, _ = _pieces(("\nQuestion: Where?\nAnswer:", False), (" Longford\n", True))
        filler = torch.randint(0, 8000, (batch_size, 8), generator=generator)
        return torch.cat([filler, qa.repeat(batch_size, 1)], 1)


@pytest.mark.parametrize("fused", [False, True])
def test_pretrain_steps_equal_a_hand_written_loop(tmp_path, monkeypatch, fused):
    """Two pretrain steps == the loop written out: step s's batch from _step_generator(seed, s), lr_at(s), the
    answer-weighted loss's gradient (from full logits), clipped at grad_clip, AdamW with make_optimizer's groups.
    With pretrain's head loss swapped for the plain full-logits path the two agree to fp32 rounding. With the default
    fused head loss, whose sums run in another order, 99 % of the weights agree to 1e-5 and all to 1e-3: AdamW's
    first steps, lr·g/(|g| + eps), magnify the last bits of gradients near eps (one weight in 1024 moved 9e-5 on an
    AVX-512 Xeon, 6e-7 at most on an EPYC), while a wrong weight, LR or step moves weights by ~lr = 1e-2."""
    if not fused:
        monkeypatch.setattr(model_module, "head_loss", head_loss_reference)
    model_cfg = dataclasses.replace(tiny_cfg(), vocab_size=8193)
    cfg = dataclasses.replace(short_run(answer_weight=20.0), max_steps=2, grad_clip=0.5)
    corpus = MixedCorpus()
    pretrain(model_cfg, cfg, corpus, tmp_path, "cpu")
    torch.manual_seed(cfg.seed)
    model = FastWeightLM(model_cfg)
    opt = make_optimizer(model, cfg)
    for step in range(cfg.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        tokens = corpus.batch(cfg.batch_size, _step_generator(cfg.seed, step))
        answer_weighted_loss(token_nll(model(tokens)[0], tokens), tokens, cfg.answer_weight).backward()
        clip_and_step(model, opt, cfg.grad_clip)
    saved = load_checkpoint(tmp_path)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved[name], value, atol=1e-3 if fused else 1e-7, rtol=1e-6, msg=name)
        if fused:
            off = ((saved[name] - value).abs() > 1e-5 + 1e-6 * value.abs()).float().mean().item()
            assert off < 0.01, (name, off)
