"""The whole model's recurrent state: what a FastWeightLM carries from one call to the next.

Question answered: how can REFINE fork, stack and select the fast-weight memories of many prefixes as plain values?

`ModelState` holds one per-layer state dataclass per block (DeltaNetState, LaCTState or LaCTRaggedState). Every
per-layer state keeps the batch at dim 0 of every tensor field, so the operations rollouts need -- clone, detach,
select rows, repeat rows, concatenate -- are written once, here, for every mixer (method.md §1.4-1.5).
"""

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class ModelState:
    """The whole model's recurrent memory: one per-layer state dataclass per block (batch at dim 0 everywhere)."""

    layers: list = field(default_factory=list)

    def _map(self, fn) -> "ModelState":
        """Apply fn to every tensor field of every layer state, keeping non-tensor fields (e.g. positions)."""
        out = []
        for layer_state in self.layers:
            changes = {f.name: fn(getattr(layer_state, f.name))
                       for f in dataclasses.fields(layer_state)
                       if isinstance(getattr(layer_state, f.name), torch.Tensor)}
            out.append(dataclasses.replace(layer_state, **changes))
        return ModelState(out)

    def clone(self) -> "ModelState":
        """An independent copy; stays differentiable (gradients flow back to the original's graph)."""
        return self._map(torch.clone)

    def detach(self) -> "ModelState":
        """Cut the autograd graph (for generation and test-time answers)."""
        return self._map(torch.Tensor.detach)

    def select(self, rows: torch.Tensor) -> "ModelState":
        """Keep batch rows `rows` (LongTensor (B',)), in that order."""
        return self._map(lambda t: t.index_select(0, rows.to(t.device)))

    def repeat_interleave(self, n: int) -> "ModelState":
        """Each row repeated n times, consecutively: rows (a, b) -> (a, a, b, b) for n = 2 (a GRPO group)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(states: list["ModelState"]) -> "ModelState":
        """Stack the rows of several states of one model; ValueError (`stack_problem`) if they cannot be."""
        problem = stack_problem(states)
        if problem:
            raise ValueError(f"cannot stack these states: {problem}")
        merged = []
        for per_layer in zip(*(s.layers for s in states)):
            first = per_layer[0]
            changes = {f.name: torch.cat([getattr(s, f.name) for s in per_layer], dim=0)
                       for f in dataclasses.fields(first) if isinstance(getattr(first, f.name), torch.Tensor)}
            merged.append(dataclasses.replace(first, **changes))
        return ModelState(merged)


def stack_problem(states: list[ModelState]) -> str | None:
    """Why `ModelState.cat` cannot join these states, or None: it needs one or more states with the same number of
    layers and, layer by layer, the same state type, equal non-tensor fields (e.g. LaCT's position) and equal tensor
    shapes past the batch dim."""
    if not states or len({len(s.layers) for s in states}) != 1:
        return f"states of {[len(s.layers) for s in states]} layers (one or more states of one model are needed)"
    for i, per_layer in enumerate(zip(*(s.layers for s in states))):
        first = per_layer[0]
        for other in per_layer[1:]:
            if type(other) is not type(first):
                return f"layer {i} holds a {type(first).__name__} and a {type(other).__name__}"
            for f in dataclasses.fields(first):
                a, b = getattr(first, f.name), getattr(other, f.name)
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    if a.shape[1:] != b.shape[1:]:
                        return f"layer {i} field {f.name}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
                elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                    return f"layer {i} field {f.name}: a {type(a).__name__} and a {type(b).__name__}"
                elif a != b:
                    return f"layer {i} field {f.name}: {a!r} and {b!r}"
    return None


def check_ends(ends: list, batch: int, length: int) -> None:
    """A mixer's `snapshots(record, ends)` takes one list of positions per row of a (batch, length) pass, each t in
    [0, length): the state after reading x[b, :t+1]. ValueError otherwise (a later t has not been read)."""
    if len(ends) != batch or any(not 0 <= t < length for row in ends for t in row):
        raise ValueError(f"snapshot positions {ends} do not fit a pass of {batch} rows of {length} tokens: one list "
                         f"per row, each position in [0, {length})")


def check_fields(state, shapes: dict, device: torch.device, why: str = "") -> None:
    """ValueError unless every field `name` of `shapes` is a floating-point tensor on `device` of shape
    `shapes[name]` (None: any shape). A layer state handed back by a caller is checked, not trusted: an integer or
    misplaced tensor fails deep inside torch, and a tensor of another shape may broadcast and compute nonsense."""
    for name, shape in shapes.items():
        t = getattr(state, name)
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device == device):
            got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise ValueError(f"{type(state).__name__}.{name} must be a floating-point tensor on {device}, got {got}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{type(state).__name__}.{name} of shape {tuple(t.shape)} does not fit input batch "
                             f"{shape[0]}: expected {tuple(shape)}{why}")
