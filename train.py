"""Train a fast-weight LM: NTP pre-training, REFINE mid-training, or nested REFINE post-training.

    python train.py --model deltanet --regime pretrain      # NTP from scratch on the built-in corpus
    python train.py --model deltanet --regime mid           # REFINE mid-training on long documents
    python train.py --model deltanet --regime post          # nested REFINE on prompts, then answer SFT

Each run writes to --out (default runs/<model>-<regime>): config.json, metrics.jsonl (one line per optimizer
step) and ckpt.pt (atomic). Bad input exits with status 2 and a one-line message.
"""

import argparse
import json
import sys
from pathlib import Path

from refine_mini.common import (FP32_MAX, PRECISIONS, CheckpointError, check_writable, fail, keep_freed_memory,
                                load_checkpoint, out_of_memory, pick_device, set_seed)
from refine_mini.model import ModelConfig
from refine_mini.resume import configure, given_flags, same_data, saved_config
from refine_mini.trainer import TrainConfig, check_lr, pretrain

MODELS = ("deltanet", "lact")
REGIMES = ("pretrain", "mid", "post")
# Default pre-training steps of each model (8 x 512 tokens each), chosen so that the default run finishes in under
# 5 minutes on a 2-core CPU: DeltaNet 400 steps took 4:22 in a slow phase (its S-NIAH recall at 512 tokens needs them:
# 300 steps 86 %, 350 steps 92 %, 400 steps 100 % on eval_niah's grid); a LaCT step costs ~1.3x a DeltaNet step, so
# LaCT gets 250 (3:09-3:29).
PRETRAIN_STEPS = {"deltanet": 400, "lact": 250}


def default_model_config(mixer: str) -> ModelConfig:
    """The laptop-sized defaults of each model (sizes chosen so pre-training finishes in minutes on 2 CPU cores)."""
    return ModelConfig(mixer=mixer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="fast-weight mixer: deltanet or lact")
    p.add_argument("--regime", default="pretrain", help="pretrain | mid | post")
    p.add_argument("--out", help="run folder (default runs/<model>-<regime>)")
    p.add_argument("--data", help="a .txt file, a .jsonl with a 'text' field, or a folder of them (README: "
                                  "'Your own text'; default: the built-in synthetic long-document corpus)")
    p.add_argument("--init", help="checkpoint or run folder to start from (mid/post; default: the pretrain run)")
    p.add_argument("--max-steps", type=int,
                   help="pretrain: optimizer steps (default deltanet 400, lact 250); mid/post: batches")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, help="sequences per batch")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--answer-weight", type=float,
                   help="pretrain: loss weight of answer tokens (after 'Answer:', through the newline) relative to "
                        "the rest; 1 = plain NTP (default 100, refine_mini/trainer.py)")
    p.add_argument("--seed", type=int, help="the one seed that drives init, data and sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the model (auto: on for CUDA, off on CPU where compiling costs minutes)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32 (default), or bf16: autocast over fp32 weights, the paper's setting; the fast-weight "
                        "kernels and losses stay fp32 (README, Design notes)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward (the paper's setting): 2-3.6x less "
                        "memory for 15-65 %% more time (README, Design notes)")
    p.add_argument("--checkpoint-segment", type=int, metavar="N",
                   help="checkpoint each block on N-token pieces, one after another (implies --grad-checkpoint; "
                        "a multiple of the chunk size, e.g. 2048): less memory again at long context")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with the settings it was started with "
                        "(refine_mini/resume.py: only --max-steps, --compile and checkpointing may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run (without it, that is an error)")
    r = p.add_argument_group("REFINE (mid/post; defaults from method.md §2, see refine_mini/regimes.py)")
    r.add_argument("--objective", help="mid: refine | ntp; post: refine | nested-sft | sft (default refine)")
    r.add_argument("--c", type=int, help="chunks = rollout positions per sequence (8)")
    r.add_argument("--k", type=int, help="rollout length in tokens (5)")
    r.add_argument("--n", type=int, help="rollouts per position (1)")
    r.add_argument("--selection", help="entropy | uniform | argmax | argmin")
    r.add_argument("--reward", help="cosine | binary | hybrid (mid: cosine, post: hybrid)")
    r.add_argument("--schedule", help="single | minibatch (optimizer steps per batch)")
    r.add_argument("--minibatches", type=int, help="optimizer steps per batch with --schedule minibatch")
    r.add_argument("--lambda-rl", type=float, help="GRPO loss weight (0.2)")
    return p


# the flags that set a pre-training TrainConfig field of the same name (the others: --model, --out, --device, ...)
PRETRAIN_FLAGS = ("max_steps", "seq_len", "batch_size", "lr", "answer_weight", "seed", "grad_checkpoint",
                  "checkpoint_segment", "precision", "data")
REFINE_ONLY = ("init", "objective", "c", "k", "n", "selection", "reward", "schedule", "minibatches", "lambda_rl")


