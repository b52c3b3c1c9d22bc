"""Benchmark: what does a training step hold at long context: full logits, the fused head loss, and checkpointing?

The LM head's logits are 64x wider than the model (V = 8193, D = 128). `head_loss.py` computes every training
cross-entropy in row blocks with its gradient in closed form, so the (B, T, V) logits never exist; setting
`model.fused_head = False` takes the plain path (full logits, F.cross_entropy, autograd) through the same code.
What is left is the blocks' own activations; `model.grad_checkpoint = True` (train.py/tta.py --grad-checkpoint)
keeps only each block's input and recomputes the rest in the backward.
Measured in one run, on the same random batch, for DeltaNet and LaCT at each --lengths T, for three paths
(plain: full logits; fused: fused head loss; ckpt: fused head loss + activation checkpointing):
  peak tensor memory of one NTP step and one REFINE step (schedule "single"), plain / fused     target >= 1.5
  wall time of the same steps, fused / plain (median of --reps, interleaved)                    target <= 1.1
  peak tensor memory, fused / ckpt                                                             target >= 2.0
  wall time, ckpt / fused (the price of the recomputed forward)                                target <= 1.5
The targets are checked at the longest T. Peak memory is bench/measure.peak_bytes: the profiler's allocation records
on CPU, the allocator's own peak on CUDA, both above what was held before.

    python bench/memory.py              # T = 2048 and 8192, B = 2
    python bench/memory.py --quick      # smoke run: T = 512, 1 repetition
"""
import argparse
import sys
from math import nan
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import peak_bytes, timed  # noqa: E402
from refine_mini.common import keep_freed_memory  # noqa: E402
from refine_mini.model import FastWeightLM, ModelConfig  # noqa: E402
from refine_mini.refine import RefineConfig, refine_step  # noqa: E402
from refine_mini.trainer import TrainConfig, clip_and_step, make_optimizer, ntp_loss_from_hidden  # noqa: E402

MEMORY_TARGET, TIME_TARGET = 1.5, 1.1  # fused head loss against full logits
CKPT_MEMORY_TARGET, CKPT_TIME_TARGET = 2.0, 1.5  # checkpointing against the fused path alone
PATHS = {"plain": (False, False), "fused": (True, False), "ckpt": (True, True)}  # (fused_head, grad_checkpoint)
MiB = 2 ** 20


def steps(model, tokens: torch.Tensor, cfg: RefineConfig) -> dict:
    """The two optimizer steps measured: one NTP step (regimes.ntp_step's loss) and one REFINE step."""
    optimizer = make_optimizer(model, TrainConfig(lr=1e-6))  # a tiny LR: the weights barely move between calls
    gen = torch.Generator(device=tokens.device).manual_seed(0)

    def ntp():
        ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens).backward()
        clip_and_step(model, optimizer, 1.0)

    def refine():
        refine_step(model, optimizer, tokens, cfg, gen)

    return {"NTP step": ntp, "REFINE step": refine}


