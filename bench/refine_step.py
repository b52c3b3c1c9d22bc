"""Benchmark: what does a REFINE step cost next to an NTP step, and what do forked prefix states save?

Measured in one run, for DeltaNet and LaCT (CPU, and CUDA when available), on the same random batch:
  1) REFINE optimizer step (refine_step, fast path, schedule "single") / NTP optimizer step   target <= 1.5
  2) rollout phase, re-encoded prefixes (official: every prefix encoded from scratch by `generate`, then a second
     from-scratch forward over [prefix; rollout] for old log-probs and h_pred)
     / rollout phase with forked states (one no-grad batched pass over the documents, prefix snapshots rebuilt
     from it, then ONE batched decode: the "minibatch" schedule's rollout phase)                  target >= 8
     The line below it times what the default "single" schedule pays: sampling from the snapshots of the
     training forward it runs anyway (no prefix pass of its own).
Times are medians over --reps repetitions after one warm-up. Defaults: T=2048, B=2, c=8, k=5, default ModelConfig.

    python bench/refine_step.py            # full
    python bench/refine_step.py --quick    # smoke run: T=256, 1 repetition
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refine_mini.common import keep_freed_memory  # noqa: E402
from refine_mini.model import FastWeightLM, ModelConfig  # noqa: E402
from refine_mini.refine import RefineConfig, refine_step  # noqa: E402
from refine_mini.rollout import document_forward, rollouts_forked, rollouts_reference, sample_rollouts  # noqa: E402
from refine_mini.selection import pad_documents, select_positions, teacher_forced_pass  # noqa: E402
from refine_mini.trainer import TrainConfig, clip_and_step, make_optimizer, ntp_loss_from_hidden  # noqa: E402

STEP_TARGET, ROLLOUT_TARGET = 1.5, 8.0


def timed(fns: dict, device, reps: int) -> dict:
    """Median wall time of each fn() over reps calls, the callables interleaved round-robin after one warm-up call
    each, so that background load and allocator state hit them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_one(mixer: str, device: torch.device, args) -> list[str]:
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer)).to(device)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5))  # tiny LR: the weights barely move between reps
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    cfg = RefineConfig(c=args.c, k=args.k)
    gen = torch.Generator(device=device).manual_seed(0)

    def ntp_step():
        optimizer.zero_grad(set_to_none=True)
        loss = ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens)  # as regimes.ntp_step
        loss.backward()
        clip_and_step(model, optimizer, 1.0)

    t = timed({"ntp": ntp_step, "refine": lambda: refine_step(model, optimizer, tokens, cfg, gen)}, device, args.reps)
    t_ntp, t_refine = t["ntp"], t["refine"]

    docs = list(tokens.unbind(0))
    padded, lengths = pad_documents(docs)
    entropy, _ = teacher_forced_pass(model, padded)
    positions = select_positions(entropy, lengths.to(device), cfg.c, cfg.k, generator=gen).positions
    train_fwd = document_forward(model, docs, positions)  # the training forward refine_step runs anyway (grad)
    t = timed({"forked": lambda: rollouts_forked(model, docs, positions, cfg.k, 1, gen),
               "in_step": lambda: sample_rollouts(model, train_fwd, positions, cfg.k, 1, gen),
               "reencode": lambda: rollouts_reference(model, docs, positions, cfg.k, 1, gen)}, device,
              max(1, args.reps // 2))
    t_forked, t_reencode, t_in_step = t["forked"], t["reencode"], t["in_step"]

    step_ratio, rollout_ratio = t_refine / t_ntp, t_reencode / t_forked
    tag = f"{mixer:8s} {device.type:4s} T={args.seq_len} B={args.batch} c={cfg.c} k={cfg.k}"
    return [
        f"{tag}  REFINE step {t_refine * 1e3:9.1f} ms / NTP step {t_ntp * 1e3:9.1f} ms = {step_ratio:5.2f}x"
        f"  (target <= {STEP_TARGET})  {'PASS' if step_ratio <= STEP_TARGET else 'MISS'}",
        f"{tag}  rollouts re-encoded {t_reencode * 1e3:9.1f} ms / forked {t_forked * 1e3:9.1f} ms = "
        f"{rollout_ratio:5.2f}x  (target >= {ROLLOUT_TARGET})  {'PASS' if rollout_ratio >= ROLLOUT_TARGET else 'MISS'}",
        f"{tag}  (inside refine_step, states taken from the training forward: sampling {t_in_step * 1e3:7.1f} ms, "
        f"{t_reencode / t_in_step:5.1f}x fewer than re-encoding)",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=256, 1 repetition")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per document T")
    parser.add_argument("--batch", type=int, default=2, help="documents per batch B")
    parser.add_argument("--c", type=int, default=8, help="chunks (selected positions) per document")
    parser.add_argument("--k", type=int, default=5, help="rollout length")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--mixers", default="deltanet,lact", help="comma-separated mixers to bench")
    parser.add_argument("--devices", default="auto",
                        help="comma-separated: cpu, cuda (auto: cpu, plus cuda if present)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave malloc as it is (default: keep freed memory, as train.py does on CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.reps = 256, 1
    bad = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
           for name in ("seq_len", "batch", "c", "k", "reps") if getattr(args, name) < 1]
    bad += [f"--threads must be >= 0, got {args.threads}"] if args.threads < 0 else []
    bad += [f"unknown mixer {m!r} in --mixers; use deltanet, lact" for m in args.mixers.split(",")
            if m not in ("deltanet", "lact")]
    names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")
    bad += [f"unknown or unavailable device {d!r} in --devices; use cpu or cuda" for d in names
            if d not in ("cpu", "cuda") or (d == "cuda" and not torch.cuda.is_available())]
    bad += [f"--seq-len {args.seq_len} leaves no room for --c {args.c} chunks with a {args.k}-token rollout each"]\
        if args.seq_len < args.c * (args.k + 2) else []
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in names]
    kept = not args.glibc_default and "cpu" in names and keep_freed_memory()
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, devices {[d.type for d in devices]}, "
          f"malloc {'keeps freed memory (as train.py)' if kept else 'as the C library does by default'}")
    if args.quick:
        print("quick smoke run: the targets are set for T=2048; at small T per-call overheads dominate")
    try:
        for device in devices:
            for mixer in args.mixers.split(","):
                for line in bench_one(mixer, device, args):
                    print(line, flush=True)
    except ValueError as e:  # a combination of flags the REFINE step cannot take
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
