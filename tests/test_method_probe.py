"""An outside probe of the method and model code: inputs the other tests do not draw, each test a found bug.

- The fused LM-head loss under bf16 autocast summed its per-block weight gradients in bf16 (its docstring says fp32),
  so the error grew with the number of row blocks.
- ppo_clip_loss / group_advantages broadcast mismatched shapes into a wrong loss instead of refusing them.
- LaCT.snapshots of a record that started from a carried state returned states at the wrong position.
- refine_step took float, bool and out-of-vocabulary token ids (bool ones silently gave wrong NTP targets).
"""
import pytest
import torch

from refine_mini.grpo import group_advantages, ppo_clip_loss
from refine_mini.head_loss import head_loss, head_loss_reference
from refine_mini.lact import LaCT
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.refine import RefineConfig, refine_step
from tests.test_deltanet import rel


def test_fused_head_weight_gradient_under_bf16_is_summed_over_blocks_in_fp32():
    """256 row blocks of 8 rows: the plain path under autocast rounds the (V, D) weight gradient to bf16 once (~3e-3
    from fp32); the fused path rounds each block's product and must then add them in fp32, so it stays as close.
    Summed in bf16 it drifted to ~1e-2 (each addition rounds the running total to 8 bits)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2048, 32, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(200, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 200, (2048,), generator=g)

    def weight_grad(fn, autocast, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hidden, weight, targets, **kw)[0]
        return torch.autograd.grad(loss, weight)[0]

    exact = weight_grad(head_loss, False, block_rows=8)
    fused, plain = weight_grad(head_loss, True, block_rows=8), weight_grad(head_loss_reference, True)
    assert fused.dtype == torch.float32
    assert rel(plain, exact) < 5e-3 and rel(fused, exact) < 2 * rel(plain, exact)


def test_ppo_and_group_statistics_refuse_shapes_that_would_broadcast():
    """Advantages (N, 1) against log-probs (N, k) broadcast to an (N, N, k) loss: a silently wrong number, as would
    old log-probs of another shape. Both are one-line ValueErrors; so are rewards and groups of different lengths."""
    logp, advantages = torch.randn(4, 3), torch.tensor([1.0, -1.0, 0.5, -0.5])
    assert ppo_clip_loss(logp, logp, advantages)[0].shape == ()
    for bad in ((logp, logp, advantages[:, None]), (logp, logp[:, :1], advantages), (logp[:, 0], logp[:, 0],
                                                                                       advantages)):
        with pytest.raises(ValueError, match="ppo_clip_loss needs"):
            ppo_clip_loss(*bad)
    with pytest.raises(ValueError, match="group_advantages needs"):
        group_advantages(torch.randn(4), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="group_advantages needs"):
        group_advantages(torch.randn(4, 1), torch.tensor([0, 0, 1, 1]))


def test_lact_snapshots_of_a_later_segments_record_are_refused():
    """A LaCT record of a segment that started from a carried state indexes its chunk history, buffers, window and
    position from that segment's start: its snapshots came back at the wrong position (pos 4 for a state after 14
    tokens) with the wrong fast weights. DeltaNet supports such records; LaCT now says it does not."""
    torch.manual_seed(0)
    layer = LaCT(32, 2, 2, chunk_size=4, window=6).double()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        _, carried = layer(x[:, :10])
        later = layer.forward_recorded(x[:, 10:], carried)[2]
        whole = layer.forward_recorded(x)[2]
        assert layer.snapshots(whole, [[13]])[0].pos == 14  # a record from the start still works
        with pytest.raises(ValueError, match="from the start"):
            layer.snapshots(later, [[3]])


@pytest.mark.parametrize("bad", ["float", "bool", "too_large", "negative"])
def test_refine_step_refuses_tokens_that_are_not_ids_of_the_vocabulary(bad):
    """Bool documents were cast to ids 0/1 for the model but kept bool NTP targets (the IGNORE pad became True,
    i.e. id 1: a silently wrong loss); float ids died in a gather, and out-of-range ids in the embedding (on CUDA a
    device-side assert). All are one-line ValueErrors before any forward."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer="deltanet", d_model=32, n_layers=1, n_heads=2, vocab_size=64))
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 64, (2, 40))
    tokens = {"float": tokens.float(), "bool": tokens > 31, "too_large": tokens.index_fill(1, torch.tensor([7]), 64),
              "negative": tokens.index_fill(1, torch.tensor([7]), -1)}[bad]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="token"):
        refine_step(model, optimizer, tokens, RefineConfig(c=2, k=3), torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
