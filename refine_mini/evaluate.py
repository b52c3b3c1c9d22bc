"""Evaluating a fast-weight LM on RULER-style tasks by greedy decoding from the carried recurrent state.

Question answered: given a checkpoint, what fraction of needles (or QA answers) does it recall at each context
length and needle depth, and how much memory does the recurrent state take while it does so?

Protocol (method.md §6, RULER NIAH and RULER QA): greedy decoding of at most the task's `max_new_tokens`; the
decoded text is cut at its first newline and stripped; a sample scores with the task's scorer (niah.py / qa.py:
recall of the gold values / case-insensitive substring match); a cell reports the mean over its samples.

How generation runs: the prompt is prefilled once and the answer decoded token by token from the carried state
(`FastWeightLM.generate`); the prefix is never re-encoded. The prompt is prefilled in segments of
`prefill_tokens // B` positions, carrying the state between segments -- the same result as one pass
(tests/test_model.py checks that invariant), but the (B, T, V) fp32 logits that `forward` returns for a long prompt
would otherwise dominate memory; this way they never exceed max(prefill_tokens, B) x V floats, whatever T is. All
samples of one row (a task and length, every depth) are decoded together, `max_batch` (eval_niah --batch) at a time:
their prompts have exactly `length` tokens.

Deviations from the paper's evaluation: a few samples per cell instead of 500 (RULER) / 200 (QA); contexts of
hundreds to a few thousand tokens instead of 4K-16K; our own generators (niah.py, qa.py) instead of lm-eval-harness /
NVIDIA RULER parquets; NIAH outputs are cut at the first newline as QA's are (lm-eval scores NIAH on the whole
128-token generation; niah.py gives the measured difference, 0-2.5 points); decoding therefore stops at the first
newline (also at EOS), at most `max_new_tokens` (NIAH 12 or 40, QA 32) instead of 128.

Memory: CUDA reports torch.cuda.max_memory_allocated per context length (reset before each length); CPU reports the
process peak RSS (`resource.getrusage`, monotone over the whole process: weights, Python and torch included), so the
exact, length-independence check on CPU is `state_bytes`: the size of the recurrent state after the prefill.

eval_niah's inputs are checked here before any decoding: the grid (`check_grid`) and where the results JSON and the
heatmap PNG will go (`check_results_path`, `check_plot_path`; nothing is created until they are written).
"""

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from refine_mini import niah, tokenizer
from refine_mini.common import CheckpointError, check_writable, checkpoint_seq_len, load_checkpoint
from refine_mini.state import ModelState
from refine_mini.trainer import model_from_checkpoint

TASK_NAMES = tuple(niah.TASKS)  # s_niah mk_niah mv_niah mq_niah qa qa_2hop
HAYSTACKS = ("noise", "essay")  # NIAH filler: RULER's repeated sentences (niah_single_1) or prose (its other tasks)


@dataclass
class Run:
    """One model to evaluate: display name, where it came from, the model and its checkpoint metadata."""
    name: str
    path: Path
    model: torch.nn.Module
    meta: dict


