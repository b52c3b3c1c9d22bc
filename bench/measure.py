"""Measuring helpers for the bench scripts: wall-time medians (interleaved and back to back), the peak tensor memory of
a call (CPU and CUDA), the oneDNN matmul rate beside MKL's, and the flags of the training-step benches.

Question answered: how do we time and size a kernel fairly on a shared, noisy machine, in one run?
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from refine_mini.common import keep_freed_memory


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall time (s) per callable, the callables interleaved round-robin."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def back_to_back(fns: dict, rounds: int = 3) -> dict:
    """Median over `rounds` of each callable's back-to-back median (`timed` on it alone, after warm-up); the blocks
    alternate, so a slow phase of the machine hits every callable. fns: name -> (callable, repeats per block)."""
    blocks = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (f, repeats) in fns.items():
            blocks[name].append(timed({name: f}, repeats, warmup=2 if repeats > 3 else 1)[name])  # 1: the slow ones
    return {name: statistics.median(ts) for name, ts in blocks.items()}


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 to /dev/null for the block: Kineto (the profiler's C++ side) prints a 'USDT ...
    profiler_start/stop' line there on every profile, which Python's sys.stderr cannot catch."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def cpu_peak_bytes(fn) -> int | None:
    """Peak bytes of CPU tensor memory held, above what was held before, while fn() runs: the running sum of the
    allocations and frees that the profiler records (profile_memory=True), in time order. CPU has no counterpart of
    torch.cuda.max_memory_allocated. None where this PyTorch's profiler does not expose its event tree (private)."""
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    except AttributeError:
        return None
    allocs = sorted((n for n in nodes if hasattr(n.extra_fields, "alloc_size")), key=lambda n: n.start_time_ns)
    live = peak = 0
    for n in allocs:                                                    # a free is a negative alloc_size
        live += n.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device) -> int | None:
    """Peak bytes of tensor memory held while fn() runs, above what was held before it: on CUDA the allocator's
    own peak, elsewhere cpu_peak_bytes."""
    if torch.device(device).type != "cuda":
        return cpu_peak_bytes(fn)
    sync()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync()
    return torch.cuda.max_memory_allocated(device) - base


def onednn_rate(a: torch.Tensor) -> float | None:
    """FLOP rate of the same fp32 product a @ a through oneDNN (PyTorch's mkldnn backend) instead of MKL, the BLAS
    that torch.matmul and torch.bmm call on CPU; None where it is unavailable. A diagnostic only: on some CPUs MKL
    runs a slower code path than the cores allow (measured: 2x on a 2-core EPYC), and oneDNN shows what they allow.
    Uses a private entry point (torch._C._nn.mkldnn_linear); the kernels never call it."""
    try:
        am, wm = a.to_mkldnn(), a.t().contiguous().to_mkldnn()          # mkldnn_linear computes x wᵀ
        t = timed({"dnn": lambda: torch._C._nn.mkldnn_linear(am, wm)}, 6, warmup=2)["dnn"]
    except (RuntimeError, AttributeError):
        return None
    return 2 * a.shape[0] ** 3 / t


def add_step_flags(parser: argparse.ArgumentParser, lengths: list[int], batch: int) -> None:
    """The flags of the training-step benches (memory.py, precision.py): lengths, batch, c, k, reps, mixers, device."""
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths, help="tokens per document T")
    parser.add_argument("--batch", type=int, default=batch, help="documents per batch B")
    parser.add_argument("--c", type=int, default=8, help="chunks (selected positions) per document")
    parser.add_argument("--k", type=int, default=5, help="rollout length")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--mixers", default="deltanet,lact", help="comma-separated mixers to bench")
    parser.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda if present)")


def step_bench_device(args, more_errors=()) -> torch.device | None:
    """The device add_step_flags' flags ask for, with freed memory kept in the process on CPU (as train.py); or None,
    after printing the first thing wrong with them (or in `more_errors`) as one line on stderr."""
    bad = [f"--{name} must be >= 1, got {getattr(args, name)}" for name in ("batch", "c", "k", "reps")
           if getattr(args, name) < 1]
    bad += [f"--lengths {t} leaves no room for --c {args.c} chunks with a {args.k}-token rollout each"
            for t in args.lengths if t < args.c * (args.k + 2)]
    bad += [f"unknown mixer {m!r} in --mixers; use deltanet, lact" for m in args.mixers.split(",")
            if m not in ("deltanet", "lact")]
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bad += [f"unknown or unavailable device {name!r}; use cpu or cuda"] \
        if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()) else []
    bad += list(more_errors)
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return None
    if name == "cpu":
        keep_freed_memory()  # freed blocks stay in the process (peak tensor memory is unaffected)
    return torch.device(name)
