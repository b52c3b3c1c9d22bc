"""The REFINE training regimes: mid-training on long documents, and (in posttrain.py) nested post-training.

Question answered: around one `refine_step`, what does each regime feed it, which optimizer and LR does it use, what
is the matched NTP-only baseline, and how does a run log, checkpoint, resume and fail?

method.md §1.9 (the whole step), §2 (hyper-parameters), §3 (what differs per regime), §8.3 (step counts), §9.
- mid (`--objective refine`, the default): long documents from the corpus (the built-in synthetic one, or --data);
  every batch is one §1.9 loop: entropy selection, c*n rollouts of k tokens, cosine reward, GRPO + NTP. λ_NTP 1,
  λ_RL 0.2, c 8, k 5, n 1, PPO ε 0.2 (paper §2 defaults; RefineConfig owns them). Deviation: one optimizer step per
  batch (RefineConfig.schedule "single", on-policy, no separate rollout pass), not the paper's 4 mini-batch steps;
  `--schedule minibatch --minibatches 4` runs the official schedule, where the later mini-batches are slightly
  off-policy and the PPO clip acts (refine.py). The baselines match either count.
- mid `--objective ntp`: the baseline "SFT MidTr": NTP only, on the same rows, with REFINE's number of optimizer
  steps per batch (method.md §8.3 suspects the paper's baselines took fewer); logged as `opt_step`, so it is fair.
- post: see posttrain.py (REFINE on the prompt, then one answer-SFT step; baselines sft / nested-sft).

Optimizer (§2): AdamW β (0.9, 0.999), weight decay 0.01 on matrices, constant LR, no warm-up, grad-norm clip 1.0.
Deviation: verl decays every parameter; we exempt norm gains and other 1-D vectors (the usual LM practice).
Deviation: the paper's LR is 1e-6 (0.76-1.3B models); our ~2M-parameter models (peak LR 3e-3, cosine to 3e-4) would
not move in tens of steps. Mid-training uses 1e-4 (1/3 of the last pre-training LR), post-training 3e-5 (--lr): it
teaches no new format (half the pre-training documents are task prompts with answers), and larger LRs undo the base
("What to expect" in the README: MV-NIAH 41 % -> 25 % and MQ-NIAH 50 % -> 25-28 % at 3e-4).

Run folder: config.json (the resolved config), metrics.jsonl (one line per OPTIMIZER step: step = batch index,
opt_step = optimizer steps so far, phase = refine|ntp|sft, lr, refine_step's values; in mid-training every
val_every-th batch's last line also holds val_loss and val_sampled_acc, method.md §3), ckpt.pt (atomic, every
ckpt_every batches and at the end). A non-finite loss stops the run before it saves. --resume is exact on CPU: every
sampler is seeded by (seed, step); the checkpoint holds model, optimizer, step, RNGs and the skipped-step streak.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from refine_mini import tokenizer
from refine_mini.common import (MetricLog, base_checkpoint, checkpoint_seq_len, clock, load_checkpoint, make_generator,
                                run_dir, write_atomic)
from refine_mini.resume import (configure, given_flags, require_ahead, require_same, same_data, saved_config,
                                set_rng_state, trim_log)
from refine_mini.trainer import (apply_compute_settings, clip_and_step, make_optimizer, model_from_checkpoint,
                                 ntp_loss_from_hidden, save_run, skip_streak, validation_metrics)

OBJECTIVES = {"mid": ("refine", "ntp"), "post": ("refine", "nested-sft", "sft")}


@dataclass
class RegimeConfig:
    regime: str = "mid"  # mid | post
    objective: str = "refine"  # mid: refine | ntp; post: refine | nested-sft | sft
    max_steps: int = 20  # batches (train steps); optimizer steps are counted separately (opt_step)
    batch_size: int = 4  # documents (mid) or prompts (post) per batch
    seq_len: int = 0  # tokens per document / prompt; 0 = the base model's pre-training length (512)
    lr: float = 1e-4  # constant LR (see the module docstring for why not the paper's 1e-6)
    weight_decay: float = 0.01  # AdamW, paper Tab. D.1
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # global grad-norm clip (method.md §8.5: the code's 1.0, not the paper's 0.2)
    ckpt_every: int = 10  # batches between checkpoints (and one at the end)
    seed: int = 0  # drives data, rollouts and evaluation sampling
    grad_checkpoint: bool = False  # per-block activation checkpointing: the paper's is on (16K tokens), ours off (512)
    checkpoint_segment: int = 0  # checkpoint each block on pieces of this many tokens (0: whole sequences)
    precision: str = "fp32"  # fp32 | bf16 autocast over fp32 weights (the paper's; FastWeightLM.set_precision)
    data: str | None = None  # mid: the corpus (absolute path; None = built-in); post trains on generated prompts
    data_digest: str | None = None  # mid: a digest of the --data corpus' token rows (resume.same_data)
    refine: dict = field(default_factory=dict)  # RefineConfig overrides (c, k, n, reward, lambda_rl, ...)
    train_tasks: tuple = ("s_niah", "mk_niah", "qa")  # post: TRAINING-split tasks, mixed within each batch
    eval_tasks: tuple = ("s_niah", "qa")  # post: the quick before/after score (EVAL split, greedy)
    eval_samples: int = 16  # post: eval prompts per task
    val_every: int = 10  # mid: batches between validations (the official test_freq=10), plus one before and at the end
    val_batches: int = 2  # mid: fixed val-split batches of batch_size documents (NTP loss, sampled-token accuracy)


def defaults(regime: str) -> RegimeConfig:
    """The default run of each regime, sized so that it finishes in a few minutes on 2 CPU cores."""
    if regime == "mid":
        return RegimeConfig(regime="mid", max_steps=20, batch_size=4, lr=1e-4,
                            refine={"reward": "cosine", "lambda_ntp": 1.0, "lambda_rl": 0.2})
    if regime == "post":
        # 100 batches of a REFINE step on 4x512 prompts + an answer-SFT step: ~1 min on 2 CPU cores
        return RegimeConfig(regime="post", max_steps=100, batch_size=4, lr=3e-5,
                            refine={"reward": "hybrid", "lambda_ntp": 1.0, "lambda_rl": 0.2})
    raise ValueError(f"unknown regime {regime!r}; choose mid or post")


# the flags that set a RegimeConfig field of the same name, and those that set a RefineConfig override
RUN_FLAGS = ("max_steps", "batch_size", "seq_len", "lr", "seed", "grad_checkpoint", "checkpoint_segment", "precision",
             "data", "objective")
REFINE_FLAGS = ("c", "k", "n", "selection", "reward", "schedule", "minibatches", "lambda_rl")


def resolve_config(args) -> RegimeConfig:
    """Regime defaults, then every CLI flag that was given. Raises ValueError on a bad combination."""
    cfg = defaults(args.regime)
    configure(cfg, given_flags(args, RUN_FLAGS))  # --objective too (RegimeConfig's default: refine)
    if cfg.objective not in OBJECTIVES[args.regime]:
        raise ValueError(f"--objective {cfg.objective!r} is not available for --regime {args.regime}; "
                         f"choose one of {', '.join(OBJECTIVES[args.regime])}")
    cfg.refine.update(given := given_flags(args, REFINE_FLAGS))
    schedule = refine_config(dict(cfg.refine)).schedule  # the baselines read only the step count (steps_per_batch)
    unused = [name for name in given if (cfg.objective != "refine" and name not in ("schedule", "minibatches"))
              or (name == "minibatches" and schedule != "minibatch")]
    if unused and not getattr(args, "resume", False):  # a resume's flags restate saved values (Run refuses others)
        raise ValueError(f"--{unused[0].replace('_', '-')} is not used by --objective {cfg.objective} with "
                         f"--schedule {schedule}; leave it out")
    return cfg


def refine_config(overrides: dict):
    """Adapter to refine.py's RefineConfig: its own defaults, then our overrides (unknown names are an error)."""
    from refine_mini.refine import RefineConfig
    names = {f.name for f in fields(RefineConfig)}
    if unknown := sorted(set(overrides) - names):
        raise ValueError(f"RefineConfig has no field(s) {', '.join(unknown)}")
    return RefineConfig(**overrides)


