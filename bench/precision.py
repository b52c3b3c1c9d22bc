"""Benchmark: what does bf16 autocast (--precision bf16, the paper's setting) buy a training step here?

`model.set_precision("bf16")` runs every FastWeightLM entry point under bf16 autocast over the fp32 weights: the
projections, MLPs and the LM head's matmuls in bf16, the fast-weight kernels, softmaxes, losses and states in fp32
(refine_mini/model.py). Measured in one run, on the same random batch, for DeltaNet and LaCT at each --lengths T:
the wall time (median of --reps, the two precisions interleaved) and the peak tensor memory of one NTP step, one
REFINE step (schedule "single", mid/post's) and one REFINE batch in the minibatch schedule (TTT's), in fp32 and bf16,
with the ratios fp32 / bf16 (> 1: bf16 is faster or smaller), and the NTP loss of the first step in both.
Beside them, the rate of a 2048 x 2048 matmul in fp32 and in bf16 on this machine: bf16 can only pay where its
matmuls are faster (CPUs with AMX or AVX512-BF16, recent GPUs); elsewhere they are converted, not sped up.
No target is set: the ratios say what the switch buys on the machine at hand.

    python bench/precision.py              # T = 512 and 2048, B = 4
    python bench/precision.py --quick      # smoke run: T = 256, 1 repetition
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import add_step_flags, peak_bytes, step_bench_device, timed  # noqa: E402
from bench.memory import steps  # noqa: E402
from refine_mini.common import PRECISIONS  # noqa: E402
from refine_mini.model import FastWeightLM, ModelConfig  # noqa: E402
from refine_mini.refine import RefineConfig  # noqa: E402
from refine_mini.trainer import ntp_loss_from_hidden  # noqa: E402

MiB = 2 ** 20


def matmul_rates(device: torch.device) -> dict:
    """FLOP/s of a 2048 x 2048 product in each precision (the bf16 one under autocast, as the model runs it)."""
    a = torch.randn(2048, 2048, device=device)
    rates = {}
    for precision in PRECISIONS:
        def product(precision=precision):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return a @ a
        rates[precision] = 2 * 2048 ** 3 / timed({precision: product}, 6, warmup=2)[precision]
    return rates


def bench_one(mixer: str, device: torch.device, seq_len: int, args) -> tuple[list[tuple], dict]:
    """([(step name, {precision: seconds}, {precision: peak bytes})], {precision: NTP loss before any step}) for one
    mixer and length."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer)).to(device)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, seq_len),
                           generator=torch.Generator().manual_seed(0)).to(device)  # (B, T)
    losses = {}
    for precision in PRECISIONS:
        model.set_precision(precision)
        with torch.no_grad():
            losses[precision] = float(ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens))
    rows = []
    for name, fn in steps(model, tokens, RefineConfig(c=args.c, k=args.k)).items():
        def in_precision(precision, fn=fn):
            def call():
                model.set_precision(precision)
                fn()
            return call
        calls = {precision: in_precision(precision) for precision in PRECISIONS}
        times = timed(calls, args.reps)  # one warm-up call each, then interleaved
        peaks = {precision: peak_bytes(call, device) for precision, call in calls.items()}
        rows.append((name, times, peaks))
    return rows, losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=256, 1 repetition")
    add_step_flags(parser, lengths=[512, 2048], batch=4)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.reps = [256], 1
    device = step_bench_device(args)
    if device is None:
        return 2
    rates = matmul_rates(device)
    print(f"torch {torch.__version__}, device {device.type}, CPU threads {torch.get_num_threads()}, B={args.batch} "
          f"c={args.c} k={args.k}, default ModelConfig; 2048^2 matmul: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s ({rates['bf16'] / rates['fp32']:.2f}x)")
    print(f"{'model':8s} {'T':>6s}  {'step':11s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'speed':>6s}"
          f" {'fp32 MiB':>9s} {'bf16 MiB':>9s} {'memory':>6s}")
    for mixer in args.mixers.split(","):
        for seq_len in args.lengths:
            rows, losses = bench_one(mixer, device, seq_len, args)
            for step, t, peak in rows:
                memory = (f" {peak['fp32'] / MiB:9.1f} {peak['bf16'] / MiB:9.1f} {peak['fp32'] / peak['bf16']:5.2f}x"
                          if peak["fp32"] and peak["bf16"] else "  n/a (no allocation records)")
                print(f"{mixer:8s} {seq_len:6d}  {step:11s} {t['fp32'] * 1e3:9.1f} {t['bf16'] * 1e3:9.1f}"
                      f" {t['fp32'] / t['bf16']:5.2f}x" + memory, flush=True)
            print(f"{mixer:8s} {seq_len:6d}  NTP loss before training: fp32 {losses['fp32']:.6f}, "
                  f"bf16 {losses['bf16']:.6f} (relative difference {abs(losses['bf16'] / losses['fp32'] - 1):.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
