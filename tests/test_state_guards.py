"""States handed back to the model are checked, not trusted (found by an outside probe of the library API):
a state with the wrong number of layers, another mixer's state, a state of another batch or width, states that
cannot be stacked, and snapshot positions the recorded pass never read are ValueErrors, where before they ran a
model with blocks skipped, stacked LaCT rows at different positions under one position, or failed deep inside.
"""
import pytest
import torch

from refine_mini.rollout import can_stack
from refine_mini.state import ModelState, stack_problem

from tests.test_model import MIXERS, rel, tiny


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_state_of_the_wrong_number_of_layers_is_refused(mixer):
    """zip(blocks, states) would run as many blocks as there are layer states: a 1-layer state gave a 2-layer
    model's logits from its first block only, ModelState([]) from none."""
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    _, _, state = model(tokens[:, :6])
    for layers in (state.layers[:1], [], state.layers * 2):
        with pytest.raises(ValueError, match=f"state has {len(layers)} layer states, the model 2 blocks"):
            model(tokens[:, 6:], ModelState(layers))
        with pytest.raises(ValueError, match="layer states"):
            model.generate(tokens[:, 6:], 2, temperature=0, state=ModelState(layers))
    split = model(tokens[:, 6:], state)[0]  # the whole state still continues the sequence exactly
    assert rel(split, model(tokens)[0][:, 6:]) < 1e-10


def test_another_mixers_or_batchs_state_is_refused():
    """A DeltaNet state given to LaCT (or the reverse), or a state of another batch size or width, is a ValueError
    naming what was expected (before: AttributeError, or a shape error from inside torch.cat)."""
    dn, lact = tiny("deltanet"), tiny("lact")
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    _, _, dn_state = dn(tokens)
    _, _, lact_state = lact(tokens)
    with pytest.raises(ValueError, match="needs a LaCTState or LaCTRaggedState, got a DeltaNetState"):
        lact(tokens, dn_state)
    with pytest.raises(ValueError, match="needs a DeltaNetState, got a LaCTState"):
        dn(tokens, lact_state)
    for model, state in ((dn, dn_state), (lact, lact_state)):
        with pytest.raises(ValueError, match="does not fit input batch 3"):
            model(torch.cat([tokens, tokens[:1]]), state)
    narrow_state = ModelState([type(s)(S=s.S[:, :, :8], conv=s.conv) for s in dn_state.layers])
    with pytest.raises(ValueError, match="expected S"):
        dn(tokens, narrow_state)


def test_states_that_cannot_be_stacked_are_refused_by_cat():
    """ModelState.cat joins states of one model with equal non-tensor fields: LaCT states after 9 and 17 tokens
    (same shapes, different positions) were stacked under position 9, shifting the second row's RoPE. Now cat
    raises, and can_stack says so beforehand; states that can be stacked give each row's own continuation."""
    model = tiny("lact")
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(2))
    _, _, at9 = model(tokens[:, :9])
    _, _, at17 = model(tokens[:, :17])
    assert at9.layers[0].w0.shape == at17.layers[0].w0.shape and at9.layers[0].buf_k.shape == at17.layers[0].buf_k.shape
    assert not can_stack([at9, at17]) and "field pos: 9 and 17" in stack_problem([at9, at17])
    with pytest.raises(ValueError, match="field pos: 9 and 17"):
        ModelState.cat([at9, at17])
    for bad, message in (([], r"states of \[\] layers"), ([at9, ModelState(at9.layers[:1])], r"of \[2, 1\] layers")):
        assert not can_stack(bad)
        with pytest.raises(ValueError, match=message):
            ModelState.cat(bad)
    _, _, other9 = model(tokens[:, 11:20])  # another row, also after 9 tokens
    both = ModelState.cat([at9, other9])
    nxt = torch.tensor([[5], [7]])
    logits = model(nxt, both)[0]
    assert rel(logits[1:], model(nxt[1:], other9)[0]) < 1e-12 and rel(logits[:1], model(nxt[:1], at9)[0]) < 1e-12


@pytest.mark.parametrize("mixer", MIXERS)
def test_snapshot_positions_outside_the_pass_are_refused(mixer):
    """snapshots(records, ends) rebuilds the state after x[b, :t+1] for t in [0, T): t = T (LaCT returned a state
    claiming position T + 1 with T tokens read) or t = -1 (read as the last token) or a list per row too many are
    ValueErrors, for both mixers."""
    model = tiny(mixer)
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    _, records = model.encode_recorded(tokens)
    good = model.snapshots(records, [[19], [0]])
    assert len(good) == 2
    for ends in ([[20], [3]], [[-1], [3]], [[3], [4], [5]], [[3]]):
        with pytest.raises(ValueError, match="do not fit a pass of 2 rows of 20 tokens"):
            model.snapshots(records, ends)
        with pytest.raises(ValueError, match="do not fit a pass"):
            model.encode_recorded(tokens, ends)