def steps_per_batch(rcfg, batch_size: int) -> int:
    """Optimizer steps refine_step takes on a batch: one per (non-empty) mini-batch (method.md §1.8), else one."""
    return min(rcfg.minibatches, batch_size) if rcfg.schedule == "minibatch" else 1


def step_generator(seed: int, step: int, stream: int = 0, device="cpu") -> torch.Generator:
    """A generator that is a pure function of (seed, step, stream): what makes resume exact."""
    return make_generator(seed * 1_000_003 + step * 16 + stream + 11, torch.device(device))


# ---- the inner update: REFINE or its matched NTP-only baseline ------------------------------------------------

def inner_update(model, optimizer, tokens: torch.Tensor, objective: str, rcfg, generator, grad_clip: float) -> list:
    """One batch of the §1.9 loop on `tokens` (B, T). Returns one metrics dict per optimizer step taken.

    objective "refine": refine.refine_step (selection, rollouts, rewards, GRPO + λ_NTP·NTP, steps), read from refine
    at call time (tests patch it); its dict ("single") or list ("minibatch") comes back as a list, and a non-finite
    `loss`, `ntp_loss` or `policy_loss` in it is a FloatingPointError (check_finite). objective "ntp": the baseline
    with the same rows and the same number of optimizer steps: the batch is cut into steps_per_batch(rcfg, B)
    contiguous mini-batches (REFINE's NTP mini-batches, §1.8) and each gets one ntp_step. Another is a ValueError.
    """
    if objective == "refine":
        from refine_mini.refine import refine_step
        metrics = refine_step(model, optimizer, tokens, rcfg, generator, grad_clip)
        metrics = metrics if isinstance(metrics, list) else [metrics]
        for m in metrics:
            check_finite(m, ("ntp_loss", "policy_loss", "loss"))
        return metrics
    if objective == "ntp":
        n_steps = steps_per_batch(rcfg, len(tokens))
        return [ntp_step(model, optimizer, rows, grad_clip) for rows in torch.tensor_split(tokens, n_steps)]
    raise ValueError(f"unknown inner objective {objective!r}")


