"""One prepared check of a device path (CUDA by default): does everything the CPU suite proves also hold there?

The CPU test suite never sees a GPU. When one is available, this script runs the checks that matter there, each a
comparison against a reference with a printed error, PASS/FAIL per line, exit status 1 if any fails:
  1. the chunked delta rule equals the recurrence on the device (fp32 outputs, final state and all gradients; a
     ragged last chunk), and bf16 inputs stay close to the fp32 result;
  2. torch.compile(fullgraph=True) of the kernel equals eager on the device (skipped with --no-compile);
  3. for DeltaNet and LaCT: the device's logits equal the CPU's, and streaming (prefill, then token by token) equals
     one full pass on the device; the fused head loss (head_loss.py, the device's block size) equals the
     full-logits path in loss, entropy and both gradients;
  4. one REFINE step per mixer on the device, sampling with a generator on the device: finite metrics, finite
     weights, and the weights move;
  5. a checkpoint saved from the device loads on CPU with identical weights;
  6. bf16 autocast (--precision bf16): the fused head loss equals the full-logits path under it; per mixer the logits
     stay within 5e-2 of fp32 with fp32 states, and a bf16 REFINE step's NTP loss within 2 % of the fp32 step's;
  7. with --cli: the scripts end to end on the device (tiny pre-training, also compiled in bf16, mid, post, TTT,
     eval_niah) in a scratch folder, each exiting cleanly; the bf16 run resumed on the CPU keeps its precision.

    python bench/device_check.py                     # CUDA, checks 1-6 (a minute, most of it compiling)
    python bench/device_check.py --cli               # plus the end-to-end scripts
    python bench/device_check.py --device cpu --no-compile   # the same checks on CPU (what the test suite runs)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import compiled_error  # noqa: E402
from refine_mini.common import load_checkpoint, make_generator, pick_device, save_checkpoint  # noqa: E402
from refine_mini.delta_rule import delta_rule_chunked, delta_rule_recurrent  # noqa: E402
from refine_mini.head_loss import IGNORE, head_loss, head_loss_reference  # noqa: E402
from refine_mini.model import FastWeightLM, ModelConfig  # noqa: E402
from refine_mini.refine import RefineConfig, refine_step  # noqa: E402
from refine_mini.trainer import TrainConfig, make_optimizer, weights_finite  # noqa: E402

SMALL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_heads_fast=2, chunk_size=16, lact_chunk=16,
             window=16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 on CPU (fla's measure)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kernel_inputs(device, dtype=torch.float32, T=300, seed=0):
    """q, k (unit rows), v, beta, S0 drawn on CPU (the same numbers on every device), then moved; grads on."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(2, 4, T, 64, generator=g), dim=-1)
    k = F.normalize(torch.randn(2, 4, T, 64, generator=g), dim=-1)
    v, beta = torch.randn(2, 4, T, 64, generator=g), torch.rand(2, 4, T, generator=g)
    S0 = torch.randn(2, 4, 64, 64, generator=g)
    return [x.to(device, dtype if x is not S0 else torch.float32).requires_grad_() for x in (q, k, v, beta, S0)]


def outputs_and_grads(kernel, xs, **kw):
    """[o, final state, dq, dk, dv, dbeta, dS0] of a loss touching both outputs."""
    o, S = kernel(*xs[:4], initial_state=xs[4], **kw)
    grads = torch.autograd.grad(o.float().square().sum() + S.square().sum(), xs)
    return [o, S, *grads]


def check_kernel(device, compile_: bool):
    ref = outputs_and_grads(delta_rule_recurrent, kernel_inputs(device))
    chunked = outputs_and_grads(delta_rule_chunked, kernel_inputs(device), chunk_size=64)
    yield "chunked == recurrent, fp32, T=300 (ragged last chunk), outputs and grads", \
        max(rel(a, b) for a, b in zip(chunked, ref)), 1e-4
    low = outputs_and_grads(delta_rule_chunked, kernel_inputs(device, torch.bfloat16), chunk_size=64)
    yield "chunked bf16 inputs vs fp32 recurrence, outputs and final state", \
        max(rel(a, b) for a, b in zip(low[:2], ref[:2])), 2e-2
    if compile_:
        compiled = torch.compile(delta_rule_chunked, fullgraph=True, dynamic=False)
        yield "torch.compile(fullgraph=True) == eager, outputs and grads", \
            compiled_error(compiled, kernel_inputs(device), 64), 1e-4  # bench/kernels.py's own check