def find_runs(root: str | Path = "runs") -> list[Path]:
    """Every run folder under `root` (any depth) that holds a ckpt.pt, sorted by path."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("ckpt.pt") if p.is_file()) if root.is_dir() else []


def load_run(path: str | Path, device) -> Run:
    """Checkpoint file or run folder -> Run; raises CheckpointError with a one-line message on any problem."""
    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu", vocab=tokenizer.vocab_size())
    try:
        model = model_from_checkpoint(ckpt, device).eval()
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not match the model code "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    folder = path if path.is_dir() else path.parent
    name = folder.name if path.is_dir() or path.name == "ckpt.pt" else f"{folder.name}/{path.stem}"
    meta = {"mixer": ckpt["model_config"].get("mixer"), "regime": ckpt.get("regime"), "step": ckpt.get("step"),
            "seq_len": checkpoint_seq_len(ckpt) if (ckpt.get("train_config") or {}).get("seq_len") else None,
            "params": sum(p.numel() for p in model.parameters()),
            "model_config": ckpt["model_config"]}
    return Run(name, path, model, meta)


def state_bytes(state: ModelState) -> int:
    """Bytes held by the recurrent state: the storages behind its tensors, each counted once. (numel * element_size
    would undercount a view into a larger tensor, which keeps all of that tensor's memory alive.)"""
    return storage_bytes(t for layer in state.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind these tensors, each storage counted once (views share their base's)."""
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in tensors}  # empty ones share key and 0 bytes
    return sum(storages.values())


def first_line(text: str) -> str:
    """method.md §6: the prediction is the decoded text before its first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def newline_id() -> int:
    return tokenizer.encode("\n")[0]


@torch.no_grad()
def greedy_decode(model, prompts: torch.Tensor, max_new_tokens: int, prefill_tokens: int = 4096):
    """prompts (B, T) -> (new tokens (B, N), bytes of the recurrent state after the prefill, per row).

    Prefill: the first T-1 tokens in segments of max(1, prefill_tokens // B) positions, each carrying the state of
    the previous one; then `generate` takes the last prompt token with that state and decodes greedily (temperature 0),
    stopping once every row has produced a newline or end-of-text token. The prompt is encoded exactly once.
    """
    state, seg, end = None, max(1, prefill_tokens // prompts.shape[0]), prompts.shape[1] - 1
    for start in range(0, end, seg):
        _, _, state = model(prompts[:, start:min(start + seg, end)], state)  # (B, seg) -> logits (B, seg, V), state
    prefill_bytes = state_bytes(state) if state is not None else 0
    new, _ = model.generate(prompts[:, -1:], max_new_tokens, temperature=0.0, state=state,
                            stop_tokens=(newline_id(), tokenizer.eot_id()))  # (B, 1) + carried state -> (B, N)
    return new, prefill_bytes // prompts.shape[0]


@torch.no_grad()
def greedy_outputs(model, examples, device, prefill_tokens: int = 4096, max_batch: int = 32):
    """Greedy, uncut outputs (they may run past the newline: the batch stops when every row has one) for a list of
    Examples, and the set of per-row state sizes seen. Prompts of equal length are decoded together, `max_batch`
    at a time; a row keeps at most its own example's max_new_tokens of the batch's budget (the largest), so an
    output is the same decoded alone or beside a task with a larger budget."""
    outputs, bytes_seen, by_len, eot = [""] * len(examples), set(), {}, tokenizer.eot_id()
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.prompt_ids), []).append(i)
    batches = [idx[j:j + max_batch] for idx in by_len.values() for j in range(0, len(idx), max_batch)]
    for idx in batches:
        prompts = torch.tensor([examples[i].prompt_ids for i in idx], dtype=torch.long, device=device)  # (B, T)
        budget = max(examples[i].max_new_tokens for i in idx)
        new, nbytes = greedy_decode(model, prompts, budget, prefill_tokens)  # (B, N)
        bytes_seen.add(nbytes)
        for i, row in zip(idx, new):
            ids = row.tolist()[:examples[i].max_new_tokens]
            outputs[i] = tokenizer.decode(ids[:ids.index(eot)] if eot in ids else ids)  # EOS ends the answer
    return outputs, bytes_seen


@torch.no_grad()
def eval_row(model, task: str, length: int, depths: list[float], samples: int, seed: int, device,
             haystack: str = "noise", prefill_tokens: int = 4096, max_batch: int = 32) -> list[dict]:
    """Score `samples` examples at each depth of one (task, length) row; returns one JSON record per cell.

    niah.make_task_examples draws sample i from (task, split, seed, length, haystack, i) only, so every depth of a
    row uses the same keys and values: the cells of a row differ only in where the needle sits. All prompts of a
    row have exactly `length` tokens, so the whole row is decoded in batches of up to `max_batch` sequences
    (grouped by prompt length, should a generator ever return unequal ones)."""
    t0 = time.perf_counter()
    examples = [ex for d in depths for ex in niah.make_task_examples(task, samples, length, d, seed=seed,
                                                                      split="eval", haystack=haystack)]
    outputs, bytes_seen = greedy_outputs(model, examples, device, prefill_tokens, max_batch)
    seconds = round((time.perf_counter() - t0) / len(depths), 3)  # the row's time, shared equally
    cells = []
    for j, depth in enumerate(depths):
        exs, outs = examples[j * samples:(j + 1) * samples], outputs[j * samples:(j + 1) * samples]
        scores = [float(niah.score(task, first_line(out), ex.answers)) for out, ex in zip(outs, exs)]
        cells.append({"task": task, "haystack": haystack if task in niah.NIAH_SPECS else None, "length": length,
                      "depth": depth, "samples": len(exs), "score": sum(scores) / len(scores), "scores": scores,
                      "prompt_tokens": sorted({len(ex.prompt_ids) for ex in exs}),
                      "state_bytes_per_row": max(bytes_seen), "seconds": seconds,
                      "first_output": first_line(outs[0]), "first_raw_output": outs[0],
                      "first_answers": list(exs[0].answers)})
    return cells


def eval_cell(model, task: str, length: int, depth: float, samples: int, seed: int, device, **kw) -> dict:
    """One (task, length, depth) cell: `eval_row` with a single depth."""
    return eval_row(model, task, length, [depth], samples, seed, device, **kw)[0]


def peak_memory(device) -> dict:
    """The peak memory since the last reset (CUDA) or of the whole process (CPU, peak RSS)."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"bytes": rss if sys.platform == "darwin" else rss * 1024,
            "method": "process peak RSS (resource.getrusage ru_maxrss; monotone, includes weights and Python)"}


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def default_lengths(seq_len: int | None, full: bool) -> list[int]:
    """Lengths around the training length T: T/2, T, 2T (quick) or T/4 .. 8T (full); T = 512 if unknown; >= 128."""
    t = seq_len or 512
    factors = (0.25, 0.5, 1, 2, 4, 8) if full else (0.5, 1, 2)
    return sorted({max(128, int(t * f)) for f in factors})


def default_depths(full: bool) -> list[float]:
    return [i / 10 for i in range(11)] if full else [0.0, 0.25, 0.5, 0.75, 1.0]


def check_grid(tasks, lengths, depths, samples, haystacks=("noise",)) -> None:
    """Raise ValueError (one line) for anything the evaluation cannot run, before any model work starts."""
    for task in tasks:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    for h in haystacks:
        if h not in HAYSTACKS:
            raise ValueError(f"unknown haystack {h!r}; choose from {', '.join(HAYSTACKS)}")
    for n in lengths:
        if n < 1:
            raise ValueError(f"context lengths must be positive, got {n}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depths must lie in [0, 1], got {d}")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    niah.check_prompt_budget(samples * len(depths), max(lengths), "--samples x --depths")  # one row's prompts
    for task in tasks:  # the shortest length must hold every prompt's header, needles and question
        niah.check_length(task, min(lengths))


RESULT_KEYS = {"meta", "grid", "runs", "cells"}  # what every results file of eval_niah holds


def check_results_path(path: Path) -> None:
    """Raise ValueError unless the results JSON can be written at `path` later; an existing file there must be an
    earlier results file (never a checkpoint or a run's config.json). Nothing is created now."""
    check_writable(path, f"--out {path}")
    if path.is_file():
        try:
            ours = RESULT_KEYS <= json.loads(path.read_text()).keys()
        except (ValueError, AttributeError):  # not JSON, not text (UnicodeDecodeError), not an object
            ours = False
        if not ours:
            raise ValueError(f"--out {path} exists and is not an eval_niah results file; refusing to overwrite it")


def check_plot_path(path: Path, out: Path) -> None:
    """Raise ValueError unless the heatmap PNG can be written at `path` later, beside (not over) the results."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: give a file name ending in .png")
    try:
        same = path.resolve() == out.resolve()  # resolved: sub/../r.png, or a link to it, is the same file
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
        same = False
    if same:
        raise ValueError(f"--plot {path} is the results file (--out); give the picture another name")
    check_writable(path, f"--plot {path}")
