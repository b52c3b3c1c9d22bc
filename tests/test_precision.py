"""bf16 autocast, `--precision bf16` (method.md §2: fp32 master weights, bf16 autocast): where it applies and where
it must not. The projections, MLPs and the LM head's matmuls run in bf16; the fast-weight kernels, the losses'
softmax and sums, the residual stream, hidden states, fast-weight memories and weights stay fp32.

Numbers measured on the tiny models below: bf16 moves hidden states by ~1e-2 (DeltaNet) and ~4e-3 (LaCT) relative
to fp32, while two bf16 computations of the same rows agree to ~1e-7. So a bf16-vs-bf16 check at 1e-5 fails when
one side runs in fp32, and a bf16-vs-fp32 check at 5e-2 fails when bf16 breaks something."""
import json

import pytest
import torch

import eval_niah
import train
import tta
from refine_mini.common import autocast_off
from refine_mini.delta_rule import delta_rule_chunked, delta_rule_recurrent
from refine_mini.head_loss import head_loss, head_loss_reference
from refine_mini.lact_ragged import _fast_step, to_ragged
from refine_mini.model import FastWeightLM
from refine_mini.refine import RefineConfig, refine_step
from refine_mini.rollout import segmented_forward
from refine_mini.selection import pad_documents
from tests.test_deltanet import inputs, rel
from tests.test_lact import make_layer, make_op_inputs, run_chunked
from tests.test_refine_step import MIXERS
from tests.test_refine_step import make_model as tiny_model
from tests.test_regimes import LENGTH, run_cli, small_defaults, tiny_ckpt  # noqa: F401 (fixtures)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def make_model(mixer, precision="fp32"):
    """test_refine_step's tiny model (seed 0) in `precision`."""
    model = tiny_model(mixer)
    model.set_precision(precision)
    return model


def outputs_and_grads(fn, xs, autocast, backward_inside=False):
    """fn(*xs) -> tensors, under bf16 autocast or not; returns them and the gradients of a loss on all of them."""
    with torch.autocast(**BF16, enabled=autocast):
        outs = fn(*xs)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        if backward_inside:
            return [o.detach() for o in outs], torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("kernel", ["chunked", "chunked-backward-inside", "recurrent"])
def test_delta_rule_kernels_compute_exactly_as_in_fp32_under_bf16_autocast(kernel):
    """The delta-rule kernels under bf16 autocast give bit for bit what they give outside it: their matmuls stay
    fp32 (autocast_off). Without the guard the chunked kernel's in-place state update fails (fp32 state, bf16
    product) and the recurrence drifts by ~1e-3. Autocast reaches a backward called inside it, so the chunked
    kernel's hand-written backward guards itself too (plain autograd's backward ops cannot: PyTorch asks for the
    backward outside autocast, and every loop here calls it there)."""
    xs = inputs(2, 2, 19, 8, 6, dtype=torch.float32, grad=True)
    fn = {"chunked": lambda q, k, v, b, s: delta_rule_chunked(q, k, v, b, chunk_size=4, initial_state=s),
          "recurrent": lambda q, k, v, b, s: delta_rule_recurrent(q, k, v, b, initial_state=s)}[kernel.split("-")[0]]
    want_o, want_g = outputs_and_grads(fn, xs, False)
    got_o, got_g = outputs_and_grads(fn, xs, True, backward_inside=kernel.endswith("inside"))
    for a, b in zip(got_o + list(got_g), want_o + list(want_g)):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_lact_fast_weight_ops_compute_exactly_as_in_fp32_under_bf16_autocast():
    """lact_chunked (every layer call) and the ragged one-token step (rollouts) under bf16 autocast == outside it,
    bit for bit: outputs, final fast weights and their gradients."""
    q, k, v, eta, m, ws = make_op_inputs(2, 2, 13, 4, 6, seed=3, dtype=torch.float32)
    xs = [t.requires_grad_() for t in (q, k, v, eta, m, *ws)]
    fn = lambda q, k, v, eta, m, *ws: (lambda o, w: (o, *w))(*run_chunked(q, k, v, eta, m, ws, 4, splits=(5,)))
    (want_o, want_g), (got_o, got_g) = outputs_and_grads(fn, xs, False), outputs_and_grads(fn, xs, True)
    for a, b in zip(got_o + list(got_g), want_o + list(want_g)):
        assert torch.equal(a, b)

    layer = make_layer(0, dtype=torch.float32)
    _, state = layer(torch.randn(3, 5, 16))  # 5 tokens: a partial chunk of 2 (C = 3) waits in the buffer
    ragged = to_ragged(state, layer.chunk_size, layer.window)
    step_in = [torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.rand(3, 2, 3), torch.rand(3, 2)]
    want = _fast_step(layer, *step_in, ragged)
    with torch.autocast(**BF16):
        got = _fast_step(layer, *step_in, ragged)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    assert want[1]["w0"].dtype == torch.float32 and not torch.equal(want[1]["w0"], ragged.w0)  # the chunk updated


