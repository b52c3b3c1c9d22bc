"""Plumbing shared by every script: seeding, devices, checkpoints, run folders, metric logs.

Question answered: how does a run start, save itself and resume without ever losing what it already wrote?

- One seed drives everything (`set_seed`); samplers still take explicit `torch.Generator`s.
- Checkpoints are written atomically (temp file in the same folder, fsync, `os.replace`) so a crash mid-save keeps
  the previous checkpoint, and are read with `torch.load(weights_only=True)`, which refuses to execute code, once
  their zip records pass their CRC-32 checks (torch.load skips them: a flipped bit would load as a wrong weight).
- Every load error is a `CheckpointError` with a one-line message; scripts print it and exit with status 2.
- CPU runs keep freed memory inside the process (`keep_freed_memory`), which the scripts ask for explicitly.
- A regime run without --init pre-trains its base first (`base_checkpoint`).
- Precision: `PRECISIONS` (FastWeightLM.set_precision); kernels wear `autocast_off`, so states stay fp32 under bf16.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes
FP32_MAX = torch.finfo(torch.float32).max  # bound of the loss weights: past it the fp32 loss overflows
PRECISIONS = ("fp32", "bf16")  # fp32 throughout, or bf16 autocast over fp32 weights (method.md §2, "precision")


class CheckpointError(Exception):
    """A checkpoint is missing, corrupted, of the wrong model, or of an unknown format."""


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch; the seed must fit numpy's generator (ValueError with a clear message)."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_off(kernel):
    """Decorator: run `kernel` with autocast off on the device of its first tensor argument (positional or keyword).

    Under bf16 autocast every matmul would run in bf16, and a fast-weight state summed over thousands of tokens in
    bf16 drifts (and an in-place fp32 update of it fails). The kernels cast their inputs themselves (fp32, or fp64),
    so with autocast off they compute what they compute outside it; bf16 speeds up the projections around them. A
    custom backward wears it too, as autocast reaches a backward called inside it."""
    @functools.wraps(kernel)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        with torch.autocast(device, enabled=False) if device else contextlib.nullcontext():  # no tensor: nothing to do
            return kernel(*args, **kwargs)
    return run


def pick_device(name: str = "auto") -> torch.device:
    """auto (CUDA when present), cpu, cuda or cuda:N; anything else is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed blocks below `limit` bytes for reuse instead of handing them back to the OS.

    Why: by default glibc mmaps each block above a dynamic threshold (128 KiB to 32 MiB), unmaps it on free and trims
    the heap top, so a step page-faults its large tensors back in every time (~140 000 faults per default DeltaNet NTP
    step before the fused head loss; README). mallopt(M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = limit) stops that (peak
    RSS +8-18 %). Process-wide, so only the entry scripts call it (CPU runs). False, changing nothing, outside glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version                                     # raises AttributeError outside glibc
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                        # glibc's <malloc.h> parameter numbers
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """An explicit generator for sampling on `device` (CUDA sampling needs a CUDA generator)."""
    return torch.Generator(device=device).manual_seed(seed)  # manual_seed returns the generator


def clock(device: torch.device | str) -> float:
    """time.perf_counter() once `device` has run everything queued on it. CUDA kernels run asynchronously, so a
    bare perf_counter around a training step would time the kernel launches, not the kernels."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write `payload` to `path` atomically (write_atomic)."""
    write_atomic(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **payload}, f))