def check_models(device):
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(1))
    for mixer in ("deltanet", "lact"):
        torch.manual_seed(0)
        cpu_model = FastWeightLM(ModelConfig(mixer=mixer, **SMALL)).eval()
        model = FastWeightLM(ModelConfig(mixer=mixer, **SMALL)).eval().to(device)
        model.load_state_dict(cpu_model.state_dict())
        with torch.no_grad():
            full = model(tokens.to(device))[0]
            yield f"{mixer}: logits on {device} == logits on cpu", rel(full, cpu_model(tokens)[0]), 1e-4
            logits, _, state = model(tokens[:, :37].to(device))  # prefill, then token by token
            steps = [logits]
            for t in range(37, tokens.shape[1]):
                logits, _, state = model(tokens[:, t:t + 1].to(device), state)
                steps.append(logits)
            yield f"{mixer}: prefill + token-by-token decode == one full pass", rel(torch.cat(steps, 1), full), 1e-4


def head_loss_pair(device, seed: int, bf16: bool = False) -> list[list[torch.Tensor]]:
    """[loss, entropy, d hidden, d weight] of the fused head loss and of the full-logits path, on the same 5000 rows
    (two blocks of CUDA's 4096, twenty of CPU's 256), every ninth without a target; under bf16 autocast if asked."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(5000, 128, generator=g), 0.1 * torch.randn(8193, 128, generator=g)
    targets = torch.randint(0, 8193, (5000,), generator=g)
    targets[::9] = IGNORE
    out = []
    for fn in (head_loss, head_loss_reference):
        h, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, entropy = fn(h, w, targets.to(device), with_entropy=True)
        out.append([loss, entropy, *torch.autograd.grad(loss, (h, w))])
    return out


def check_head_loss(device):
    yield "fused head loss == full logits: loss, entropy, d hidden, d weight", \
        max(rel(a, b) for a, b in zip(*head_loss_pair(device, seed=3))), 1e-5


def check_refine_step(device):
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(2)).to(device)
    for mixer in ("deltanet", "lact"):
        torch.manual_seed(0)
        model = FastWeightLM(ModelConfig(mixer=mixer, **SMALL)).to(device)
        before = [p.detach().clone() for p in model.parameters()]
        start = {name: t.detach().clone() for name, t in model.state_dict().items()}
        optimizer = make_optimizer(model, TrainConfig(lr=1e-3))
        metrics = refine_step(model, optimizer, tokens, RefineConfig(c=4, k=3), make_generator(0, torch.device(device)))
        finite = all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values() if isinstance(v, (int, float)))
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
        ok = finite and weights_finite(model.state_dict()) and moved > 0
        yield f"{mixer}: one REFINE step (generator on {device}): finite metrics and weights, weights moved " \
              f"(max change {moved:.1e})", ok, None
        after = [p.detach().clone() for p in model.parameters()]
        for segment in (0, 32):  # the same start, now with activation checkpointing (whole blocks, 32-token pieces)
            model.load_state_dict(start)
            model.set_checkpointing(True, segment)
            refine_step(model, make_optimizer(model, TrainConfig(lr=1e-3)), tokens, RefineConfig(c=4, k=3),
                        make_generator(0, torch.device(device)))
            yield f"{mixer}: the same REFINE step checkpointed (segment {segment}): same weights after it", \
                max(rel(p.detach(), a) for p, a in zip(model.parameters(), after)), 1e-4


def check_precision(device):
    """bf16 autocast on the device (model.set_precision): what tests/test_precision.py proves on CPU."""
    out = head_loss_pair(device, seed=4, bf16=True)
    yield "bf16 autocast: fused head loss == full logits: loss, entropy, d hidden", \
        max(rel(a, b) for a, b in zip(out[0][:3], out[1][:3])), 1e-3
    yield "bf16 autocast: fused head loss == full logits: d weight (bf16 rounding)", rel(out[0][3], out[1][3]), 1e-2
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(2)).to(device)
    for mixer in ("deltanet", "lact"):
        results = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = FastWeightLM(ModelConfig(mixer=mixer, **SMALL)).to(device)
            model.set_precision(precision)
            with torch.no_grad():
                logits, _, state = model(tokens)
            fp32_state = all(t.dtype == torch.float32 for layer in state.layers for name, t in vars(layer).items()
                             if name in ("S", "w0", "w1", "w2"))
            metrics = refine_step(model, make_optimizer(model, TrainConfig(lr=1e-3)), tokens, RefineConfig(c=4, k=3),
                                  make_generator(0, torch.device(device)))
            results[precision] = (logits, fp32_state, metrics["ntp_loss"])
        (l32, _, ntp32), (l16, fp32_state, ntp16) = results["fp32"], results["bf16"]
        yield f"{mixer}: bf16 logits vs fp32 (states stay fp32: {fp32_state})", \
            rel(l16, l32) if fp32_state else float("inf"), 5e-2
        yield f"{mixer}: bf16 REFINE step's NTP loss vs fp32's", abs(ntp16 / ntp32 - 1), 2e-2


def check_checkpoint(device, folder: Path):
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer="deltanet", **SMALL)).to(device)
    folder.mkdir()
    save_checkpoint(folder / "ckpt.pt", {"model": model.state_dict(), "model_config": asdict(model.cfg)})
    loaded = load_checkpoint(folder, expect_mixer="deltanet")  # map_location="cpu", weights_only=True
    yield f"checkpoint saved on {device} loads on cpu with identical weights", \
        max(rel(loaded["model"][k], v) for k, v in model.state_dict().items()), 0.0


def check_cli(device, folder: Path):
    """The scripts end to end on the device, tiny sizes; each must return normally (and not False)."""
    import eval_niah
    import train
    import tta
    base = ["--device", device]
    runs = [("pretrain", lambda: train.main(["--model", "deltanet", "--regime", "pretrain", "--out",
                                             str(folder / "pre"), "--max-steps", "3", *base])),
            ("pretrain --checkpoint-segment 64 (compiled on CUDA)", lambda: train.main([
                "--model", "deltanet", "--regime", "pretrain", "--out", str(folder / "pre-ckpt"), "--max-steps", "3",
                "--checkpoint-segment", "64", *base])),
            ("pretrain --precision bf16 (compiled on CUDA)", lambda: train.main([
                "--model", "deltanet", "--regime", "pretrain", "--out", str(folder / "pre-bf16"), "--max-steps", "3",
                "--precision", "bf16", *base])),
            ("pretrain --resume of that bf16 run on the CPU, keeping its precision", lambda: train.main([
                "--model", "deltanet", "--regime", "pretrain", "--out", str(folder / "pre-bf16"), "--resume",
                "--max-steps", "4", "--device", "cpu"])["step"] == 4 and json.loads(
                    (folder / "pre-bf16" / "config.json").read_text())["train"]["precision"] == "bf16"),
            ("mid", lambda: train.main(["--model", "deltanet", "--regime", "mid", "--init", str(folder / "pre"),
                                        "--out", str(folder / "mid"), "--max-steps", "2", *base])),
            ("post", lambda: train.main(["--model", "deltanet", "--regime", "post", "--init", str(folder / "pre"),
                                         "--out", str(folder / "post"), "--max-steps", "2", *base])),
            ("tta", lambda: tta.main(["--ckpt", str(folder / "post"), "--task", "s_niah", "--samples", "8", *base])),
            ("eval_niah", lambda: eval_niah.main(["--runs", str(folder), "--samples", "1", "--out",
                                                  str(folder / "eval.json"), *base]))]
    for name, run in runs:
        try:
            ok = run() is not False
        except SystemExit as e:  # the scripts' one-line errors
            ok = e.code == 0
        yield f"cli: {name} on {device}", ok, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Checks of a device path against references (see the docstring).")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    p.add_argument("--cli", action="store_true", help="also run the scripts end to end on the device")
    args = p.parse_args(argv)
    try:  # the scripts' own check: cpu, cuda or an index this machine has (cuda:1 on one GPU is refused here)
        device = str(pick_device(args.device))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        checks = [check_kernel(device, not args.no_compile), check_models(device), check_head_loss(device),
                  check_refine_step(device), check_precision(device), check_checkpoint(device, Path(tmp) / "ckpt")]
        checks += [check_cli(device, Path(tmp) / "cli")] if args.cli else []
        for check in checks:
            try:
                for name, value, tol in check:  # (name, error, limit), or (name, passed, None) for yes/no checks
                    ok = value if tol is None else value <= tol
                    failures += not ok
                    figure = "" if tol is None else f": {value:.1e} (limit {tol:.0e})"
                    print(f"  {'PASS' if ok else 'FAIL'}  {name}{figure}", flush=True)
            except Exception as e:  # a crash fails this group of checks; the others still run
                failures += 1
                print(f"  FAIL  {check.__name__}: {type(e).__name__}: {' '.join(str(e).split())[:200]}", flush=True)
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