def ntp_step(model, optimizer, tokens: torch.Tensor, grad_clip: float) -> dict:
    """One optimizer step of plain next-token prediction on tokens (B, T)."""
    t0 = clock(tokens.device)
    loss = ntp_loss_from_hidden(model, model.encode(tokens)[0], tokens)  # hidden (B, T, D), fused head loss
    check_finite({"ntp_loss": loss.item()}, ("ntp_loss",))
    loss.backward()
    return {"ntp_loss": loss.item(), "grad_norm": clip_and_step(model, optimizer, grad_clip),
            "tokens_per_s": tokens.numel() / (clock(tokens.device) - t0)}


def check_finite(metrics: dict, keys) -> None:
    for key in keys:
        if (value := metrics.get(key)) is not None and not math.isfinite(float(value)):
            raise FloatingPointError(f"non-finite {key} ({value}); stopping")


# ---- run plumbing shared by mid and post ------------------------------------------------------------------------

class Run:
    """Model + optimizer + log + checkpointing of one regime run (start, resume, per-step logging, save)."""

    def __init__(self, args, cfg: RegimeConfig, out: Path, device):
        self.cfg, self.out, self.device = cfg, out, device
        resume = getattr(args, "resume", False) and (out / "ckpt.pt").exists()
        early = refine_config(dict(cfg.refine))  # bad flags fail now, not after base_checkpoint pre-trains a base
        if cfg.seq_len and cfg.objective == "refine":
            early.check_length(cfg.seq_len)
        start = out if resume else base_checkpoint(args, device)
        if not resume and Path(start).resolve() in (out.resolve(), (out / "ckpt.pt").resolve()):  # start() deletes it
            raise ValueError(f"--init {start} is the checkpoint in --out {out}: a fresh run (--overwrite) there would "
                             f"delete the checkpoint the run starts from; choose another --out")
        ckpt = load_checkpoint(start, expect_mixer=args.model, for_resume=resume, vocab=tokenizer.vocab_size())
        if resume:  # the run's own settings; a flag given again must restate them (resume.py)
            configure(cfg, given_flags(args, RUN_FLAGS), saved_config(ckpt, cfg.regime, out))
            saved_refine = asdict(refine_config(dict(cfg.refine)))
            for name, value in given_flags(args, REFINE_FLAGS).items():
                require_same(name, value, saved_refine[name])
        cfg.seq_len = cfg.seq_len or checkpoint_seq_len(ckpt)
        self.model = model_from_checkpoint(ckpt, device).train()
        apply_compute_settings(self.model, cfg)  # ValueError for a bad segment or precision
        self.optimizer = make_optimizer(self.model, cfg)  # AdamW (β1, β2), decay on matrices, constant LR
        self.rcfg = refine_config(dict(cfg.refine))
        if cfg.objective == "refine":  # c prefix ends, each with k rollout tokens after it, in one document or prompt
            self.rcfg.check_length(cfg.seq_len)
        self.step, self.opt_steps, self.skipped, self.extra = 0, 0, 0, {}
        if resume:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
            self.step, self.opt_steps, self.extra = ckpt["step"], ckpt.get("opt_steps", 0), ckpt.get("extra", {})
            self.skipped = ckpt.get("skipped", 0)  # a streak of skipped steps goes on across a resume
            if getattr(args, "init", None):  # the base is part of the run: restated, or refused
                require_same("init", str(Path(args.init).resolve()), self.extra.get("init"))
            require_ahead(cfg.max_steps, self.step, out)
            print(f"resuming {out} at step {self.step} ({self.opt_steps} optimizer steps)")
        else:
            self.extra["init"] = str(Path(start).resolve())  # the base checkpoint, kept through every resume
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr  # constant schedule (method.md §2), also after loading a pre-training optimizer
        self.resume, self.log = resume, None

    def start(self) -> None:
        """Write config.json, open metrics.jsonl; called once every input is checked (bad input writes nothing)."""
        cfg, resume, out = self.cfg, self.resume, self.out
        resolved = {"regime": cfg.regime, "model": asdict(self.model.cfg), "run": asdict(cfg),
                    "refine": asdict(self.rcfg), "init": self.extra.get("init"),
                    "refine_steps_per_batch": steps_per_batch(self.rcfg, cfg.batch_size)}
        if resume:  # the log first: one that cannot be trimmed or opened stops the run before config.json changes
            trim_log(out / "metrics.jsonl", self.step)  # lines a killed run logged after its last checkpoint
        else:  # a fresh run (--overwrite): never the old checkpoint beside the new config and log
            run_dir(out)  # the folder is made now, with every input checked (train.py only checked it can be)
            (out / "ckpt.pt").unlink(missing_ok=True)
        self.log = MetricLog(out / "metrics.jsonl", append=resume)
        print("config: " + json.dumps(resolved))
        write_atomic(out / "config.json", lambda f: f.write(json.dumps(resolved, indent=2).encode()))

    def record(self, phase: str, metrics: dict) -> None:
        """One JSONL line per optimizer step (none for the step that ends a run of skipped ones, skip_streak)."""
        self.skipped = skip_streak(self.skipped, metrics.get("grad_norm"))
        self.opt_steps += 1
        line = {"step": self.step + 1, "opt_step": self.opt_steps, "phase": phase, "lr": self.cfg.lr}
        line.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()
                     if isinstance(v, (int, float, str, bool))})
        self.log.write(**line)

    def end_step(self) -> None:
        self.step += 1
        if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.max_steps:
            self.save()

    def save(self) -> None:
        save_run(self.out, self.model, self.optimizer, self.step, self.model.cfg, self.cfg, self.cfg.regime,
                 opt_steps=self.opt_steps, skipped=self.skipped, objective=self.cfg.objective, extra=self.extra)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def run_regime(args, out: Path, device) -> dict:
    """train.py's entry for --regime mid|post."""
    cfg = resolve_config(args)
    if cfg.regime == "post":
        from refine_mini.posttrain import run_post
        return run_post(args, cfg, out, device)
    return run_mid(args, cfg, out, device)


