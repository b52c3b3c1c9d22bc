"""Activation checkpointing (`model.grad_checkpoint`, --grad-checkpoint): the same numbers, less memory.

Each block is recomputed in the backward from its inputs instead of keeping its activations (method.md §2: the paper
trains with per-layer gradient checkpointing). Checked here: carried-state passes, recorded passes with snapshots and
whole REFINE steps give the same values and gradients as without it; the backward holds less; the checkpointed
model still traces whole for torch.compile; the CLI flags reach the model.
"""
import json

import pytest
import torch

import train
import tta
from bench.measure import cpu_peak_bytes
from refine_mini import model as model_module
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.refine import RefineConfig, refine_step
from refine_mini.trainer import ntp_loss_from_hidden
from tests.test_regimes import LENGTH, run_cli, small_defaults, tiny_ckpt  # noqa: F401 (fixtures)

MIXERS = ["deltanet", "lact"]


def tiny(mixer: str) -> FastWeightLM:
    torch.manual_seed(0)
    return FastWeightLM(ModelConfig(mixer=mixer, vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_heads_fast=2,
                                    chunk_size=8, lact_chunk=8, window=8)).double()


def state_tensors(state):
    return [t for layer in state.layers for t in vars(layer).values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def with_leaves(state, leaves):
    """`state` with its floating-point tensors replaced, in state_tensors order, by `leaves`."""
    it = iter(leaves)
    return state._map(lambda t: next(it) if t.is_floating_point() else t)


def grads_of(model, loss_fn, *leaves):
    """(loss, {parameter name: grad}, [grad of each leaf]) of one backward of loss_fn()."""
    loss = loss_fn()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [*model.parameters(), *leaves], allow_unused=True)
    return loss.detach(), dict(zip(names, grads[:len(names)])), list(grads[len(names):])


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None:
            assert b[name] is None, name
        else:
            torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-14, msg=name)


def spy_checkpoint(monkeypatch) -> list:
    """Count the calls of torch.utils.checkpoint.checkpoint made by the model (and still make them)."""
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("split", [5, 11, 16])
def test_a_checkpointed_pass_from_a_carried_state_equals_the_plain_one(mixer, split):
    """A loss on the hidden states AND the final state, from a state that is itself differentiable: the same loss
    and the same gradients to every parameter and to the incoming state's tensors."""
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        carried = model.encode(tokens[:, :split])[1]
    leaves = [t.clone().requires_grad_() for t in state_tensors(carried)]
    results = []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt

        def loss_fn():
            hidden, final = model.encode(tokens[:, split:], with_leaves(carried, leaves))
            return hidden.pow(2).sum() + sum(t.pow(2).sum() for t in state_tensors(final))
        results.append(grads_of(model, loss_fn, *leaves))
    (loss_a, p_a, l_a), (loss_b, p_b, l_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    assert_same_grads(p_a, p_b)
    for a, b in zip(l_a, l_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_checkpointed_recorded_pass_gives_the_same_snapshots_and_gradients(mixer):
    """REFINE's path: encode_recorded, snapshots at some positions, a rollout encoded from each snapshot."""
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    ends = [[4, 17], [9, 28]]
    results = []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt

        def loss_fn():
            hidden, records = model.encode_recorded(tokens)
            states = model.snapshots(records, ends)
            rollout = sum(model.encode(tokens[b:b + 1, :3], s)[0].pow(2).sum()
                          for b, s in zip((0, 0, 1, 1), states))
            return hidden.pow(2).sum() + rollout + sum(t.pow(2).sum() for s in states for t in state_tensors(s))
        results.append(grads_of(model, loss_fn))
    (loss_a, p_a, _), (loss_b, p_b, _) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    assert_same_grads(p_a, p_b)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("schedule", ["single", "minibatch"])
def test_a_refine_step_is_the_same_with_checkpointing(mixer, schedule):
    results = []
    for ckpt in (False, True):
        model = tiny(mixer)
        model.grad_checkpoint = ckpt
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        docs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 33)]
        metrics = refine_step(model, optimizer, docs, RefineConfig(c=4, k=3, schedule=schedule, minibatches=2),
                              torch.Generator().manual_seed(0))
        metrics = metrics if isinstance(metrics, list) else [metrics]
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m_a, p_a), (m_b, p_b) = results
    for step_a, step_b in zip(m_a, m_b, strict=True):
        for key in ("loss", "ntp_loss", "policy_loss", "grad_norm"):
            assert step_b[key] == pytest.approx(step_a[key], rel=1e-10, abs=1e-13), key
    for a, b in zip(p_a, p_b):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_checkpointed_backward_holds_less_than_half(mixer):
    """Peak tensor memory of one NTP forward+backward (the profiler's allocation records): the blocks' activations
    are what dominates it, and with checkpointing only one block's exist at a time."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, vocab_size=256, n_layers=4))
    tokens = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))

    def step(ckpt):
        model.grad_checkpoint = ckpt
        return cpu_peak_bytes(lambda: ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens).backward())
    plain, checkpointed = step(False), step(True)
    if plain is None:
        pytest.skip("this PyTorch's profiler exposes no allocation records")
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_checkpointing_is_off_without_grad_and_the_checkpointed_model_traces_whole(monkeypatch):
    """No recomputation to arrange under no_grad (generation, evaluation); with grad, torch.compile takes the
    checkpointed blocks without a graph break (torch._dynamo.explain: traces, does not compile)."""
    calls = spy_checkpoint(monkeypatch)
    for mixer in MIXERS:
        model = tiny(mixer).float()
        model.grad_checkpoint = True
        tokens = torch.randint(0, 64, (2, 20))
        with torch.no_grad():
            model.encode(tokens)
        assert not calls
        explanation = torch._dynamo.explain(model.encode)(tokens)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert len(calls) == 2  # the trace went through both blocks' checkpoints
        calls.clear()


def test_the_train_flag_reaches_the_model_and_changes_no_number(tmp_path, tiny_ckpt, small_defaults,  # noqa: F811
                                                                 monkeypatch):
    calls = spy_checkpoint(monkeypatch)
    plain = run_cli(tmp_path / "a", "mid", "refine", tiny_ckpt, steps=1)
    assert not calls
    checkpointed = run_cli(tmp_path / "b", "mid", "refine", tiny_ckpt, steps=1, extra=["--grad-checkpoint"])
    assert calls
    config = json.loads((tmp_path / "b" / "mid-refine" / "config.json").read_text())
    assert config["run"]["grad_checkpoint"] is True
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("loss", "ntp_loss", "policy_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_pretrain_and_tta_grad_checkpoint_flags_reach_the_model(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    seen = {}

    def fake_pretrain(model_cfg, cfg, corpus, out, device, resume=False):
        seen["pretrain"] = cfg.grad_checkpoint
        return {}
    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    train.main(["--model", "deltanet", "--grad-checkpoint", "--out", str(tmp_path / "pre")])
    calls = spy_checkpoint(monkeypatch)
    tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2",
              "--length", str(LENGTH), "--grad-checkpoint"])
    assert seen == {"pretrain": True} and calls
