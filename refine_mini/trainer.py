"""Next-token-prediction pre-training, and the optimizer/checkpoint plumbing every regime shares.

Question answered: how do we get a small pre-trained fast-weight LM to start REFINE from, when nothing can be
downloaded? (method.md §9: "a tiny DeltaNet pre-trained briefly with NTP on a small corpus".)

The loop is the classic one: AdamW, linear warm-up then cosine decay, gradient-norm clipping, a validation loss,
one JSONL metrics line per step, atomic checkpoints. Two properties are load-bearing:
- Resume is exact on CPU: step s's batch comes from a generator seeded by (seed, s), and the checkpoint holds model,
  optimizer, step, RNG states and the run's settings (resume.py): a killed-and-resumed run ends with the same weights.
- A NaN/inf loss stops the run with a message *before* anything is saved, so the last good checkpoint survives.

Deviation: answer-weighted NTP. The built-in corpus asks questions about facts stated earlier (data.py), and the
tokens of each answer (after an "Answer:" cue, up to and including its newline; 5-8 % of tokens) carry
`answer_weight` (100) times the weight of the others in the training loss. With plain NTP they are drowned by filler
the model can predict locally, and the tiny base model never learnt to look anything up: 0 % S-NIAH recall, even at
8x the steps. Answer-weighted and with tied embeddings it recalls 96-100 % at its training length (README). The
price is a worse plain-NTP loss on the filler (validation 0.91 -> 1.07 nats/token). Validation loss stays plain NTP;
the metrics log both the weighted training loss (`loss`) and the plain one (`ntp_loss`). `answer_weight = 1` is NTP.
"""

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from refine_mini.common import (FP32_MAX, CheckpointError, MetricLog, clock, load_checkpoint, run_dir, save_checkpoint,
                                write_atomic)
from refine_mini.head_loss import IGNORE, default_block_rows
from refine_mini.model import FastWeightLM, ModelConfig, sample_token
from refine_mini.resume import configure, require_ahead, rng_state, saved_config, set_rng_state, trim_log
from refine_mini.tokenizer import encode

ANSWER_CUE = encode("Answer:")  # token ids of the cue before every answer (textgen.py), after a newline
NEWLINE = encode("\n")[0]  # ends an answer


@dataclass
class TrainConfig:
    max_steps: int = 300  # optimizer steps
    decay_steps: int = 0  # the cosine's horizon (0: max_steps); pretrain() fixes it at the run's first max_steps
    batch_size: int = 8  # sequences per step
    seq_len: int = 512  # tokens per sequence
    lr: float = 3e-3  # peak learning rate (tiny models from scratch want a large one)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warm-up
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not on norms/biases/vectors)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 50  # steps between validation losses
    eval_batches: int = 4  # validation batches (fixed, drawn once)
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)
    seed: int = 0  # drives the model init, the data stream and every sampler
    compile: bool = False  # torch.compile model.encode (train.py's --compile auto turns it on for CUDA)
    grad_checkpoint: bool = False  # activation checkpointing per block (FastWeightLM.set_checkpointing)
    checkpoint_segment: int = 0  # ... on pieces of this many tokens (0: whole sequences)
    precision: str = "fp32"  # fp32 | bf16 (autocast over fp32 weights, FastWeightLM.set_precision)
    answer_weight: float = 100.0  # loss weight of answer tokens relative to the rest (module docstring); 1 = NTP
    data: str | None = None  # the corpus file or folder (absolute path); None = the built-in one (data.make_corpus)
    data_digest: str | None = None  # a digest of the --data corpus' token rows, checked on resume (resume.same_data)


def apply_compute_settings(model, cfg) -> None:
    """A run config's (TrainConfig, RegimeConfig, TTTConfig) activation checkpointing and precision, set on the model.
    ValueError for a segment that is not a multiple of the chunk size, or an unknown precision."""
    model.set_checkpointing(cfg.grad_checkpoint, cfg.checkpoint_segment)
    model.set_precision(cfg.precision)


