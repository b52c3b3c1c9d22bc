"""Benchmark: what does a training step hold at long context: full logits, the fused head loss, and checkpointing?

The LM head's logits are 64x wider than the model (V = 8193, D = 128). `head_loss.py` computes every training
cross-entropy in row blocks with its gradient in closed form, so the (B, T, V) logits never exist; setting
`model.fused_head = False` takes the plain path (full logits, F.cross_entropy, autograd) through the same code.
What is left is the blocks' own activations: `model.set_checkpointing(True)` (--grad-checkpoint) keeps only each
block's input and recomputes the rest in the backward, and `set_checkpointing(True, S)` (--checkpoint-segment S)
does so on S-token pieces that carry the state, so the backward recomputes one piece of one block at a time.
Measured in one run, on the same random batch, for DeltaNet and LaCT at each --lengths T: the peak tensor memory and
the wall time (median of --reps, interleaved) of one NTP step, one REFINE step (schedule "single") and one REFINE
batch in the minibatch schedule (2 optimizer steps; TTT's) on four paths, each adding one thing to the one before:
  plain   full logits                    fused   + fused head loss      memory plain/fused >= 1.5, time <= 1.1x
  ckpt    + per-block checkpointing      (vs fused)                     memory fused/ckpt  >= 2.0, time <= 1.5x
  pieces  + pieces of --segment tokens   (vs ckpt)                      memory ckpt/pieces >= 1.5, time <= 1.1x
The targets are checked at the longest T. Peak memory is bench/measure.peak_bytes: the profiler's allocation records
on CPU, the allocator's own peak on CUDA, both above what was held before.

    python bench/memory.py              # T = 2048 and 8192, B = 2, pieces of 1024 tokens
    python bench/memory.py --quick      # smoke run: T = 512, 1 repetition
"""
import argparse
import dataclasses
import sys
from math import nan
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import add_step_flags, peak_bytes, step_bench_device, timed  # noqa: E402
from refine_mini.model import FastWeightLM, ModelConfig  # noqa: E402
from refine_mini.refine import RefineConfig, refine_step  # noqa: E402
from refine_mini.trainer import TrainConfig, clip_and_step, make_optimizer, ntp_loss_from_hidden  # noqa: E402

PATHS = ("plain", "fused", "ckpt", "pieces")  # each adds one thing to the one before it
# (what the later path adds, earlier path, later path, memory target earlier/later, time target later/earlier)
STEPS = (("fused head loss", "plain", "fused", 1.5, 1.1), ("checkpointing", "fused", "ckpt", 2.0, 1.5),
         ("pieces", "ckpt", "pieces", 1.5, 1.1))
MiB = 2 ** 20


def steps(model, tokens: torch.Tensor, cfg: RefineConfig) -> dict:
    """The optimizer steps measured: one NTP step (regimes.ntp_step's loss), one REFINE step ("single" schedule:
    the mid/post default) and one REFINE batch in the "minibatch" schedule with 2 mini-batches (test-time training's:
    a no-grad rollout pass over the batch, then one grad pass per mini-batch)."""
    optimizer = make_optimizer(model, TrainConfig(lr=1e-6))  # a tiny LR: the weights barely move between calls
    minibatch = dataclasses.replace(cfg, schedule="minibatch", minibatches=2)

    def ntp():
        ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens).backward()
        clip_and_step(model, optimizer, 1.0)

    def refine(schedule_cfg):
        return lambda: refine_step(model, optimizer, tokens, schedule_cfg,
                                   torch.Generator(device=tokens.device).manual_seed(0))  # the same draws every call

    return {"NTP step": ntp, "REFINE step": refine(cfg), "REFINE mb": refine(minibatch)}


def bench_one(mixer: str, device: torch.device, seq_len: int, args) -> list[tuple]:
    """[(step name, {path: peak bytes}, {path: seconds})] for one mixer and length."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer)).to(device)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, seq_len),
                           generator=torch.Generator().manual_seed(0)).to(device)  # (B, T)
    settings = {"plain": (False, False, 0), "fused": (True, False, 0), "ckpt": (True, True, 0),
                "pieces": (True, True, args.segment)}  # (fused_head, grad_checkpoint, checkpoint_segment)
    rows = []
    for name, fn in steps(model, tokens, RefineConfig(c=args.c, k=args.k)).items():
        def on_path(fused, ckpt, segment, fn=fn):
            def call():
                model.fused_head = fused
                model.set_checkpointing(ckpt, segment)
                fn()
            return call
        paths = {path: on_path(*settings[path]) for path in PATHS}
        times = timed(paths, args.reps)  # one warm-up call each, then interleaved
        peaks = {path: peak_bytes(call, device) for path, call in paths.items()}
        rows.append((name, peaks, times))
    return rows


def verdict(ratio: float, target: float, at_least: bool) -> str:
    return "PASS" if (ratio >= target if at_least else ratio <= target) else "MISS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=512, 1 repetition")
    add_step_flags(parser, lengths=[2048, 8192], batch=2)
    parser.add_argument("--segment", type=int, default=1024,
                        help="tokens per checkpointed piece on the 'pieces' path (a multiple of 128)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.reps = [512], 1
    device = step_bench_device(args, [f"--segment must be a positive multiple of 128 (both models' chunks), got "
                                      f"{args.segment}"] if args.segment < 1 or args.segment % 128 else [])
    if device is None:
        return 2
    print(f"torch {torch.__version__}, device {device.type}, CPU threads {torch.get_num_threads()}, B={args.batch} "
          f"c={args.c} k={args.k}, default ModelConfig; peak tensor memory above the model and optimizer state")
    results = [(mixer, seq_len, *row) for mixer in args.mixers.split(",") for seq_len in args.lengths
               for row in bench_one(mixer, device, seq_len, args)]
    for title, unit, values in (("peak MiB", MiB, lambda row: row[3]), ("time ms", 1e-3, lambda row: row[4])):
        ratios = [f"{a[0]}/{b[0]}" if title.startswith("peak") else f"{b[0]}/{a[0]}" for _, a, b, _, _ in STEPS]
        print(f"{title} ({', '.join(PATHS)}: each adds one thing; pieces of {args.segment} tokens)")
        print(f"{'model':8s} {'T':>6s}  {'step':11s}" + "".join(f" {p:>8s}" for p in PATHS)
              + "".join(f" {r:>6s}" for r in ratios))
        for row in results:
            v = values(row)
            if not all(v.values()):
                print(f"{row[0]:8s} {row[1]:6d}  {row[2]:11s} n/a (no allocation records)")
                continue
            cells = [v[a] / v[b] if title.startswith("peak") else v[b] / v[a] for _, a, b, _, _ in STEPS]
            print(f"{row[0]:8s} {row[1]:6d}  {row[2]:11s}" + "".join(f" {v[p] / unit:8.1f}" for p in PATHS)
                  + "".join(f" {c:5.2f}x" for c in cells), flush=True)
    print("targets at the longest T (memory: earlier / later path; time: later / earlier):")
    for mixer, seq_len, step, peak, t in results:
        if seq_len != max(args.lengths):
            continue
        for what, a, b, mem_target, time_target in STEPS:
            less = peak[a] / peak[b] if peak[a] and peak[b] else nan
            slower = t[b] / t[a]
            print(f"  {mixer:8s} {step:11s} T={seq_len:<6d} {what:16s} memory {less:5.2f}x (>= {mem_target}) "
                  f"{verdict(less, mem_target, True)}, time {slower:4.2f}x (<= {time_target}) "
                  f"{verdict(slower, time_target, False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