def check_args(args) -> None:
    """Every flag checked before anything is read or written; ValueError names the first bad one."""
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    if args.regime not in REGIMES:
        raise ValueError(f"unknown regime {args.regime!r}; choose one of {', '.join(REGIMES)}")
    if args.resume and args.overwrite:  # one continues the run, the other deletes it
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                         "--overwrite starts it again")
    for name in ("out", "data", "init"):  # an empty path would silently mean the default one
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise ValueError(f"--{name} is empty; give a path, or leave the flag out for its default")
    for name in ("max_steps", "seq_len", "batch_size", "checkpoint_segment"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_lr(args.lr)
    for name, low in (("answer_weight", "> 0"), ("lambda_rl", ">= 0")):
        value = getattr(args, name)
        if value is not None and not (value < FP32_MAX and (value > 0 if low == "> 0" else value >= 0)):
            raise ValueError(f"--{name.replace('_', '-')} must be {low} and finite in float32, got {value}")
    check_batch_tokens(args)
    if args.regime == "pretrain":
        given = [name for name in REFINE_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a mid/post flag; --regime pretrain does not use it")
    elif args.answer_weight is not None:
        raise ValueError("--answer-weight is a pretrain flag; mid and post use REFINE's own loss weights")
    elif args.regime == "post" and args.data is not None:  # it would be ignored
        raise ValueError("--data is a pretrain/mid flag; post-training trains on generated task prompts")


# Tokens in one batch (--batch-size x --seq-len). Past 4M, one NTP step of the default model needs ~25 GB of
# activations even checkpointed in pieces (6 KB a token, bench/memory.py), and the built-in corpus takes a minute to
# write each batch: a mistyped size (--seq-len 1000000000) fails at once instead.
MAX_BATCH_TOKENS = 2 ** 22


def check_batch_tokens(args) -> None:
    """--batch-size x --seq-len, each flag not given at its regime's default (512 tokens for a base's seq_len)."""
    if args.regime == "pretrain":
        default = TrainConfig()
    else:
        from refine_mini.regimes import defaults
        default = defaults(args.regime)
    batch, seq_len = args.batch_size or default.batch_size, args.seq_len or default.seq_len or 512
    if batch * seq_len > MAX_BATCH_TOKENS:
        raise ValueError(f"--batch-size x --seq-len = {batch:,} x {seq_len:,} tokens a batch; at most "
                         f"{MAX_BATCH_TOKENS:,} (train.py, MAX_BATCH_TOKENS)")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"runs/{args.model}-{args.regime}")
    try:
        check_args(args)
        device = pick_device(args.device)
        if args.resume and not (out / "ckpt.pt").is_file():
            raise ValueError(f"--resume: {out} holds no checkpoint (ckpt.pt) to resume")
        if not args.resume and not args.overwrite and (out / "ckpt.pt").exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start "
                             f"again (or choose another --out)")
        if not (args.resume or args.overwrite):
            check_no_foreign_files(out)
        if device.type == "cpu":
            keep_freed_memory()  # no page-faulting the same big tensors back in every step (common.py)
        set_seed(0 if args.seed is None else args.seed)  # a resumed run then restores its saved RNG states
        args.data = resolved(args.data) if args.data else None  # recorded, and compared on --resume
        check_writable(out, f"cannot write folder {out}", folder=True)  # made when the run first writes into it
        if args.regime == "pretrain":
            return run_pretrain(args, out, device)
        from refine_mini.regimes import run_regime  # the REFINE regimes (mid, post)
        return run_regime(args, out, device)
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    except FloatingPointError as e:  # a NaN loss or weights: stopped before saving them
        fail(f"{e}; {kept(out)}")
    except OSError as e:  # a disk that fills up, a folder that vanishes: the atomic save kept the last checkpoint
        fail(f"{e.strerror or e}: {e.filename or out}; {kept(out)}")
    except (MemoryError, RuntimeError) as e:
        fail(out_of_memory(e, f"try a smaller --batch-size or --seq-len; {kept(out)}"))
    except KeyboardInterrupt:
        fail(f"interrupted; {kept(out)}", code=130)


def check_no_foreign_files(out: Path) -> None:
    """A run writes config.json and metrics.jsonl into --out: ValueError if they are there and no refine_mini run
    wrote them (--out . in a project, say). A run's own, left by one stopped before its first checkpoint, may go."""
    found = [name for name in ("config.json", "metrics.jsonl") if (out / name).exists()]
    try:
        ours = json.loads((out / "config.json").read_text()).get("regime") in REGIMES
    except (OSError, ValueError, AttributeError):  # missing, unreadable, not JSON, not a JSON object
        ours = False
    if found and not ours:
        raise ValueError(f"{out} holds {' and '.join(found)} that no refine_mini run wrote; choose another --out "
                         f"(or pass --overwrite to replace them)")


def resolved(path: str) -> str:
    """The absolute path, symlinks followed; a ValueError for a symlink loop (RuntimeError before Python 3.13)."""
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError) as e:
        raise ValueError(f"--data {path}: {e}") from None


def kept(out: Path) -> str:
    """What a run stopped by an error, a NaN or Ctrl-C leaves behind in `out`. (A base pre-training that a mid/post
    run started and that was stopped is finished by the next such run: common.base_checkpoint.)"""
    if (out / "ckpt.pt").is_file():
        return f"the last checkpoint in {out} is kept (--resume continues from it)"
    return f"no checkpoint was saved in {out} yet (run again without --resume)"


def run_pretrain(args, out: Path, device) -> dict:
    from refine_mini.data import make_corpus
    compile_ = (args.compile == "on") or (args.compile == "auto" and device.type == "cuda")
    cfg = TrainConfig(max_steps=PRETRAIN_STEPS[args.model])
    saved = None
    if getattr(args, "resume", False):  # the run's own settings (resume.py); its tensors are mapped, not read
        saved = saved_config(load_checkpoint(out, expect_mixer=args.model, for_resume=True, mmap=True), "pretrain", out)
    configure(cfg, {**given_flags(args, PRETRAIN_FLAGS), "compile": compile_}, saved)
    corpus = make_corpus(cfg.data, cfg.seq_len, seed=cfg.seed)
    cfg.data_digest = same_data(cfg.data_digest, corpus)  # a resume refuses a --data file edited since the start
    metrics = pretrain(default_model_config(args.model), cfg, corpus, out, device, resume=saved is not None)
    print(f"done: {out}/ckpt.pt  " + "  ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