MAX_LR = FP32_MAX / 20  # AdamW's first step is lr / (1 - beta1) = 10 lr at beta1 0.9: it must stay finite in fp32


def check_lr(lr: float | None) -> None:
    """--lr > 0 and small enough that AdamW's first step (lr / (1 - beta1)) is finite in float32 (train.py, tta.py)."""
    if lr is not None and not 0 < lr < MAX_LR:
        raise ValueError(f"--lr must be > 0 and below {MAX_LR:.2g} (AdamW divides it by 1 - beta1 in float32), "
                         f"got {lr}")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >=2-D weights only (norm gains, biases and 1-D vectors are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.decay_steps (0: max_steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, (cfg.decay_steps or cfg.max_steps) - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): position t predicts tokens[:, t+1]; the last position has none (IGNORE, so its nll is 0).
    Not a logits[:, :-1] slice: its backward would fill a whole (B, T, V) zero tensor to write the slice into."""
    return F.pad(tokens[:, 1:], (0, 1), value=IGNORE)  # tokens shifted left, ignored at t = T-1


def ntp_loss_from_hidden(model, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the T-1 positions with a target, from the hidden states (B, T, D) through
    the model's fused head loss (head_loss.py): the (B, T, V) logits are never built. What every regime trains on."""
    summed, _, _ = model.head_loss(hidden, next_token_targets(tokens))  # Σ over B·(T-1) positions
    return summed / (tokens.shape[0] * (tokens.shape[1] - 1))


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token CE from full logits (B, T, V), 0 at the last position: what tests hold the fused loss to."""
    nll = F.cross_entropy(logits.flatten(0, 1), next_token_targets(tokens).flatten(), ignore_index=IGNORE,
                          reduction="none")  # (B*T, V) vs (B*T,) -> (B*T,)
    return nll.view(tokens.shape)  # (B*T,) -> (B, T)


def ntp_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the T-1 positions that have a target, from full logits (B, T, V)."""
    return token_nll(logits, tokens)[:, :-1].mean()


def answer_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: tokens[:, t] belongs to an answer, i.e. follows an "Answer:" cue, up to and including the newline
    that ends it. Found from the tokens alone, so every batch, built-in or the user's text, gets the same rule."""
    (B, T), n = tokens.shape, len(ANSWER_CUE)
    if T <= n:
        return torch.zeros_like(tokens, dtype=torch.bool)
    cue = torch.tensor(ANSWER_CUE, device=tokens.device)
    cue_at = (tokens.unfold(1, n, 1) == cue).all(-1)                      # (B, T-n+1): a cue starts at t
    starts = F.pad(cue_at, (n, 0))[:, :T]                                 # (B, T): the first token after a cue
    idx = torch.arange(T, device=tokens.device).expand(B, T)
    last_start = torch.where(starts, idx, -1).cummax(1).values            # latest answer start at or before t
    last_nl = torch.where(tokens == NEWLINE, idx, -1).cummax(1).values
    nl_before = F.pad(last_nl, (1, 0), value=-1)[:, :T]                   # latest newline strictly before t
    return last_start > nl_before                                         # an answer opened and not yet closed


def answer_weights(tokens: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """(B, T) loss weight of position t: answer_weight where its target tokens[:, t+1] is part of an answer, 1
    elsewhere, 0 at the last position (no target)."""
    w = 1.0 + (answer_weight - 1.0) * answer_mask(tokens)[:, 1:].float()  # (B, T-1): weight of target t+1
    return F.pad(w, (0, 1))  # (B, T)


def answer_weighted_loss(nll: torch.Tensor, tokens: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Weighted mean of nll (B, T) over positions with a target, with answer_weights."""
    w = answer_weights(tokens, answer_weight).to(nll.dtype)  # (B, T)
    return (nll * w).sum() / w.sum()


def clip_and_step(model, optimizer, grad_clip: float) -> float:
    """Clip the global grad norm, then step -- unless the norm is not finite, in which case skip the step.
    Weights that the step made non-finite (a learning rate far too large) raise FloatingPointError at once."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if torch.isfinite(grad_norm):
        optimizer.step()
        if not weights_finite(model.state_dict()):
            raise FloatingPointError("an optimizer step made the weights non-finite (is the learning rate too "
                                     "large?); stopping")
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


MAX_SKIPPED_STEPS = 5  # consecutive steps skipped for a non-finite gradient before a run stops


def skip_streak(streak: int, grad_norm: float | None) -> int:
    """Steps skipped in a row (clip_and_step skips a step whose grad norm is not finite), counting this one. One
    skip is a hiccup; a run that keeps skipping has stopped learning (a NaN in the backward), so the
    MAX_SKIPPED_STEPS-th skip in a row raises FloatingPointError instead of letting it go on silently."""
    if grad_norm is None or math.isfinite(grad_norm):
        return 0
    if streak + 1 >= MAX_SKIPPED_STEPS:
        raise FloatingPointError(f"{MAX_SKIPPED_STEPS} optimizer steps in a row had a non-finite gradient norm and "
                                 f"were skipped; stopping")
    return streak + 1


def weights_finite(state_dict: dict) -> bool:
    tensors = [t for t in state_dict.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save_run(out: Path, model, optimizer, step: int, model_cfg: ModelConfig, train_cfg, regime: str, **extra):
    """Atomic checkpoint of a run; never of non-finite weights (the previous checkpoint is kept instead)."""
    if not weights_finite(model.state_dict()):
        raise FloatingPointError(f"non-finite weights at step {step}: not saved")
    save_checkpoint(out / "ckpt.pt", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(),
        "model_config": asdict(model_cfg), "train_config": asdict(train_cfg), "regime": regime, **extra})


def model_from_checkpoint(ckpt: dict, device) -> FastWeightLM:
    """The model a checkpoint (from common.load_checkpoint) holds; CheckpointError if its config or weights are bad."""
    try:
        model = FastWeightLM(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as e:  # bad config fields or values, mismatched keys
        raise CheckpointError(f"the checkpoint's weights do not fit its model config "
                              f"({str(e).splitlines()[0][:120]})") from None
    if not weights_finite(ckpt["model"]):
        raise CheckpointError("the checkpoint holds non-finite (NaN or inf) weights")
    return model.to(device)


@torch.no_grad()
def validation_metrics(model, batches: list[torch.Tensor], generator: torch.Generator | None = None) -> dict:
    """The validation NTP cross-entropy (token mean) and, given a generator, the "accuracy" of mid-training's official
    validation (method.md §3): the fraction of positions where a token SAMPLED at temperature 1 equals the next token
    (not argmax; noisy). Pre-training logs the loss only."""
    was_training = model.training
    model.eval()
    device = batches[0].device if batches else torch.device("cpu")
    nll_sum, hits, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), device=device), 0
    for tokens in batches:  # (B, T)
        hidden = model.encode(tokens)[0][:, :-1].flatten(0, 1)  # (B, T-1, D) -> (B·(T-1), D): predict x_1..x_{T-1}
        targets = tokens[:, 1:].flatten()  # (B·(T-1),)
        block = default_block_rows(tokens.device)  # logits (block, V) at a time, never (B, T, V)
        for h, y in zip(hidden.split(block), targets.split(block)):
            logits = model.head(h)  # (n, D) -> (n, V)
            nll_sum += F.cross_entropy(logits, y, reduction="sum").double()  # summed on the device: no sync
            if generator is not None:
                hits += (sample_token(logits, 1.0, generator) == y).sum()  # (n,) sampled vs next tokens
        count += targets.numel()
    model.train(was_training)
    out = {"val_loss": nll_sum.item() / count}
    return {**out, "val_sampled_acc": hits.item() / count} if generator is not None else out


def pretrain(model_cfg: ModelConfig, cfg: TrainConfig, corpus, out: Path, device, resume: bool = False) -> dict:
    """NTP pre-training. Returns the final metrics. `corpus` is a data.Corpus of cfg.seq_len-token rows."""
    out = run_dir(out)
    torch.manual_seed(cfg.seed)
    model = FastWeightLM(model_cfg).to(device)
    apply_compute_settings(model, cfg)
    optimizer = make_optimizer(model, cfg)
    start, skipped = 0, 0  # skipped: the optimizer steps skipped in a row so far (skip_streak), kept through a resume
    if resume and (out / "ckpt.pt").exists():
        ckpt = load_checkpoint(out, expect_mixer=model_cfg.mixer, for_resume=True)
        saved = saved_config(ckpt, "pretrain", out)
        cfg = replace(cfg, decay_steps=cfg.decay_steps or saved.get("decay_steps") or cfg.max_steps)  # the run's own
        configure(replace(cfg), asdict(cfg), saved)  # ValueError: not this run's cfg
        model.load_state_dict(ckpt["model"])
        if not weights_finite(ckpt["model"]):
            raise CheckpointError(f"checkpoint {out}/ckpt.pt holds non-finite (NaN or inf) weights")
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, skipped = ckpt["step"], ckpt.get("skipped", 0)
        require_ahead(cfg.max_steps, start, out)
        trim_log(out / "metrics.jsonl", start)  # lines a killed run logged after its last checkpoint
        print(f"resuming {out} at step {start}")
    else:  # a fresh run (--overwrite): the folder must never pair the old checkpoint with the new config and log
        (out / "ckpt.pt").unlink(missing_ok=True)
        cfg = replace(cfg, decay_steps=cfg.decay_steps or cfg.max_steps)
    log = MetricLog(out / "metrics.jsonl", append=start > 0)  # first: a log that cannot be opened leaves config.json
    config = {"regime": "pretrain", "model": asdict(model_cfg), "train": asdict(cfg)}
    write_atomic(out / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    encode = torch.compile(model.encode) if cfg.compile else model.encode  # the head's loss runs blockwise, eager
    val = [b.to(device) for b in corpus.val_batches(cfg.batch_size)[:cfg.eval_batches]]
    if not val:
        print(f"note: no validation row of {cfg.seq_len} tokens; pre-training runs without validation")
    metrics = {}
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"pretrain {model_cfg.mixer}")
    try:  # the log is closed however the loop ends (FloatingPointError, Ctrl-C)
        for step in bar:
            t0 = clock(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            tokens = corpus.batch(cfg.batch_size, _step_generator(cfg.seed, step)).to(device)  # (B, T)
            hidden, _ = encode(tokens)  # (B, T, D)
            weights = answer_weights(tokens, cfg.answer_weight)  # (B, T)
            weighted_sum, nll, _ = model.head_loss(hidden, next_token_targets(tokens), weights)  # nll (B, T)
            loss = weighted_sum / weights.sum()  # the answer-weighted mean (answer_weighted_loss, blockwise)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; stopping")
            loss.backward()
            grad_norm = clip_and_step(model, optimizer, cfg.grad_clip)
            skipped = skip_streak(skipped, grad_norm)  # raises after MAX_SKIPPED_STEPS non-finite gradients in a row
            dt = clock(device) - t0
            metrics = {"step": step + 1, "loss": round(loss.item(), 5),
                       "ntp_loss": round(nll[:, :-1].mean().item(), 5), "lr": lr_at(step, cfg),
                       "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens.numel() / dt, 1)}
            if val and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
                metrics["val_loss"] = round(validation_metrics(model, val)["val_loss"], 5)
            log.write(**metrics)
            shown = {"val": metrics["val_loss"]} if "val_loss" in metrics else {}
            bar.set_postfix(loss=f"{loss.item():.3f}", **shown)
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
                save_run(out, model, optimizer, step + 1, model_cfg, cfg, "pretrain", skipped=skipped)
    finally:
        log.close()
    return metrics


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The data generator of one step: a pure function of (seed, step), which is what makes resume exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
