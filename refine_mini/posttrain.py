"""Nested REFINE post-training (method.md §3 "PostTr", §1.9 item 7), its two baselines, and the quick task score.

Question answered: how does post-training interleave REFINE on the prompt with supervised learning of the answer,
and did it help on held-out (eval-split) prompts?

Each batch of B training prompts (all exactly T tokens, T = the base model's pre-training length by default):
  (a) inner loop: the §1.9 REFINE loop on the PROMPTS only (NTP over prompt tokens, rollouts from prompt positions,
      hybrid reward R^φ + R^bin, λ_NTP 1, λ_RL 0.2) -- refine_step's own optimizer step(s) on the shared weights;
  (b) outer step: ONE AdamW step of answer SFT on prompt ⊕ target, cross-entropy on the target tokens only, mean
      over all target tokens of the batch. No inner/outer weight copy (sequential "nested" updating, not MAML).
Objectives: refine = (a) + (b); nested-sft = (a) with NTP only (same rows and number of steps as REFINE) + (b);
sft = (b) only, repeated steps_per_batch + 1 times on the batch so that every objective takes the SAME number of
optimizer steps (method.md §8.3 says the paper's baselines probably took fewer; we match and log `opt_step`).

Deviations from the paper:
- Tasks: our synthetic RULER-style S-NIAH, MK-NIAH and one-hop multi-doc QA (niah.py, qa.py), TRAINING split
  (keys, values and entities are partitioned by split, so no eval item is ever trained on), instead of the 1600
  SQuAD/HotpotQA RULER prompts; B 4 instead of 64, 100 batches, prompts of 512 tokens instead of 8K.
- The SFT target is Example.target, " <answer>\\n": answers[0]-style text plus the newline that ends every answer
  in our prompt format (the paper appends no EOS; our evaluation stops at the first newline, which plays EOS's role).
  Prompt and target are tokenised separately, as in the paper; rows are right-padded, never left-padded.
- The answer-SFT loss is ONE token mean over the whole batch's targets (the paper: per micro-batch of 2), and
  targets are not cut to 32 tokens (ours are far shorter).
- Without --init, post-training starts from the NTP pre-trained base (runs/<model>-pretrain), not from a
  REFINE mid-trained model as the paper's PostTr does (§3); `--init runs/<model>-mid` gives that chain.
- The before/after score is a quick check: eval_samples eval-split prompts per task at the training length, greedy
  decoding until the first newline, scored with the task's metric (NIAH recall, QA substring), in percent, next to
  the teacher-forced NLL of the gold answers (nats per answer token), which moves before the score does.
"""

import json
import random
from pathlib import Path

import torch

from refine_mini import niah, tokenizer
from refine_mini.common import clock, write_atomic
from refine_mini.evaluate import first_line, greedy_outputs
from refine_mini.regimes import RegimeConfig, Run, inner_update, step_generator, steps_per_batch
from refine_mini.selection import eval_mode
from refine_mini.trainer import IGNORE, clip_and_step, next_token_targets  # IGNORE: labels of non-answer tokens


def train_batch(tasks, batch_size: int, length: int, seed: int, step: int) -> list:
    """The B training-split examples of batch `step`; row r cycles through `tasks`. A pure function of its args."""
    examples = []
    for r in range(batch_size):
        i = step * batch_size + r
        task = tasks[i % len(tasks)]
        rng = random.Random(f"post|{task}|{seed}|{length}|{i}")
        examples.append(niah.make_example(task, length, rng.random(), rng, split="train"))
    return examples


