"""Activation checkpointing (`model.set_checkpointing`, --grad-checkpoint, --checkpoint-segment): same numbers, less
memory.

Each block is recomputed in the backward from its inputs instead of keeping its activations (method.md §2: the paper
trains with per-layer gradient checkpointing), optionally on S-token pieces that carry the state. Checked here, for
whole-sequence blocks and for pieces: carried-state passes, recorded passes with snapshots and whole REFINE steps give
the same values and gradients as without checkpointing; the pieces' records join into the whole pass's record; the
backward holds less; the checkpointed model still traces whole for torch.compile. The CLI flags are checked in
test_grad_checkpoint_flags.py.
"""
import pytest
import torch
import torch.utils.checkpoint

from bench.measure import cpu_peak_bytes
from refine_mini import model as model_module
from refine_mini.evaluate import storage_bytes
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.refine import RefineConfig, refine_step
from refine_mini.trainer import ntp_loss_from_hidden
from tests.test_deltanet import rel  # ‖a − b‖ / ‖b‖: pieces are equal only to rounding, not bit for bit
from tests.test_model import tiny  # fp64, 2 layers, 8-token chunks

MIXERS = ["deltanet", "lact"]


SEGMENTS = [0, 8, 16]  # tokens per checkpointed piece (0: whole sequences); tiny()'s chunks are 8 tokens


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
            assert rel(b[name], a[name]) < 1e-10, name


