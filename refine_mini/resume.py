"""Which settings a run uses, fresh or resumed (train.py; not a step of the paper: run plumbing).

Question answered: `train.py --resume` continues a killed run. With which config?

With the one the run was started with, saved in its checkpoint (`train_config`). A resumed run must end with the
weights the uninterrupted run would have, so it must not pick up the defaults for the flags not given again (a
bf16 run resumed without `--precision bf16` would go on in fp32, a run on `--data my.txt` on the built-in corpus):
- a flag not given again keeps its saved value;
- a flag given again that would change what the run computes (the data, --seq-len, --batch-size, --lr, --seed,
  --precision, --objective, REFINE's --c, --k, --reward, ...) must restate the saved value: a different one is
  refused with a one-line error naming both;
- FREE settings change only when the run ends or how fast and in how much memory it gets there, not what it
  computes (checkpointing in pieces and compiling change it at rounding level): --max-steps (a longer run;
  pre-training's cosine then stays at its floor), --compile, activation checkpointing (--grad-checkpoint,
  --checkpoint-segment), and how often it validates or saves. A given one wins.
A checkpoint saved before a field existed takes that field's default (e.g. fp32 precision). The device is not part
of the config: a checkpoint is loaded onto the CPU first and holds no CUDA RNG state, so --device may change.
The resumed run's metrics log drops the lines logged after its checkpoint (`trim_log`). The data path is compared,
and so is the data itself (`same_data`: a digest of the --data token rows); the global RNG states are restored
(`rng_state`, `set_rng_state`).
"""
import json
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from refine_mini.common import write_atomic

FREE = frozenset({"max_steps", "compile", "grad_checkpoint", "checkpoint_segment", "ckpt_every", "eval_every",
                  "val_every"})
ACCEPTS = {float: (float, int), tuple: (tuple, list)}  # saved types a field of each default type takes


def given_flags(args, names) -> dict:
    """{name: value} of the flags in `names` that were given on the command line: argparse leaves the others None
    (store_true flags False, which here means "not given", since none of them can be turned off)."""
    values = {name: getattr(args, name, None) for name in names}
    return {name: value for name, value in values.items() if value is not None and value is not False}


def configure(cfg, given: dict, saved: dict | None = None) -> None:
    """Set a run config (a dataclass: TrainConfig, RegimeConfig) in place from the flags `given` (given_flags) and,
    for a resumed run, the `saved` train_config of its checkpoint. A fresh run (saved None) takes every given flag
    over cfg's defaults; a resumed one takes the saved values, then the given FREE flags, and a given flag of any
    other field must restate its saved value (ValueError otherwise). Saved fields cfg does not have are ignored."""
    names = {f.name for f in fields(cfg)}
    for name, value in (saved or {}).items():
        if name in names:
            kind = type(getattr(cfg, name))  # NoneType for the optional fields (data): anything goes
            if kind is not type(None) and not isinstance(value, ACCEPTS.get(kind, kind)):
                raise ValueError(f"the checkpoint's saved {name} is {value!r} ({type(value).__name__}, not "
                                 f"{kind.__name__}): it is corrupted or not of this code")
            setattr(cfg, name, value)
    for name, value in given.items():
        if saved is None or name in FREE:
            setattr(cfg, name, value)
        else:
            require_same(name, value, getattr(cfg, name))


def require_same(name: str, given, saved) -> None:
    """ValueError unless a flag given to a resumed run restates the value the run was started with."""
    if given != saved:
        raise ValueError(f"--{name.replace('_', '-')} {given} differs from the {saved} this run was started with; "
                         f"a resumed run keeps its settings (start a new --out, or --overwrite, to change them)")


def require_ahead(max_steps: int, step: int, out) -> None:
    """ValueError for a resume that would end before the step its run has reached (it would do nothing)."""
    if max_steps < step:
        raise ValueError(f"--max-steps {max_steps} is below step {step}, which {out} has reached")


def same_data(saved: str | None, corpus) -> str | None:
    """The corpus' digest (data.Corpus.digest), once it is known to be `saved`, the digest a resumed run's checkpoint
    holds: ValueError if the --data files changed since the run started, as the resumed run would then train on
    other rows than the uninterrupted one. No digest saved (a fresh run, the built-in corpus, an older checkpoint):
    nothing to compare."""
    digest = getattr(corpus, "digest", None)
    if saved is not None and digest != saved:
        raise ValueError(f"--data {getattr(corpus, 'name', '?')} has changed since this run was started (its token "
                         f"rows' digest is {digest}, the checkpoint's {saved}); restore it, or start afresh "
                         f"(--overwrite)")
    return digest


def saved_config(ckpt: dict, regime: str, out) -> dict:
    """A checkpoint's saved train_config ({} when it has none), once its run is known to be of `regime`."""
    if ckpt.get("regime", regime) != regime:
        raise ValueError(f"--regime {regime}: {out} holds a {ckpt['regime']} run; --resume continues a run in its own "
                         f"regime")
    return dict(ckpt.get("train_config") or {})


def trim_log(path: str | Path, step: int) -> None:
    """Drop the metric lines logged after `step` (a run killed after its last checkpoint), before resuming there. A
    last line cut short by the kill goes too; any other line that is not a metrics object is a ValueError naming
    file:line, and the log is left as it was."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a metrics log (not UTF-8 text)") from None
    steps = [_logged_step(line) for line in lines]
    bad = [i for i, s in enumerate(steps[:-1]) if s is None]
    if bad:
        raise ValueError(f"{path}:{bad[0] + 1}: not a metrics line (a JSON object with a numeric step)")
    kept = [line for line, s in zip(lines, steps) if s is not None and s <= step]
    if len(kept) != len(lines):
        write_atomic(path, lambda f: f.write("".join(kept).encode("utf-8")))  # a crash leaves the old log whole


def _logged_step(line: str) -> float | None:
    """The step of a metrics line (0 if it names none); None for a line that is not a metrics object."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    value = obj.get("step", 0) if isinstance(obj, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rng_state() -> dict:
    """The global RNG states of Python, NumPy and torch's CPU generator, as tensors and plain values (weights_only
    loading accepts them). Not CUDA's: nothing draws from them (models start on CPU, every sampler is a Generator
    from (seed, step)), and saving them would start CUDA in CPU runs and tie a checkpoint to the visible GPUs."""
    return {"python": _to_plain(random.getstate()), "torch": torch.get_rng_state(),
            "numpy": _to_plain(np.random.get_state())}


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    # a "cuda" entry (checkpoints written before CUDA states were left out) is ignored, for rng_state's reasons


def _to_plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_to_plain(v) for v in x]
    return x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
