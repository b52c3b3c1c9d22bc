"""Test-time REFINE: adapt the weights on a batch of test prompts, then answer them greedily (method.md §3 "TTT").

    python tta.py --ckpt runs/deltanet-post --task s_niah                  # cumulative (as the official code)
    python tta.py --ckpt runs/deltanet-post --task qa --mode reset --samples 16

For every batch of --batch-size (8) EVAL-split prompts, three methods are scored on the same prompts:
  none        no adaptation: greedy answers from the checkpoint's weights;
  sft-ttt     --sft-steps (1) NTP optimizer step(s) on the batch's prompts (the paper's SFT-TTT baseline: one step
              per batch of 8), then greedy answers;
  refine-ttt  the §1.9 loop on the prompts with the binary reward, λ_NTP 1, λ_RL 0.4, c 8, k 5, n 1, split into
              2 mini-batches of 4 prompts = TWO optimizer steps per batch (paper: 8 / 4), then greedy answers.
Modes: `cumulative` (default) carries weights AND optimizer state from batch to batch -- what the official code does
(method.md §3, §8.4: weights are never reset inside a task's validation loop, so the score depends on the order);
`reset` restores the checkpoint's weights and a fresh optimizer before every batch (per-batch episodic TTT).
The printed table gives each method's score and its optimizer-step count (REFINE takes 2× SFT-TTT's by default,
as in the paper; --sft-steps 2 matches them).

Deviations: our synthetic eval-split tasks and lengths instead of RULER QA / LongBench at 4K-16K; a constant LR of
1e-4 instead of 1e-6 (our ~2M-parameter models need a larger one; a tuned knob, --lr); AdamW (0.9, 0.999), wd 0.01 on
matrices only (verl decays every parameter; norm gains and 1-D vectors are exempt here).
REFINE-TTT fixes the mini-batch COUNT at 2, the paper the mini-batch SIZE at 4 prompts: they agree at the default
--batch-size 8 only (16 prompts: 2 steps of 8 here, 4 steps of 4 in the paper).
Bad input (missing or corrupted checkpoint, unknown task, bad sizes) prints one line and exits with status 2.
"""

import argparse
import sys
from dataclasses import dataclass, field

import torch

from refine_mini import tokenizer
from refine_mini.common import (PRECISIONS, CheckpointError, checkpoint_seq_len, fail, keep_freed_memory,
                                load_checkpoint, out_of_memory, pick_device, set_seed)
from refine_mini.niah import TASKS, check_length, check_prompt_budget, make_task_examples
from refine_mini.posttrain import score_examples
from refine_mini.regimes import inner_update, ntp_step, refine_config, step_generator
from refine_mini.trainer import apply_compute_settings, check_lr, make_optimizer, model_from_checkpoint

METHODS = ("none", "sft-ttt", "refine-ttt")
MODES = ("cumulative", "reset")