def test_autocast_off_switches_off_autocast_on_its_first_tensors_device_only():
    seen = []
    probe = autocast_off(lambda name, x: seen.append((torch.is_autocast_enabled("cpu"), (x @ x).dtype)))
    with torch.autocast(**BF16):
        probe("not a tensor", torch.ones(2, 2))
    assert seen == [(False, torch.float32)] and not torch.is_autocast_enabled("cpu")


def test_fused_head_loss_under_bf16_autocast_equals_the_plain_path_under_it():
    """Under autocast the fused head runs its matmuls in bf16 as autocast runs the plain path's (F.linear), and its
    softmax in fp32: L, nll, entropy and ∂L/∂h agree to 1e-6 (the same bf16 logits), ∂L/∂W to bf16 rounding (the
    plain path rounds the (V, D) product once, the fused one per row block). The fp32 path differs from both by
    ~1e-3 in nll: a fused head that ignored autocast fails here."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(500, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 500, (300,), generator=g)
    targets[::7] = -100  # some rows without a target

    def run(fn, autocast):
        with torch.autocast(**BF16, enabled=autocast):
            loss, nll, entropy = fn(hidden, weight, targets, with_entropy=True)[:3]
        return (loss.detach(), nll, entropy, *torch.autograd.grad(loss, (hidden, weight)))

    fused, plain, fp32 = run(head_loss, True), run(head_loss_reference, True), run(head_loss, False)
    for name, a, b, c in zip(("loss", "nll", "entropy", "grad_hidden", "grad_weight"), fused, plain, fp32):
        assert a.dtype == torch.float32, name
        assert rel(a, b) < (1e-2 if name == "grad_weight" else 1e-6), name
        assert rel(a, c) < 1e-2, name
    assert rel(fused[1], fp32[1]) > 1e-4  # bf16 is in effect


@pytest.mark.parametrize("mixer", MIXERS)
def test_bf16_precision_puts_the_matmuls_in_bf16_and_keeps_states_hidden_and_weights_fp32(mixer):
    """model.set_precision("bf16"): every nn.Linear returns bf16 (head_loss's matmuls too), and the logits, hidden
    states, fast-weight states and weights are fp32, within 5e-2 of the fp32 model; back to "fp32", the model gives
    the fp32 numbers again, bit for bit. An unknown precision is a ValueError."""
    model, tokens = make_model(mixer), torch.randint(0, 64, (2, 21))
    linear_dtypes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: linear_dtypes.add(out.dtype))
    with torch.no_grad():
        want = model(tokens)
        assert linear_dtypes == {torch.float32}
        model.set_precision("bf16")
        linear_dtypes.clear()
        got = model(tokens)
        assert linear_dtypes == {torch.bfloat16}
        nll = model.head_loss(want[1][:, :-1], tokens[:, 1:])[1]  # the fused head, from the same fp32 hidden states
        with torch.autocast(**BF16):
            plain = head_loss_reference(want[1][:, :-1], model.lm_head.weight, tokens[:, 1:])[1]
        model.set_precision("fp32")
        nll32 = model.head_loss(want[1][:, :-1], tokens[:, 1:])[1]
        again = model(tokens)
    assert rel(nll, plain) < 1e-6 and rel(nll, nll32) > 1e-5  # head_loss runs in the model's precision
    (logits, hidden, state), (logits32, hidden32, state32) = got, want
    assert logits.dtype == hidden.dtype == torch.float32
    assert 1e-4 < rel(logits, logits32) < 5e-2 and 1e-4 < rel(hidden, hidden32) < 5e-2
    memory = {"deltanet": ["S"], "lact": ["w0", "w1", "w2", "m0", "m1", "m2"]}[mixer]
    for layer, layer32 in zip(state.layers, state32.layers):
        for name in memory:
            assert getattr(layer, name).dtype == torch.float32 and rel(getattr(layer, name),
                                                                       getattr(layer32, name)) < 5e-2, name
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(again[0], logits32) and torch.equal(again[1], hidden32)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        model.set_precision("fp16")


@pytest.mark.parametrize("mixer", MIXERS)
def test_snapshots_of_a_recorded_bf16_pass_equal_segmented_bf16_passes(mixer):
    """REFINE's single schedule rebuilds prefix states from a record (model.snapshots, called after the recorded
    pass returned): in bf16 they must be the states a bf16 pass reaches, to 1e-5 (measured ~1e-7). Snapshots
    projected in fp32 (DeltaNet's conv window) would be ~4e-3 off."""
    model = make_model(mixer, "bf16")
    docs = [torch.randint(0, 64, (40,)), torch.randint(0, 64, (33,))]
    positions = torch.tensor([[0, 7, 15, 39], [3, 8, 20, 27]])
    with torch.no_grad():
        hidden, records = model.encode_recorded(pad_documents(docs)[0])
        snaps = model.snapshots(records, [p.tolist() for p in positions])
        segmented = [s for d, p in zip(docs, positions) for s in segmented_forward(model, d, p)[1]]
    for got, want in zip(snaps, segmented, strict=True):
        for layer, ref in zip(got.layers, want.layers):
            for name, value in vars(ref).items():
                if isinstance(value, torch.Tensor) and value.numel():
                    assert rel(getattr(layer, name).float(), value.float()) < 1e-5, name


class GradRecorder:
    """An optimizer that keeps the weights and records the gradient of every step (flattened, all parameters)."""

    def __init__(self, model):
        self.params, self.grads = list(model.parameters()), []

    def step(self):
        self.grads.append(torch.cat([p.grad.flatten() for p in self.params if p.grad is not None]))

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("schedule", ["single", "minibatch"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_a_bf16_refine_step_follows_the_fp32_step(mixer, schedule):
    """One REFINE step from the same weights, batch and seed: in bf16 the NTP loss is within 2 % of fp32's, the
    gradient points the same way (cosine > 0.99), the parameters stay fp32, and the policy ratio stays within 2 %
    of 1 (rollouts and the training forward both run in bf16, through different code paths)."""
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    cfg = RefineConfig(c=3, k=3, schedule=schedule, minibatches=2)
    results = {}
    for precision in ("fp32", "bf16"):
        model = make_model(mixer, precision)
        optimizer = GradRecorder(model)
        metrics = refine_step(model, optimizer, tokens, cfg, torch.Generator().manual_seed(2), grad_clip=1e9)
        metrics = metrics if isinstance(metrics, list) else [metrics]
        results[precision] = (metrics[-1], torch.cat(optimizer.grads))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert {g.dtype for g in optimizer.grads} == {torch.float32} and len(optimizer.grads) == len(metrics)
    (m32, g32), (m16, g16) = results["fp32"], results["bf16"]
    assert m16["ntp_loss"] == pytest.approx(m32["ntp_loss"], rel=2e-2) and m16["ntp_loss"] != m32["ntp_loss"]
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert abs(m16["ratio_mean"] - 1) < 2e-2 and m16["ratio_max_dev"] < 0.2


def test_precision_flag_reaches_every_script_and_a_bf16_mid_run_trains(tmp_path, tiny_ckpt, small_defaults,
                                                                     monkeypatch):
    """train.py (pretrain config, mid/post run config), tta.py and eval_niah.py take --precision: a mid run in bf16
    records it and logs an NTP loss within 2 % of the fp32 run's (not equal: bf16 ran); the others hand it to
    the model."""
    losses = {}
    for precision in ("fp32", "bf16"):
        lines = run_cli(tmp_path / precision, "mid", "refine", tiny_ckpt, steps=1, extra=("--precision", precision))
        config = json.loads((tmp_path / precision / "mid-refine" / "config.json").read_text())
        assert config["run"]["precision"] == precision
        losses[precision] = lines[0]["ntp_loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2) and losses["bf16"] != losses["fp32"]

    seen = []
    real = FastWeightLM.set_precision
    monkeypatch.setattr(FastWeightLM, "set_precision", lambda self, p: (seen.append(p), real(self, p))[1])
    monkeypatch.setattr(train, "pretrain", lambda model_cfg, cfg, *a, **kw: seen.append(cfg.precision) or {})
    train.main(["--model", "deltanet", "--out", str(tmp_path / "pre"), "--precision", "bf16"])
    tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2",
              "--length", str(LENGTH), "--precision", "bf16"])
    result = eval_niah.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "eval.json"), "--lengths", "96",
                             "--depths", "0", "--samples", "1", "--tasks", "s_niah", "--precision", "bf16"])
    assert set(seen) == {"bf16"} and len(seen) >= 5  # pretrain + tta's three methods + the evaluated run
    assert result["meta"]["precision"] == "bf16"


