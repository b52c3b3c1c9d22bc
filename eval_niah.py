"""Needle-in-a-haystack evaluation: recall by context length x needle depth, for one or more checkpoints.

    python eval_niah.py                                   # every run under runs/, quick grid (seconds per run)
    python eval_niah.py --ckpt runs/deltanet-pretrain runs/deltanet-mid      # compared side by side
    python eval_niah.py --tasks s_niah mk_niah --lengths 512 1024 --depths 0 0.5 1 --samples 8
    python eval_niah.py --full --plot niah.png            # larger grid, plus a PNG (needs: pip install matplotlib)

Protocol: method.md §6 (RULER NIAH and QA: greedy decoding, first line of the output, recall / substring match);
the scaled-down grid and the deviations are listed in refine_mini/evaluate.py.

What runs:
- Without --tasks: S-NIAH on the whole grid (rows = context lengths, columns = needle depths), plus MK/MV/MQ-NIAH,
  QA and 2-hop QA at one point (the middle length, depth 0.5), as a quick summary.
- With --tasks: exactly those tasks, each on the whole grid.
- Lengths default to T/2, T, 2T (--full: T/4 .. 8T), T = the longest training seq_len among the runs (512 if none is
  stored); depths 0, .25, .5, .75, 1 (--full: 0, .1, .., 1); --samples per cell (default 4, --full 8); NIAH
  haystack "noise" (--full: "noise" and "essay"; RULER uses the first in niah_single_1, essays in most others).
- Cost: the quick grid of the default DeltaNet (d_model 128, 4 layers, T = 512) takes ~3 s on 2 CPU cores (5 s with
  start-up); 20 samples per cell on two haystacks, S-NIAH only, ~20 s.

Output: a heatmap per run and task (ANSI colours on a terminal; --no-color or NO_COLOR=1 for plain text), a summary
table with the runs side by side, and a JSON file (--out; default next to the run, or runs/eval_niah.json for several
runs) with every cell, the recurrent-state size per length and the peak memory. The JSON is written atomically at the
end, so an interrupted or failed evaluation never damages a previous results file, and before the report is printed
(with the PNG), so a reader that stops early (`| head`) costs nothing.

--plot FILE.png needs matplotlib (optional): without it the script stops *before* evaluating, with a one-line
"pip install matplotlib" hint and exit status 2. Bad input (unknown task, non-positive length, depth outside [0, 1],
missing / corrupted checkpoint, a run folder without ckpt.pt) is a one-line error with exit status 2.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from refine_mini.common import (PRECISIONS, CheckpointError, fail, keep_freed_memory, out_of_memory, pick_device,
                                set_seed, write_atomic)
from refine_mini.evaluate import (TASK_NAMES, check_grid, check_plot_path, check_results_path, default_depths,
                                  default_lengths, eval_row, find_runs, load_run, peak_memory, reset_peak_memory)
from refine_mini.heatmap import render_heatmap, render_table, require_matplotlib, save_png, use_color

GRID_TASK = "s_niah"  # the heatmap task of the default plan
POINT_DEPTH = 0.5  # depth of the one-point summary tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", help="checkpoints or run folders (default: every run under --runs)")
    p.add_argument("--runs", default="runs", help="where to look for run folders when --ckpt is not given")
    p.add_argument("--tasks", nargs="+", help=f"tasks on the full grid ({', '.join(TASK_NAMES)}); "
                                              f"default: {GRID_TASK} on the grid + the others at one point")
    p.add_argument("--haystack", nargs="+", help="NIAH filler: noise and/or essay (default noise; --full both)")
    p.add_argument("--lengths", nargs="+", help="context lengths in tokens (default: around the training length)")
    p.add_argument("--depths", nargs="+", help="needle depths in [0, 1] (default 0 .25 .5 .75 1)")
    p.add_argument("--samples", type=int, help="samples per cell (default 4, --full 8)")
    p.add_argument("--full", action="store_true", help="larger grid: 6 lengths x 11 depths x 8 samples x 2 haystacks "
                                                       "(~15 min on 2 CPU cores for the default model)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--seed", type=int, default=0, help="drives the task generators (decoding is greedy)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast over the fp32 weights (FastWeightLM.set_precision)")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="tokens (summed over the batch) per prefill "
                                                                     "segment: bounds the prefill logits' memory")
    p.add_argument("--batch", type=int, default=32, help="at most this many sequences decoded together")
    p.add_argument("--out", help="results JSON (default: <run>/eval_niah.json, or <runs>/eval_niah.json)")
    p.add_argument("--plot", help="also save the heatmaps as a PNG (needs matplotlib)")
    p.add_argument("--no-color", action="store_true", help="plain-text heatmaps (also: NO_COLOR=1)")
    return p


def _numbers(values, kind, name):
    """['256,512', '1024'] -> [256, 512, 1024]; a bad number is a one-line error (exit 2)."""
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(kind(part))
                except ValueError:
                    fail(f"--{name}: {part!r} is not a number")
    if not out:
        fail(f"--{name} needs at least one value")
    return out


def resolve_runs(args, device) -> list:
    paths = [Path(p) for p in args.ckpt] if args.ckpt else find_runs(args.runs)
    if not paths:
        fail(f"no runs with a ckpt.pt under {args.runs}/; make one with: "
             "python train.py --model deltanet --regime pretrain   (or pass --ckpt PATH)")
    runs, seen = [], set()
    for path in paths:
        try:
            same = (path / "ckpt.pt" if path.is_dir() else path).resolve()  # run/, run/ckpt.pt, a link: one file
        except (OSError, RuntimeError):  # a link loop or a name too long: load_run's checkpoint error names it
            same = path
        if same in seen:
            print(f"note: {path} names a checkpoint already listed; it is evaluated once", file=sys.stderr)
            continue
        seen.add(same)
        try:
            folder_of_runs = path.is_dir() and not (path / "ckpt.pt").is_file()
        except OSError:  # a name too long, say: load_run's checkpoint error names it
            folder_of_runs = False
        if folder_of_runs:
            inside = find_runs(path)  # a folder of runs (runs/ itself): --runs is the flag for that
            fail(f"{path} is a folder of {len(inside)} run(s); evaluate them all with --runs {path}" if inside else
                 f"run folder {path} holds no ckpt.pt (train it first, or pass the checkpoint file)")
        try:
            runs.append(load_run(path, device))
        except CheckpointError as e:
            fail(str(e))
        runs[-1].model.set_precision(args.precision)
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # two runs with the same folder name get their index appended
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i}"
    return runs


def make_plan(args, runs) -> tuple[list[dict], dict]:
    """-> (plan: [{task, haystack, lengths, depths}], the grid) after validating every value."""
    seq_len = max((r.meta["seq_len"] or 0) for r in runs) or None
    lengths = _numbers(args.lengths, int, "lengths") if args.lengths else default_lengths(seq_len, args.full)
    depths = _numbers(args.depths, float, "depths") if args.depths else default_depths(args.full)
    samples = args.samples if args.samples is not None else (8 if args.full else 4)
    args.haystack = args.haystack or (["noise", "essay"] if args.full else ["noise"])
    lengths, depths = sorted(set(lengths)), sorted(set(depths))
    grid_tasks = list(dict.fromkeys(args.tasks or [GRID_TASK]))
    point_tasks = [] if args.tasks else [t for t in TASK_NAMES if t != GRID_TASK]
    point_length = lengths[len(lengths) // 2]  # the middle length (the training length T for the quick grid, T >= 256)
    try:
        check_grid(grid_tasks, lengths, depths, samples, args.haystack)
        try:
            check_grid(point_tasks, [point_length], [POINT_DEPTH], samples, args.haystack)
        except ValueError as e:  # tasks the user did not name: say where they come from and how to leave them out
            raise ValueError(f"{e} (a one-point summary task of the default plan, run at the middle --lengths value; "
                             f"--tasks {' '.join(grid_tasks)} runs the grid alone)") from None
        if min(args.prefill_tokens, args.batch) < 1:
            raise ValueError("--prefill-tokens and --batch must be >= 1")
    except ValueError as e:
        fail(str(e))
    plan = []
    for task in grid_tasks + point_tasks:
        haystacks = args.haystack if task.endswith("niah") else ["noise"]  # QA has its own filler
        for h in dict.fromkeys(haystacks):
            on_grid = task in grid_tasks
            plan.append({"task": task, "haystack": h, "label": task if h == "noise" else f"{task}[{h}]",
                         "lengths": lengths if on_grid else [point_length],
                         "depths": depths if on_grid else [POINT_DEPTH]})
    grid = {"lengths": lengths, "depths": depths, "samples": samples, "grid_tasks": grid_tasks,
            "point_tasks": point_tasks, "point": [point_length, POINT_DEPTH], "haystacks": args.haystack}
    return plan, grid


def evaluate_run(run, plan, grid, args, device) -> tuple[list[dict], dict]:
    """Every cell of the plan for one run, longest context last; memory is recorded per length."""
    t0 = time.perf_counter()
    cells, memory = [], {}
    lengths = sorted({n for item in plan for n in item["lengths"]})
    bar = tqdm(total=sum(len(i["lengths"]) * len(i["depths"]) for i in plan), desc=run.name, leave=False)
    for length in lengths:
        reset_peak_memory(device)
        state_sizes = set()
        for item in plan:
            if length not in item["lengths"]:
                continue
            row = eval_row(run.model, item["task"], length, item["depths"], grid["samples"], args.seed, device,
                           item["haystack"], args.prefill_tokens, args.batch)
            for cell in row:
                cells.append({"run": run.name, "label": item["label"], **cell})
                state_sizes.add(cell["state_bytes_per_row"])
            bar.update(len(row))
        memory[str(length)] = {"state_bytes_per_row": max(state_sizes), "peak_bytes": peak_memory(device)["bytes"]}
    bar.close()
    record = {"name": run.name, "path": str(run.path), **{k: v for k, v in run.meta.items()},
              "seconds": round(time.perf_counter() - t0, 2), "memory_by_length": memory,
              "peak_memory_at_longest": {"length": lengths[-1], **peak_memory(device)}}
    return cells, record


def report(results: dict, color: bool) -> None:
    """Heatmaps per run and grid task, then one table of mean recall per (task, length) with the runs side by side."""
    grid, cells = results["grid"], results["cells"]
    for run in results["runs"]:
        mix = run["model_config"]
        print(f"\n== {run['name']}  ({run['mixer']}, d_model {mix['d_model']}, {mix['n_layers']} layers, "
              f"{run['params'] / 1e6:.2f}M params, regime {run['regime']}, step {run['step']}; {run['seconds']} s)")
        for label in dict.fromkeys(c["label"] for c in cells if c["task"] in grid["grid_tasks"]):
            scores = {(c["length"], c["depth"]): c["score"] for c in cells if c["run"] == run["name"]
                      and c["label"] == label}
            title = f"{label}  recall % (rows: context length, cols: needle depth; {grid['samples']} samples/cell)"
            print(render_heatmap(scores, grid["lengths"], grid["depths"], title, color))
        sizes = {n: m["state_bytes_per_row"] for n, m in run["memory_by_length"].items()}
        peak = run["peak_memory_at_longest"]
        print("recurrent state per sequence: " + ", ".join(f"{b:,} B @ {n}" for n, b in sizes.items())
              + ("" if len(sizes) == 1 else "  (constant in length)" if len(set(sizes.values())) == 1
                 else "  (varies: partial-chunk buffers)")
              + f"; peak memory {peak['bytes'] / 2**20:.0f} MiB @ {peak['length']} [{peak['method'].split(' (')[0]}]")
    rows, table = [], {}
    labels = list(dict.fromkeys(c["label"] for c in cells))
    for c in sorted(cells, key=lambda c: (labels.index(c["label"]), c["length"])):
        row = f"{c['label']} @{c['length']}"
        rows.append(row)
        table.setdefault((row, c["run"]), []).append(c["score"])
    rows = list(dict.fromkeys(rows))
    means = {k: sum(v) / len(v) for k, v in table.items()}
    names = [r["name"] for r in results["runs"]]
    print(f"\nmean recall % per task and context length (depths averaged; point tasks at depth {POINT_DEPTH})")
    print(render_table(rows, names, means, corner="task @length"))


def default_out(runs, runs_root) -> Path:
    """One run: eval_niah.json in its folder; several: <runs_root>/eval_niah.json."""
    if len(runs) > 1:
        return Path(runs_root) / "eval_niah.json"
    path = runs[0].path
    return (path if path.is_dir() else path.parent) / "eval_niah.json"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.plot:
        try:
            require_matplotlib()
        except ImportError as e:
            fail(str(e))
    try:
        device = pick_device(args.device)
        set_seed(args.seed)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    if device.type == "cpu":
        keep_freed_memory()  # no page-faulting the same big tensors back in every step (common.py)
    if args.threads is not None:
        if not 1 <= args.threads <= 4 * (os.cpu_count() or 1):
            fail(f"--threads must be in [1, {4 * (os.cpu_count() or 1)}] (4 per CPU), got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        runs = resolve_runs(args, device)
        out = Path(args.out) if args.out else default_out(runs, args.runs)
        check_results_path(out)  # before minutes of evaluation, not after
        if args.plot:
            check_plot_path(Path(args.plot), out)
        plan, grid = make_plan(args, runs)
    except ValueError as e:
        fail(str(e))
    except KeyboardInterrupt:  # loading many runs can take a while
        fail("interrupted; nothing was written", code=130)
    print(f"evaluating {len(runs)} run(s) on {device}: {', '.join(grid['grid_tasks'])} at lengths {grid['lengths']} "
          f"x depths {grid['depths']}" + (f"; {', '.join(grid['point_tasks'])} at {grid['point'][0]} tokens, "
                                          f"depth {POINT_DEPTH}" if grid["point_tasks"] else "")
          + f"; {grid['samples']} samples per cell, greedy")
    t0 = time.perf_counter()
    cells, records = [], []
    try:
        for run in runs:
            run_cells, record = evaluate_run(run, plan, grid, args, device)
            cells += run_cells
            records.append(record)
    except (ValueError, FloatingPointError) as e:  # a prompt that cannot be built; a model whose logits are NaN
        fail(str(e))
    except (MemoryError, RuntimeError) as e:
        fail(out_of_memory(e, "try a smaller --batch or --prefill-tokens"))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", code=130)
    meta = {"seed": args.seed, "device": str(device), "precision": args.precision, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 2), "argv": list(sys.argv[1:] if argv is None else argv),
            "memory_method": peak_memory(device)["method"],
            "state_bytes_method": "bytes of the storages behind the ModelState after the prefill, per row",
            "protocol": "method.md §6, scaled down (see refine_mini/evaluate.py)"}
    results = {"meta": meta, "grid": grid, "runs": records, "cells": cells}
    write_atomic(out, lambda f: f.write(json.dumps(results, indent=1).encode()))  # makes the folders
    if args.plot:  # both files before the report: a closed stdout (| head) must not cost the results
        labels = list(dict.fromkeys(c["label"] for c in cells if c["task"] in grid["grid_tasks"]))
        panels = [[(f"{r['name']}: {label}", {(c["length"], c["depth"]): c["score"] for c in cells
                                              if c["run"] == r["name"] and c["label"] == label}) for label in labels]
                  for r in records]  # one row of panels per run, one column per task
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        save_png(args.plot, panels, grid["lengths"], grid["depths"])
    try:
        report(results, use_color(args.no_color))
        print(f"\nresults: {out}  ({len(cells)} cells, {results['meta']['seconds']} s)"
              + (f"\nplot: {args.plot}" if args.plot else ""), flush=True)
    except BrokenPipeError:  # the reader left early (| head): the files are written, so stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