def write_atomic(path: str | Path, write) -> None:
    """`write(f)` fills a temp file (binary) in path's folder, which then replaces `path`: a reader sees either the
    old file or the complete new one (checkpoints, eval_niah's results). The file is fsynced before the rename and
    the folder after it, so after a power cut the name points at the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode any other new file gets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed (SIGKILL) midway
        stale.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; best effort (some filesystems refuse fsync on a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path, expect_mixer: str | None = None, map_location="cpu",
                    for_resume: bool = False, vocab: int | None = None, mmap: bool = False) -> dict:
    """Load a checkpoint file (or a run folder holding `ckpt.pt`) safely; raise CheckpointError on any problem.
    for_resume: it must also hold what resuming needs (optimizer, step, RNG states).
    mmap: map its tensors instead of reading them (cheap, for a caller that wants only its configs).
    vocab: the tokenizer's vocabulary size the caller will feed it; a model with fewer token rows cannot embed them."""
    path = Path(path)
    try:
        path = path / "ckpt.pt" if path.is_dir() else path
        found = path.is_file()
    except OSError as e:  # a name too long, a folder we may not read
        raise CheckpointError(f"checkpoint {path}: {e.strerror or e}") from None
    if not found:
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        bad = None if mmap else _first_bad_record(path)  # mmap reads the configs only; the full load checks
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap) if bad is None else None
    except Exception as e:  # truncated zip, random bytes, pickled code ... all end here
        raise CheckpointError(f"checkpoint {path} is corrupted or not a refine_mini checkpoint "
                              f"({type(e).__name__})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: its record {bad} fails its CRC-32 check")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a refine_mini checkpoint (format {CHECKPOINT_FORMAT})")
    if not isinstance(ckpt.get("model_config"), dict) or "mixer" not in ckpt["model_config"]:
        raise CheckpointError(f"checkpoint {path} has no model_config naming its mixer")
    if not isinstance(ckpt.get("train_config") or {}, dict):  # every reader does (train_config or {}).get(...)
        raise CheckpointError(f"checkpoint {path}: its train_config is not a dict: {ckpt['train_config']!r:.80}")
    missing = [key for key in (("optimizer", "step", "rng") if for_resume else ()) if key not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it holds no {', '.join(missing)}")
    if for_resume and not (type(ckpt["step"]) is int and ckpt["step"] >= 0 and isinstance(ckpt["optimizer"], dict)
                           and isinstance(ckpt["rng"], dict) and {"python", "torch", "numpy"} <= ckpt["rng"].keys()
                           and type(ckpt.get("skipped", 0)) is int and ckpt.get("skipped", 0) >= 0):
        raise CheckpointError(f"checkpoint {path} cannot be resumed: its step, optimizer, RNG states or skipped-step "
                              f"count are malformed")
    mixer = ckpt["model_config"]["mixer"]
    if expect_mixer is not None and mixer != expect_mixer:
        raise CheckpointError(f"checkpoint {path} holds a {mixer} model, but --model {expect_mixer} was asked for")
    rows = ckpt["model_config"].get("vocab_size")
    if vocab is not None and isinstance(rows, int) and rows < vocab:
        raise CheckpointError(f"checkpoint {path} has a vocabulary of {rows} tokens, but the tokenizer has {vocab}")
    return ckpt


def _first_bad_record(path: Path) -> str | None:
    """The first record of a torch.save zip whose bytes do not match their stored CRC-32, or None. torch.load does
    not check them: a flipped bit in a tensor would load as a silently wrong weight."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def base_checkpoint(args, device) -> Path:
    """--init, else runs/<model>-pretrain; pre-train that base first (saying so) when it does not exist yet, or
    finish it when its pre-training was stopped before its last step (a Ctrl-C in an earlier run's base)."""
    if getattr(args, "init", None):
        return Path(args.init)
    base = Path("runs") / f"{args.model}-pretrain"
    import train  # the CLI's own pre-training entry, so the base is exactly what --regime pretrain makes
    flags = dict(model=args.model, compile=args.compile, grad_checkpoint=args.grad_checkpoint)  # the only ones given
    if (base / "ckpt.pt").exists():
        saved = load_checkpoint(base, mmap=True)  # its configs only
        step, total = saved.get("step"), (saved.get("train_config") or {}).get("max_steps")
        if not (isinstance(step, int) and isinstance(total, int) and step < total):
            return base
        print(f"the base pre-training in {base} stopped at step {step} of {total}: finishing it first (as python "
              f"train.py --model {args.model} --regime pretrain --resume)")
        flags["resume"] = True  # compile and grad_checkpoint are FREE on resume
    else:
        precision = getattr(args, "precision", None)  # passed on, as --grad-checkpoint is
        print(f"no --init and no base checkpoint at {base}/ckpt.pt: pre-training the base model first (as python "
              f"train.py --model {args.model} --regime pretrain{' --precision ' + precision if precision else ''})")
        flags.update(data=getattr(args, "data", None), seed=args.seed, precision=precision)
    try:
        train.run_pretrain(argparse.Namespace(**flags), base, torch.device(device))  # makes the folder once needed
    except FloatingPointError as e:  # name the base's folder (train.main then says what the run itself kept)
        raise FloatingPointError(f"{e} (in the base pre-training; {train.kept(base)})") from None
    return base


def checkpoint_seq_len(ckpt: dict) -> int:
    """The sequence length a checkpoint was trained at (512 when it does not say); CheckpointError unless an int > 0."""
    value = (ckpt.get("train_config") or {}).get("seq_len") or 512
    if type(value) is int and value > 0:  # not True, 256.0, inf or "512": train.py saves an int
        return value
    raise CheckpointError(f"the checkpoint's train_config.seq_len is not a length: {value!r:.80}")


def check_writable(path: str | Path, prefix: str, folder: bool = False) -> None:
    """Raise ValueError(f"{prefix}: reason") unless a file (with folder: a folder) can be made at `path` later: nothing
    of the other kind there, no name too long, the nearest existing folder at or above it writable. It creates
    nothing: folders are made at the first write (run_dir, write_atomic), so a failed run leaves none behind."""
    path = Path(path)
    try:
        if path.exists() and path.is_dir() != folder:
            raise ValueError(f"{prefix}: is a {'file' if folder else 'folder'}; give a "
                             f"{'folder' if folder else 'file name in it'}")
        existing = next(p for p in (path.absolute(), *path.absolute().parents)[0 if folder else 1:] if p.exists())
        if any(len(os.fsencode(part)) > os.pathconf(existing, "PC_NAME_MAX") for part in path.parts):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise ValueError(f"{prefix}: cannot write in {existing}")
    except OSError as e:  # a name too long, a folder we may not read
        raise ValueError(f"{prefix}: {e.strerror or e}") from None


def run_dir(out: str | Path) -> Path:
    """Create the run folder (ValueError with the reason if it cannot be created or written)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # writable?
    except OSError as e:
        raise ValueError(f"cannot write folder {path}: {e.strerror or e}") from None
    return path


class MetricLog:
    """One JSON object per line, flushed at once, so a killed run keeps every line it logged."""

    def __init__(self, path: str | Path, append: bool = False):
        self.file = open(path, "a" if append else "w", buffering=1)

    def write(self, **metrics) -> None:
        self.file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        self.file.close()


def out_of_memory(e: BaseException, hint: str) -> str:
    """The one-line message for a tensor that did not fit (CUDA raises torch.OutOfMemoryError, the CPU allocator a
    plain RuntimeError); any other error is raised again, not dressed up as bad input."""
    if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)):
        raise e
    return f"out of memory ({' '.join(str(e).split())[:120]}); {hint}"


def fail(message: str, code: int = 2):
    """The scripts' single exit path for bad input: one line on stderr, non-zero status."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