def test_an_unknown_precision_is_a_one_line_error(tmp_path, capsys):
    for main in (lambda a: train.main(["--model", "deltanet", "--out", str(tmp_path / "run"), *a]),
                 lambda a: eval_niah.main(["--runs", str(tmp_path), *a])):
        with pytest.raises(SystemExit) as exit_info:
            main(["--precision", "fp16"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and "invalid choice: 'fp16'" in err[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mixer", MIXERS)
def test_checkpointing_in_bf16_gives_the_same_refine_step(mixer):
    """Activation checkpointing restores the forward's autocast state for its recomputation: whole blocks give the
    bf16 step's gradient bit for bit, and 16-token pieces within bf16 rounding (each piece's weight gradient is
    rounded to bf16 on its own before the pieces are summed; measured 1-2e-3)."""
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    grads = {}
    for checkpointing in (None, 0, 16):
        model = make_model(mixer, "bf16")
        if checkpointing is not None:
            model.set_checkpointing(True, checkpointing)
        optimizer = GradRecorder(model)
        refine_step(model, optimizer, tokens, RefineConfig(c=3, k=3), torch.Generator().manual_seed(2), grad_clip=1e9)
        grads[checkpointing] = torch.cat(optimizer.grads)
    assert torch.equal(grads[0], grads[None]) and rel(grads[16], grads[None]) < 1e-2