def spy_checkpoint(monkeypatch) -> list:
    """Count the calls of torch.utils.checkpoint.checkpoint made by the model (and still make them), whether it
    calls model.py's imported name or torch.utils.checkpoint.checkpoint."""
    calls = []
    real = torch.utils.checkpoint.checkpoint
    for owner in (model_module, torch.utils.checkpoint):
        monkeypatch.setattr(owner, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("split, segment", [(5, 0), (11, 0), (16, 0), (5, 8), (11, 16)])
def test_a_checkpointed_pass_from_a_carried_state_equals_the_plain_one(mixer, split, segment):
    """A loss on the hidden states AND the final state, from a state that is itself differentiable: the same loss
    and the same gradients to every parameter and to the incoming state's tensors."""
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        carried = model.encode(tokens[:, :split])[1]
    leaves = [t.clone().requires_grad_() for t in state_tensors(carried)]
    results = []
    for ckpt in (False, True):
        model.set_checkpointing(ckpt, segment if ckpt else 0)

        def loss_fn():
            hidden, final = model.encode(tokens[:, split:], with_leaves(carried, leaves))
            return hidden.pow(2).sum() + sum(t.pow(2).sum() for t in state_tensors(final))
        results.append(grads_of(model, loss_fn, *leaves))
    (loss_a, p_a, l_a), (loss_b, p_b, l_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    assert_same_grads(p_a, p_b)
    for a, b in zip(l_a, l_b, strict=True):
        assert rel(b, a) < 1e-10


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("segment", SEGMENTS)
def test_a_checkpointed_recorded_pass_gives_the_same_snapshots_and_gradients(mixer, segment):
    """REFINE's path: encode_recorded, snapshots at some positions (some inside a piece, one on a piece's last
    token), a rollout encoded from each snapshot."""
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    ends = [[4, 15], [9, 28]]
    results = []
    for ckpt in (False, True):
        model.set_checkpointing(ckpt, segment if ckpt else 0)

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
@pytest.mark.parametrize("schedule, segment", [("single", 0), ("minibatch", 0), ("single", 16)])
def test_a_refine_step_is_the_same_with_checkpointing(mixer, schedule, segment):
    results = []
    for ckpt in (False, True):
        model = tiny(mixer)
        model.set_checkpointing(ckpt, segment if ckpt else 0)
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
def test_the_checkpointed_backward_holds_less_than_half_and_pieces_less_again(mixer):
    """Peak tensor memory of one NTP forward+backward (the profiler's allocation records): the blocks' activations
    dominate it; with checkpointing only one block's exist at a time, with 256-token pieces only one piece's."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, vocab_size=256, n_layers=4))
    tokens = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))

    def step(ckpt, segment=0):
        model.set_checkpointing(ckpt, segment)
        return cpu_peak_bytes(lambda: ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens).backward())
    plain, checkpointed, pieces = step(False), step(True), step(True, 256)
    if plain is None:
        pytest.skip("this PyTorch's profiler exposes no allocation records")
    assert checkpointed < 0.5 * plain and pieces < 0.6 * checkpointed, (plain, checkpointed, pieces)


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_pieces_records_join_into_the_record_of_one_pass(mixer):
    """merge_records of pieces of 16, 8 and 13 tokens == the record of one 37-token pass, tensor by tensor (the
    fast-weight history entry by entry for LaCT), and a piece that is not a multiple of the chunk is refused."""
    model, x = tiny(mixer), torch.randn(2, 37, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mixer_layer = model.blocks[0].mixer
    with torch.no_grad():
        whole = mixer_layer.forward_recorded(x)[2]
        records, state = [], None
        for piece in x.split([16, 8, 13], dim=1):
            _, state, record = mixer_layer.forward_recorded(piece, state)
            records.append(record)
        merged = mixer_layer.merge_records(records)
        a, b = flat(merged), flat(whole)
        assert len(a) == len(b)
        for t_merged, t_whole in zip(a, b):
            torch.testing.assert_close(t_merged, t_whole, rtol=1e-12, atol=1e-14)
        bad = [mixer_layer.forward_recorded(x[:, :12])[2], mixer_layer.forward_recorded(x[:, 12:])[2]]
        with pytest.raises(ValueError, match="multiples of the chunk size"):
            mixer_layer.merge_records(bad)


def flat(record) -> list:
    """Every tensor of a record (tuples, lists and state dataclasses), in order."""
    if isinstance(record, torch.Tensor):
        return [record]
    if isinstance(record, (list, tuple)):
        return [t for item in record for t in flat(item)]
    return [v for v in vars(record).values() if isinstance(v, torch.Tensor)]


def test_a_segment_that_is_not_a_multiple_of_the_chunk_is_a_value_error():
    for mixer in MIXERS:
        model = tiny(mixer)
        with pytest.raises(ValueError, match="multiple of the model's chunk size"):
            model.set_checkpointing(True, 12)
        model.set_checkpointing(False, 16)  # a segment turns checkpointing on
        assert model.grad_checkpoint and model.checkpoint_segment == 16


def test_checkpointing_is_off_without_grad_and_the_checkpointed_model_traces_whole(monkeypatch):
    """No recomputation to arrange under no_grad (generation, evaluation); with grad, torch.compile takes the
    checkpointed blocks (whole, and in 8-token pieces) without a graph break (torch._dynamo.explain: traces only),
    one checkpoint region per block (and piece) in the traced graphs. The spy is off while tracing: dynamo
    recognises checkpoint only as torch.utils.checkpoint's own function, not behind a patched name."""
    for mixer, segment in zip(MIXERS, (0, 8)):
        model = tiny(mixer).float()
        model.set_checkpointing(True, segment)
        tokens = torch.randint(0, 64, (2, 20))
        with monkeypatch.context() as patch:
            calls = spy_checkpoint(patch)
            with torch.no_grad():
                model.encode(tokens)
            assert not calls
            model.encode(tokens)
            assert len(calls) == 2 * (3 if segment else 1)  # with grad: every block's (and piece's) checkpoint
        explanation = torch._dynamo.explain(model.encode)(tokens)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        regions = [node for graph in explanation.graphs for node in graph.graph.nodes
                   if node.target is torch.ops.higher_order.tag_activation_checkpoint]
        assert len(regions) == 2 * (3 if segment else 1)  # the trace went through every checkpoint


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("segment", [0, 16])
def test_snapshots_built_layer_by_layer_equal_those_from_the_records(mixer, segment):
    """encode_recorded(tokens, ends) (each layer's snapshots built as soon as its pass ends, the rollout pass's way)
    == snapshots(encode_recorded(tokens)); with and without grad, whole and in pieces. Their token rows are gathered
    or copied, so a snapshot never keeps a record's (B, T, .) tensors alive."""
    model = tiny(mixer)
    model.set_checkpointing(True, segment)
    tokens = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(5))
    ends = [[3, 16, 31], [8, 23, 44]]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            hidden, records = model.encode_recorded(tokens)
            expected = model.snapshots(records, ends)
            hidden_b, snapshots = model.encode_recorded(tokens, ends)
        assert rel(hidden_b, hidden) < 1e-12 and len(snapshots) == len(expected) == 6
        for got, want in zip(snapshots, expected):
            for t_got, t_want in zip(state_tensors(got), state_tensors(want), strict=True):
                assert t_got.shape == t_want.shape and rel(t_got, t_want) < 1e-12
            for layer in got.layers:
                for name in ("buf_k", "buf_v", "swa_k", "swa_v", "conv"):
                    t = getattr(layer, name, None)
                    if t is not None and t.numel():
                        # a share of the snapshots' own gathered rows at most, never a (B, T, .) tensor
                        assert t.untyped_storage().nbytes() <= len(expected) * t.numel() * t.element_size(), name


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_no_grad_rollout_pass_keeps_one_layers_record_at_a_time(mixer):
    """The minibatch schedule's rollout pass (no grad, rollout.document_forward) builds each layer's snapshots as
    soon as its pass ends: against building them from all four layers' records at the end, its peak is lower by
    most of three records (profiler allocation records), and 256-token pieces lower it again. The snapshots are
    the same."""
    from refine_mini.rollout import document_forward
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, vocab_size=256, n_layers=4))
    tokens = torch.randint(0, 256, (2, 2048), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[100, 900, 1500], [300, 1200, 2000]])
    ends = [p.tolist() for p in positions]
    with torch.no_grad():
        record_bytes = storage_bytes(flat(model.encode_recorded(tokens)[1][0]))  # one layer's
        at_the_end = cpu_peak_bytes(lambda: model.snapshots(model.encode_recorded(tokens)[1], ends))
        peaks, states = [], []
        for segment in (0, 256):
            model.set_checkpointing(segment > 0, segment)
            peaks.append(cpu_peak_bytes(lambda: states.append(document_forward(model, list(tokens), positions))))
    if at_the_end is None:
        pytest.skip("this PyTorch's profiler exposes no allocation records")
    assert at_the_end - peaks[0] > 0.6 * 3 * record_bytes and peaks[1] < peaks[0], (at_the_end, peaks, record_bytes)
    for a, b in zip(states[0].snapshots, states[1].snapshots, strict=True):
        assert max(rel(x, y) for x, y in zip(state_tensors(b), state_tensors(a))) < 1e-5  # fp32