def answer_batch(examples, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """prompt ⊕ target ids, right-padded -> (tokens (B, T), labels (B, T)); labels are IGNORE except on targets."""
    rows = [(list(ex.prompt_ids), tokenizer.encode(ex.target)) for ex in examples]
    width = max(len(p) + len(a) for p, a in rows)
    tokens = torch.full((len(rows), width), tokenizer.eot_id(), dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    for i, (prompt, answer) in enumerate(rows):
        tokens[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    return tokens.to(device), labels.to(device)


def answer_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over answer tokens only: position p predicts labels[:, p+1] (next_token_targets of the labels), through
    the model's fused head loss: no (B, T, V) logits."""
    hidden, _ = model.encode(tokens)  # (B, T, D)
    targets = next_token_targets(labels)  # (B, T): labels shifted left, IGNORE on prompt tokens and at the end
    summed, _, _ = model.head_loss(hidden, targets)
    return summed / (targets != IGNORE).sum()


def sft_step(model, optimizer, examples, grad_clip: float, device) -> dict:
    """One optimizer step of answer SFT on `examples` (method.md §3 (b)): answer_loss on answer_batch(examples,
    device), backward, clip_and_step; a non-finite loss is a FloatingPointError. -> {"sft_loss": float,
    "grad_norm": float, "answer_tokens": int (answer tokens in the batch), "tokens_per_s": float}."""
    t0 = clock(device)
    tokens, labels = answer_batch(examples, device)
    loss = answer_loss(model, tokens, labels)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite answer-SFT loss ({loss.item()}); stopping")
    loss.backward()
    grad_norm = clip_and_step(model, optimizer, grad_clip)
    return {"sft_loss": loss.item(), "grad_norm": grad_norm, "answer_tokens": int((labels != IGNORE).sum()),
            "tokens_per_s": tokens.numel() / (clock(device) - t0)}


# ---- quick evaluation: greedy answers to eval-split prompts ------------------------------------------------------

@torch.no_grad()
def answer_greedy(model, examples, device) -> list[str]:
    """Greedy answers from the carried state (evaluate.greedy_outputs), cut at the first newline and stripped."""
    with eval_mode(model):
        outputs, _ = greedy_outputs(model, examples, device)
    return [first_line(out) for out in outputs]


def score_examples(model, examples, device) -> list[float]:
    """Per-example task scores in [0, 1] (NIAH recall / QA substring match) of the greedy answers."""
    return [float(niah.score(ex.task, out, ex.answers))
            for ex, out in zip(examples, answer_greedy(model, examples, device))]


@torch.no_grad()
def answer_nll(model, examples, device, batch_size: int = 4) -> float:
    """Teacher-forced NLL of the gold answers (nats per answer token), `batch_size` prompts at a time."""
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            tokens, labels = answer_batch(examples[i:i + batch_size], device)
            n = int((labels != IGNORE).sum())
            total, count = total + answer_loss(model, tokens, labels).item() * n, count + n
    return total / count


def quick_scores(model, tasks, samples: int, length: int, seed: int, device) -> dict:
    """Per task, on `samples` EVAL-split prompts of `length` tokens (uniform needle depths): the percent score of the
    greedy answers, and the answer NLL, which shows what training changed while the score is still 0."""
    scores = {}
    for task in tasks:
        examples = niah.make_task_examples(task, samples, length, None, seed, split="eval")
        per_example = score_examples(model, examples, device)
        scores[task] = {"score": round(100 * sum(per_example) / len(per_example), 1),
                        "answer_nll": round(answer_nll(model, examples, device), 3)}
    return scores


def format_scores(scores: dict) -> str:
    return " ".join(f"{task} {s['score']:.1f} (answer nll {s['answer_nll']:.2f})" for task, s in scores.items())


# ---- the post-training loop -------------------------------------------------------------------------------------

def run_post(args, cfg: RegimeConfig, out: Path, device) -> dict:
    from tqdm import tqdm

    def check_lengths():  # fail now, not at some step
        for split, tasks in (("train", cfg.train_tasks), ("eval", cfg.eval_tasks)):
            for task in tasks:
                niah.check_length(task, cfg.seq_len, split, name="--seq-len")

    if cfg.seq_len:  # given: checked before Run, which may pre-train a base model first
        check_lengths()
    run = Run(args, cfg, out, device)
    check_lengths()  # the length Run settled on (the base's, when --seq-len was not given)
    run.start()  # only now, with every input checked, is anything in `out` written
    inner = {"refine": "refine", "nested-sft": "ntp", "sft": None}[cfg.objective]
    sft_steps = 1 if inner else steps_per_batch(run.rcfg, cfg.batch_size) + 1  # sft: REFINE's step count
    if "before" not in run.extra:
        run.extra["before"] = quick_scores(run.model, cfg.eval_tasks, cfg.eval_samples, cfg.seq_len, cfg.seed, device)
    print(f"score before (eval split, {cfg.eval_samples} prompts/task, {cfg.seq_len} tokens, greedy): "
          f"{format_scores(run.extra['before'])}")
    bar = tqdm(range(run.step, cfg.max_steps), initial=run.step, total=cfg.max_steps,
               desc=f"post {cfg.objective} {run.model.cfg.mixer}")
    sft = {}
    try:
        for step in bar:
            examples = train_batch(cfg.train_tasks, cfg.batch_size, cfg.seq_len, cfg.seed, step)
            if inner:  # (a) REFINE (or NTP) on the prompts only
                prompts = torch.tensor([ex.prompt_ids for ex in examples], dtype=torch.long, device=device)  # (B, T)
                for m in inner_update(run.model, run.optimizer, prompts, inner, run.rcfg,
                                      step_generator(cfg.seed, step, 1, device), cfg.grad_clip):
                    run.record(inner, m)
            for _ in range(sft_steps):  # (b) answer SFT
                sft = sft_step(run.model, run.optimizer, examples, cfg.grad_clip, device)
                run.record("sft", sft)
            bar.set_postfix(sft=f"{sft['sft_loss']:.3f}", opt_steps=run.opt_steps)
            run.end_step()
        after = quick_scores(run.model, cfg.eval_tasks, cfg.eval_samples, cfg.seq_len, cfg.seed, device)
        run.extra["after"] = after
        run.save()
    finally:
        run.close()
    summary = {"objective": cfg.objective, "steps": run.step, "optimizer_steps": run.opt_steps,
               "before": run.extra["before"], "after": after}
    write_atomic(out / "scores.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"done: {out}/ckpt.pt  objective={cfg.objective} steps={run.step} optimizer_steps={run.opt_steps}")
    print(f"score before: {format_scores(run.extra['before'])} | after: {format_scores(after)}")
    return summary