@dataclass
class TTTConfig:
    lr: float = 1e-4  # constant (paper 1e-6; see the module docstring)
    weight_decay: float = 0.01  # AdamW, as every regime
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    sft_steps: int = 1  # NTP steps per batch for sft-ttt (the paper's baseline takes 1)
    grad_checkpoint: bool = False  # activation checkpointing per block (FastWeightLM.set_checkpointing)
    checkpoint_segment: int = 0  # ... on pieces of this many tokens (0: whole prompts)
    precision: str = "fp32"  # fp32 | bf16 autocast over fp32 weights (FastWeightLM.set_precision)
    refine: dict = field(default_factory=lambda: {"reward": "binary", "lambda_ntp": 1.0, "lambda_rl": 0.4,
                                                  "schedule": "minibatch", "minibatches": 2})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or run folder (e.g. runs/deltanet-post)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--mode", choices=MODES, default="cumulative",
                   help="cumulative: weights carried across batches (the official code); reset: fresh per batch")
    p.add_argument("--length", type=int, help="prompt tokens (default: the checkpoint's training length)")
    p.add_argument("--samples", type=int, default=32, help="eval-split prompts (a multiple of --batch-size)")
    p.add_argument("--batch-size", type=int, default=8, help="test prompts per adaptation batch")
    p.add_argument("--lr", type=float, default=TTTConfig.lr, help="constant test-time learning rate")
    p.add_argument("--sft-steps", type=int, default=1, help="NTP optimizer steps per batch for sft-ttt")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward: for long prompts (README)")
    p.add_argument("--checkpoint-segment", type=int, metavar="N",
                   help="checkpoint each block on N-token pieces (implies --grad-checkpoint; a multiple of the "
                        "chunk size, e.g. 2048)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast over fp32 weights (adaptation and answers)")
    p.add_argument("--seed", type=int, default=0, help="eval prompts and rollout sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    return p


def adapt(model, optimizer, prompts: torch.Tensor, method: str, cfg: TTTConfig, rcfg, generator) -> int:
    """Update the weights on prompts (B, T) with `method`; returns the number of optimizer steps taken.

    In train mode. "none": no update, 0. "sft-ttt": one ntp_step on each non-empty slice of
    torch.tensor_split(prompts, cfg.sft_steps), so every prompt is in exactly one step. "refine-ttt":
    inner_update(model, optimizer, prompts, "refine", rcfg, generator, cfg.grad_clip)."""
    model.train()  # differentiable fast-weight updates: gradients flow through the prompt's recurrent state
    if method == "refine-ttt":
        return len(inner_update(model, optimizer, prompts, "refine", rcfg, generator, cfg.grad_clip))
    if method == "sft-ttt":
        rows = [r for r in torch.tensor_split(prompts, cfg.sft_steps) if len(r)]
        return len([ntp_step(model, optimizer, r, cfg.grad_clip) for r in rows])
    return 0


def run_method(ckpt: dict, examples: list, method: str, mode: str, cfg: TTTConfig, batch_size: int, seed: int,
               device, on_batch=None) -> tuple[list[float], int]:
    """Score `examples` batch by batch after adapting on each batch. Returns (per-example scores, optimizer steps).

    One model from the checkpoint (with apply_compute_settings), one make_optimizer(model, cfg), rcfg from
    cfg.refine. Batch b = examples[b·batch_size:(b+1)·batch_size], prompts (B, T) their prompt_ids: under mode
    "reset" (b > 0) first the checkpoint's weights and a fresh optimizer ("cumulative" keeps both), then
    adapt(..., step_generator(seed, b, 1, device)), then score_examples on the batch with the adapted weights.
    on_batch(b, model), if given, is called right before batch b is adapted, after any reset (tests inspect the
    weights there)."""
    model = model_from_checkpoint(ckpt, device)
    apply_compute_settings(model, cfg)  # ValueError for a bad segment
    initial = {name: t.detach().clone() for name, t in model.state_dict().items()}
    optimizer = make_optimizer(model, cfg)
    rcfg = refine_config(dict(cfg.refine))
    scores, steps = [], 0
    for b in range(0, len(examples), batch_size):
        batch = examples[b:b + batch_size]
        if mode == "reset" and b > 0:  # episodic: the checkpoint's weights and a fresh optimizer for every batch
            model.load_state_dict(initial)
            optimizer = make_optimizer(model, cfg)
        if on_batch is not None:
            on_batch(b // batch_size, model)
        prompts = torch.tensor([ex.prompt_ids for ex in batch], dtype=torch.long, device=device)  # (B, T)
        steps += adapt(model, optimizer, prompts, method, cfg, rcfg, step_generator(seed, b // batch_size, 1, device))
        scores += score_examples(model, batch, device)  # greedy, with the adapted weights
    return scores, steps


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        if args.task not in TASKS:
            raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("samples", "batch_size", "sft_steps", "length", "checkpoint_segment"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.samples % args.batch_size:  # whole batches only, as the official loader (drop_last=True)
            raise ValueError(f"--samples ({args.samples}) must be a multiple of --batch-size ({args.batch_size})")
        check_lr(args.lr)
        if args.sft_steps > args.batch_size:
            raise ValueError(f"--sft-steps ({args.sft_steps}) cannot exceed --batch-size ({args.batch_size}): "
                             f"each step takes at least one prompt")
        device = pick_device(args.device)
        if device.type == "cpu":
            keep_freed_memory()  # no page-faulting the same big tensors back in every step (common.py)
        set_seed(args.seed)
        ckpt = load_checkpoint(args.ckpt, vocab=tokenizer.vocab_size())
        length = args.length or checkpoint_seq_len(ckpt)
        try:  # name the length: without --length it is the checkpoint's, which the user never typed
            check_length(args.task, length, name="--length" if args.length else "the checkpoint's seq_len")
        except ValueError as e:
            raise ValueError(f"{e}{'' if args.length else '; pass a longer --length'}") from None
        check_prompt_budget(args.samples, length, "--samples and --length")
        examples = make_task_examples(args.task, args.samples, length, None, args.seed, split="eval")
        cfg = TTTConfig(lr=args.lr, sft_steps=args.sft_steps, grad_checkpoint=args.grad_checkpoint,
                        checkpoint_segment=args.checkpoint_segment or 0, precision=args.precision)
        mixer = ckpt["model_config"].get("mixer")
        label = "weights carried across batches, as the official code" if args.mode == "cumulative" \
            else "weights reset before every batch"
        print(f"tta: {args.ckpt} ({mixer}), task {args.task}, {len(examples)} eval-split prompts of {length} tokens, "
              f"batches of {args.batch_size}, lr {args.lr}, mode {args.mode} ({label})")
        results = {}
        for method in METHODS:
            scores, steps = run_method(ckpt, examples, method, args.mode, cfg, args.batch_size, args.seed, device)
            results[method] = {"score": round(100 * sum(scores) / len(scores), 1), "optimizer_steps": steps}
            print(f"  {method:<11} score {results[method]['score']:5.1f}   optimizer steps {steps}")
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    except FloatingPointError as e:  # NaN logits or weights while adapting or scoring
        fail(f"{e}; nothing was written")
    except (MemoryError, RuntimeError) as e:
        fail(out_of_memory(e, "try a smaller --batch-size or --length"))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", code=130)
    base = results["none"]["score"]
    print(f"refine-ttt vs none: {results['refine-ttt']['score'] - base:+.1f}   "
          f"vs sft-ttt: {results['refine-ttt']['score'] - results['sft-ttt']['score']:+.1f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