def bench_one(mixer: str, device: torch.device, seq_len: int, args) -> list[tuple]:
    """[(step name, {path: peak bytes}, {path: seconds})] for one mixer and length."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer)).to(device)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, seq_len),
                           generator=torch.Generator().manual_seed(0)).to(device)  # (B, T)
    rows = []
    for name, fn in steps(model, tokens, RefineConfig(c=args.c, k=args.k)).items():
        def on_path(fused, ckpt, fn=fn):
            def call():
                model.fused_head, model.grad_checkpoint = fused, ckpt
                fn()
            return call
        paths = {path: on_path(*flags) for path, flags in PATHS.items()}
        times = timed(paths, args.reps)  # one warm-up call each, then interleaved
        peaks = {path: peak_bytes(call, device) for path, call in paths.items()}
        rows.append((name, peaks, times))
    model.fused_head, model.grad_checkpoint = True, False
    return rows


def verdict(ratio: float, target: float, at_least: bool) -> str:
    return "PASS" if (ratio >= target if at_least else ratio <= target) else "MISS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=512, 1 repetition")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="tokens per document T")
    parser.add_argument("--batch", type=int, default=2, help="documents per batch B")
    parser.add_argument("--c", type=int, default=8, help="chunks (selected positions) per document")
    parser.add_argument("--k", type=int, default=5, help="rollout length")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--mixers", default="deltanet,lact", help="comma-separated mixers to bench")
    parser.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda if present)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.reps = [512], 1
    bad = [f"--{name} must be >= 1, got {getattr(args, name)}" for name in ("batch", "c", "k", "reps")
           if getattr(args, name) < 1]
    bad += [f"--lengths {t} leaves no room for --c {args.c} chunks with a {args.k}-token rollout each"
            for t in args.lengths if t < args.c * (args.k + 2)]
    bad += [f"unknown mixer {m!r} in --mixers; use deltanet, lact" for m in args.mixers.split(",")
            if m not in ("deltanet", "lact")]
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bad += [f"unknown or unavailable device {name!r}; use cpu or cuda"] \
        if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()) else []
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()  # as train.py: freed blocks stay in the process (peak tensor memory is unaffected)
    print(f"torch {torch.__version__}, device {device.type}, CPU threads {torch.get_num_threads()}, B={args.batch} "
          f"c={args.c} k={args.k}, default ModelConfig; peak tensor memory above the model and optimizer state")
    print(f"{'model':8s} {'T':>6s}  {'step':11s} {'plain MiB':>10s} {'fused MiB':>10s} {'ckpt MiB':>9s} {'less':>6s}"
          f" {'less':>6s} {'plain ms':>9s} {'fused ms':>9s} {'ckpt ms':>8s} {'time':>6s} {'time':>6s}")
    print(f"{'':36s}{'':>21s}{'p/f':>6s} {'f/c':>6s} {'':>28s}{'f/p':>6s} {'c/f':>6s}")
    verdicts = []
    for mixer in args.mixers.split(","):
        for seq_len in args.lengths:
            for step, peak, t in bench_one(mixer, device, seq_len, args):
                known = all(peak.values())
                less = (peak["plain"] / peak["fused"], peak["fused"] / peak["ckpt"]) if known else (nan, nan)
                mem = (f"{peak['plain'] / MiB:10.1f} {peak['fused'] / MiB:10.1f} {peak['ckpt'] / MiB:9.1f}" if known
                       else f"{'n/a':>10s} {'n/a':>10s} {'n/a':>9s}")
                slower = (t["fused"] / t["plain"], t["ckpt"] / t["fused"])
                print(f"{mixer:8s} {seq_len:6d}  {step:11s} {mem} {less[0]:5.2f}x {less[1]:5.2f}x "
                      f"{t['plain'] * 1e3:9.1f} {t['fused'] * 1e3:9.1f} {t['ckpt'] * 1e3:8.1f} "
                      f"{slower[0]:5.2f}x {slower[1]:5.2f}x", flush=True)
                if seq_len == max(args.lengths):
                    verdicts.append((f"{mixer} {step} at T={seq_len}", less, slower))
    print("targets at the longest T:")
    for what, less, slower in verdicts:
        print(f"  {what:30s} fused head: memory plain/fused {less[0]:5.2f}x (>= {MEMORY_TARGET}) "
              f"{verdict(less[0], MEMORY_TARGET, True)}, time fused/plain {slower[0]:4.2f}x (<= {TIME_TARGET}) "
              f"{verdict(slower[0], TIME_TARGET, False)}")
        print(f"  {'':30s} checkpointing: memory fused/ckpt {less[1]:5.2f}x (>= {CKPT_MEMORY_TARGET}) "
              f"{verdict(less[1], CKPT_MEMORY_TARGET, True)}, time ckpt/fused {slower[1]:4.2f}x "
              f"(<= {CKPT_TIME_TARGET}) {verdict(slower[1], CKPT_TIME_TARGET, False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