def run_mid(args, cfg: RegimeConfig, out: Path, device) -> dict:
    """Mid-training: the §1.9 loop (or its NTP baseline) on corpus documents of cfg.seq_len tokens."""
    from tqdm import tqdm

    from refine_mini.data import make_corpus
    run = Run(args, cfg, out, device)
    # user documents of >= T tokens, each truncated to its first T (method.md §3, §9), never packed together
    corpus = make_corpus(cfg.data, cfg.seq_len, seed=cfg.seed, mode="filter")
    cfg.data_digest = same_data(cfg.data_digest, corpus)  # a resume refuses a --data file edited since the start
    run.start()  # only now, with every input checked, is anything in `out` written
    val = [b.to(device) for b in corpus.val_batches(cfg.batch_size)[:cfg.val_batches]]  # fixed val-split rows
    if not val:
        print(f"note: no validation document of >= {cfg.seq_len} tokens; mid-training runs without validation")

    def validate() -> dict:  # the same sampling seed every time, so successive values differ only by the weights
        return validation_metrics(run.model, val, step_generator(cfg.seed, 0, 2, device)) if val else {}
    before = run.extra.get("val_before") or run.extra.setdefault("val_before", validate())  # also once resumed
    print("validation before: " + "  ".join(f"{k}={v:.4f}" for k, v in before.items()))
    bar = tqdm(range(run.step, cfg.max_steps), initial=run.step, total=cfg.max_steps,
               desc=f"mid {cfg.objective} {run.model.cfg.mixer}")
    last = {}
    try:
        for step in bar:
            tokens = corpus.batch(cfg.batch_size, step_generator(cfg.seed, step, 0))  # (B, T), train split
            metrics = inner_update(run.model, run.optimizer, tokens.to(device), cfg.objective, run.rcfg,
                                   step_generator(cfg.seed, step, 1, device), cfg.grad_clip)
            if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.max_steps:
                metrics[-1].update(validate())  # logged on the batch's last optimizer-step line
            for m in metrics:
                run.record(cfg.objective, m)
            last = {**last, **metrics[-1]}
            bar.set_postfix(ntp=f"{last.get('ntp_loss', float('nan')):.3f}", opt_steps=run.opt_steps)
            run.end_step()
    finally:
        run.close()
    summary = {"steps": run.step, "optimizer_steps": run.opt_steps, "ntp_loss": last.get("ntp_loss"),
               **{f"{k}_before": v for k, v in before.items()},
               **{k: last[k] for k in ("val_loss", "val_sampled_acc") if k in last}}
    print(f"done: {out}/ckpt.pt  " + "  ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
