"""Contracts of the regimes (method.md §2, §3, §8.3; regimes.py, posttrain.py, tta.py docstrings; README "Errors"):
defaults, flags, fresh batches, the matched NTP baseline, non-finite losses, checkpoint cadence and exact resume, the
post-training score, and the three TTT methods. Each test was written to kill a mutant that the rest of the suite let
through (a mutation-testing round); the mutant is named in its docstring."""
import json

import pytest
import torch

import train
import tta
from refine_mini import posttrain, regimes
from refine_mini.common import load_checkpoint
from refine_mini.model import FastWeightLM
from refine_mini.niah import make_task_examples
from tests.test_regimes import LENGTH, run_cli, small_defaults, tiny_ckpt, tiny_model_cfg  # noqa: F401 (fixtures)
from tests.test_train import Killed


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_model():
    torch.manual_seed(0)
    return FastWeightLM(tiny_model_cfg())


# ---- regimes.py: defaults, flags, seeding ----------------------------------------------------------------------

def test_regime_defaults_are_the_papers_per_regime_hyper_parameters():
    """method.md §2: mid = cosine reward, λ_RL 0.2; post = hybrid, λ_RL 0.2; both λ_NTP 1, c 8, k 5, n 1, and the
    LRs the regimes docstring documents (mid 1e-4, post 3e-5). Kills R02 (post cosine), R03 (mid λ_RL 0.4)."""
    expected = {"mid": ("cosine", 1e-4), "post": ("hybrid", 3e-5)}
    for regime, (reward, lr) in expected.items():
        cfg = regimes.resolve_config(train.build_parser().parse_args(["--model", "deltanet", "--regime", regime]))
        rcfg = regimes.refine_config(dict(cfg.refine))
        assert (rcfg.reward, rcfg.lambda_rl, rcfg.lambda_ntp, rcfg.c, rcfg.k, rcfg.n) == (reward, 0.2, 1.0, 8, 5, 1)
        assert cfg.lr == lr


def test_lr_flag_sets_the_regime_learning_rate(tmp_path, tiny_ckpt, small_defaults):  # noqa: F811
    """regimes docstring: the regime LR is set by --lr; the log's lr and config.json show it. Kills R01."""
    lines = run_cli(tmp_path, "mid", "ntp", tiny_ckpt, steps=1, extra=["--lr", "0.0005"])
    assert lines and all(line["lr"] == 0.0005 for line in lines)
    assert json.loads((tmp_path / "mid-ntp" / "config.json").read_text())["run"]["lr"] == 0.0005


def test_step_generators_differ_for_every_seed_step_and_stream():
    """--seed drives data and rollouts (RegimeConfig.seed), and each (seed, step, stream) is its own stream: no two
    of a small grid give the same first draw. Kills R05 (seed ignored)."""
    draws = {(seed, step, stream): torch.randint(0, 2 ** 62, (1,), generator=regimes.step_generator(seed, step,
                                                                                                     stream)).item()
             for seed in range(3) for step in range(20) for stream in range(3)}
    assert len(set(draws.values())) == len(draws)


def test_mid_training_draws_a_fresh_batch_every_step(tmp_path, tiny_ckpt, small_defaults, monkeypatch):  # noqa: F811
    """Every batch is seeded by (seed, step) and training documents are generated on the fly, so training never
    repeats a document (data.py docstring): batch 2 shares no row with batch 1. Kills R23 (same batch every step)."""
    seen, real = [], regimes.inner_update
    monkeypatch.setattr(regimes, "inner_update", lambda model, opt, tokens, *a: seen.append(tokens.clone()) or
                        real(model, opt, tokens, *a))
    run_cli(tmp_path, "mid", "ntp", tiny_ckpt, steps=2)
    assert len(seen) == 2
    assert not {tuple(r) for r in seen[0].tolist()} & {tuple(r) for r in seen[1].tolist()}


# ---- regimes.py: the NTP baseline ---------------------------------------------------------------------------------

def test_ntp_baseline_steps_on_refines_contiguous_mini_batches(monkeypatch):
    """inner_update "ntp": the batch is cut into steps_per_batch contiguous mini-batches (REFINE's NTP mini-batches,
    method.md §1.8) and each gets ONE step -- same rows, same count. Kills R07 (every step on the whole batch)."""
    calls, real = [], regimes.ntp_step
    monkeypatch.setattr(regimes, "ntp_step", lambda model, opt, rows, clip: calls.append(rows.clone()) or
                        real(model, opt, rows, clip))
    model = tiny_model()
    tokens = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(0))
    rcfg = regimes.refine_config({"schedule": "minibatch", "minibatches": 2})
    metrics = regimes.inner_update(model, torch.optim.AdamW(model.parameters(), 1e-3), tokens, "ntp", rcfg, None, 1.0)
    assert len(metrics) == len(calls) == 2
    assert torch.equal(calls[0], tokens[:2]) and torch.equal(calls[1], tokens[2:])


def test_ntp_baseline_matches_refine_when_the_batch_is_smaller_than_the_mini_batch_count(tmp_path, tiny_ckpt,
                                                                                        small_defaults):  # noqa: F811
    """REFINE takes one step per NON-EMPTY mini-batch (min(minibatches, B), refine_step); the NTP baseline must take
    the same number (method.md §8.3), here 2 with B 2 and --minibatches 4. Kills R04."""
    counts = {obj: len(run_cli(tmp_path, "mid", obj, tiny_ckpt, steps=1, extra=["--minibatches", "4"]))
              for obj in ("refine", "ntp")}
    assert counts == {"refine": 2, "ntp": 2}
    assert json.loads((tmp_path / "mid-ntp" / "config.json").read_text())["refine_steps_per_batch"] == 2


# ---- regimes.py: non-finite losses --------------------------------------------------------------------------------

def test_a_non_finite_refine_loss_raises(monkeypatch):
    """README "Errors": a non-finite loss stops the run (FloatingPointError) -- not a silently skipped step.
    Kills R08 (REFINE branch unchecked)."""
    from refine_mini import refine
    real = refine.refine_loss

    def nan_loss(*a, **k):
        loss, stats = real(*a, **k)
        return loss * float("nan"), {**stats, "loss": float("nan"), "ntp_loss": float("nan")}
    monkeypatch.setattr(refine, "refine_loss", nan_loss)
    model = tiny_model()
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    rcfg = regimes.refine_config({"c": 2, "k": 3})
    with pytest.raises(FloatingPointError, match="non-finite"):
        regimes.inner_update(model, torch.optim.AdamW(model.parameters(), 1e-3), tokens, "refine", rcfg,
                             torch.Generator().manual_seed(0), 1.0)


def test_a_non_finite_ntp_loss_raises(monkeypatch):
    """The NTP baseline step raises on a NaN loss too (README "Errors"). Kills R09."""
    model = tiny_model()
    real_encode = FastWeightLM.encode
    monkeypatch.setattr(FastWeightLM, "encode", lambda self, tokens, state=None: (
        lambda out: (out[0] * float("nan"), out[1]))(real_encode(self, tokens, state)))
    tokens = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="non-finite"):
        regimes.ntp_step(model, torch.optim.AdamW(model.parameters(), 1e-3), tokens, 1.0)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_check_finite_rejects_infinities_as_well_as_nan(value):
    """"non-finite" means NaN or ±inf (README "Errors"); finite values and absent keys pass. Kills R10."""
    regimes.check_finite({"loss": 1.0}, ("loss", "absent"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        regimes.check_finite({"loss": value}, ("loss",))


# ---- regimes.py: checkpoint cadence and exact resume --------------------------------------------------------------

@pytest.fixture
def ckpt_every_2(small_defaults, monkeypatch):  # noqa: F811
    real = regimes.defaults

    def every_2(regime):
        cfg = real(regime)
        cfg.ckpt_every = 2
        return cfg
    monkeypatch.setattr(regimes, "defaults", every_2)


def killed_in_batch(batch: int, run, monkeypatch) -> None:
    """Call run() with regimes.inner_update dying (Killed) in its batch-th call; the real one is back afterwards."""
    real, calls = regimes.inner_update, []

    def dies(*a):
        calls.append(1)
        if len(calls) == batch:
            raise Killed
        return real(*a)
    monkeypatch.setattr(regimes, "inner_update", dies)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(regimes, "inner_update", real)


def test_a_killed_mid_run_resumes_exactly(tmp_path, tiny_ckpt, ckpt_every_2, monkeypatch):  # noqa: F811
    """Checkpoint every ckpt_every batches; a run killed in batch 4 (checkpoint at batch 2, batch 3 already logged)
    resumes with --resume to the uninterrupted run's weights, drops batch 3's stale lines, and keeps counting
    optimizer steps (regimes docstring, README "Errors"). Kills R12 (optimizer not restored), R13 (opt_step restarts),
    R14 (cadence off by one), R16 (one batch of stale lines kept), R17 (0-based step in the log)."""
    args = lambda out, *extra: ["--model", "deltanet", "--regime", "mid", "--objective", "refine", "--init",
                                str(tiny_ckpt), "--out", str(out), "--seq-len", str(LENGTH), "--max-steps", "4",
                                *extra]
    train.main(args(tmp_path / "full"))
    killed_in_batch(4, lambda: train.main(args(tmp_path / "killed")), monkeypatch)
    assert load_checkpoint(tmp_path / "killed")["step"] == 2
    train.main(args(tmp_path / "killed", "--resume"))
    expected = [(1, 1), (1, 2), (2, 3), (2, 4), (3, 5), (3, 6), (4, 7), (4, 8)]  # 2 REFINE mini-batch steps a batch
    for run in ("full", "killed"):
        assert [(line["step"], line["opt_step"]) for line in jsonl(tmp_path / run / "metrics.jsonl")] == expected
    full, resumed = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert resumed["step"] == full["step"] == 4 and resumed["opt_steps"] == full["opt_steps"] == 8
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


# ---- posttrain.py -------------------------------------------------------------------------------------------------

def test_post_training_batches_are_fresh_training_prompts():
    """train_batch(step) is batch `step` of a stream of training-split prompts: different steps never repeat a
    prompt (the paper makes one pass over its 1600 training prompts). Kills P02 (same examples every step)."""
    prompts = [tuple(ex.prompt_ids) for step in range(5)
               for ex in posttrain.train_batch(("s_niah", "qa"), 4, LENGTH, seed=0, step=step)]
    assert len(set(prompts)) == len(prompts) == 20


def test_quick_score_is_taken_on_eval_split_prompts():
    """posttrain docstring: the before/after score uses eval_samples EVAL-split prompts per task; recomputed here from
    the eval-split examples with the same scorer and NLL. Kills P08 (training split)."""
    model = tiny_model()
    scores = posttrain.quick_scores(model, ("s_niah", "qa"), 2, LENGTH, 0, "cpu")
    for task in ("s_niah", "qa"):
        examples = make_task_examples(task, 2, LENGTH, None, 0, split="eval")
        per_example = posttrain.score_examples(model, examples, "cpu")
        assert scores[task] == {"score": round(100 * sum(per_example) / len(per_example), 1),
                                "answer_nll": round(posttrain.answer_nll(model, examples, "cpu"), 3)}


def test_a_resumed_post_run_keeps_the_score_of_the_base_model(tmp_path, tiny_ckpt, small_defaults):  # noqa: F811
    """"before" is the base model's score, measured once before training; a resumed run keeps it instead of
    re-measuring the partly trained weights. Kills P09."""
    common = ["--model", "deltanet", "--regime", "post", "--init", str(tiny_ckpt), "--out", str(tmp_path / "post"),
              "--seq-len", str(LENGTH), "--lr", "0.01"]
    first = train.main([*common, "--max-steps", "1"])
    resumed = train.main([*common, "--max-steps", "2", "--resume"])
    assert first["after"] != first["before"]  # training moved the answer NLL, so a re-measured "before" would differ
    assert resumed["before"] == first["before"]
    assert json.loads((tmp_path / "post" / "scores.json").read_text())["before"] == first["before"]


def test_nested_sft_inner_loop_is_ntp_only(tmp_path, tiny_ckpt, small_defaults):  # noqa: F811
    """method.md §3: "Nested SFT" = the inner loop with NTP only (no rollouts, no policy loss), then the answer-SFT
    step. Kills P10 (nested-sft runs REFINE)."""
    lines = run_cli(tmp_path, "post", "nested-sft", tiny_ckpt, steps=1)
    assert [line["phase"] for line in lines] == ["ntp", "ntp", "sft"]
    assert not any("policy_loss" in line for line in lines)


# ---- tta.py -------------------------------------------------------------------------------------------------------

def adapted_weights(ckpt, examples, mode, cfg, monkeypatch):
    """run_method's weights right after each batch's adaptation (captured where the batch is scored)."""
    seen = []

    def record(model, batch, device):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return [0.0] * len(batch)
    monkeypatch.setattr(tta, "score_examples", record)
    tta.run_method(ckpt, examples, "sft-ttt", mode, cfg, 2, 0, "cpu")
    return seen


def test_tta_reset_adapts_each_batch_as_if_it_were_the_first(tiny_ckpt, monkeypatch):  # noqa: F811
    """reset: the checkpoint's weights AND a fresh optimizer before every batch (tta docstring), so batch 2 ends
    exactly where a run on batch 2 alone ends; cumulative carries the optimizer state too, so it differs. Kills T02
    (reset keeps the optimizer state)."""
    ckpt = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    examples = make_task_examples("s_niah", 4, LENGTH, None, 0, split="eval")
    cfg = tta.TTTConfig(lr=1e-2)
    reset = adapted_weights(ckpt, examples, "reset", cfg, monkeypatch)
    alone = adapted_weights(ckpt, examples[2:], "reset", cfg, monkeypatch)
    assert all(torch.equal(reset[1][k], alone[0][k]) for k in alone[0])
    cumulative = adapted_weights(ckpt, examples, "cumulative", cfg, monkeypatch)
    assert not all(torch.equal(cumulative[1][k], alone[0][k]) for k in alone[0])


def test_refine_ttt_runs_the_refine_loop_with_the_ttt_hyper_parameters(tiny_ckpt, monkeypatch):  # noqa: F811
    """method.md §2/§3 TTT: the §1.9 loop on each batch's prompts with the binary reward, λ_NTP 1, λ_RL 0.4, c 8,
    k 5, n 1, 2 mini-batches. Kills T05 (λ_RL 0.2), T06 (hybrid reward), T09 (NTP only, same step count)."""
    from refine_mini import refine
    seen = []

    def fake_refine_step(model, optimizer, tokens, rcfg, generator, grad_clip):
        seen.append((tokens.clone(), rcfg))
        return [{"loss": 0.0}, {"loss": 0.0}]
    monkeypatch.setattr(refine, "refine_step", fake_refine_step)
    ckpt = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    examples = make_task_examples("s_niah", 4, LENGTH, None, 0, split="eval")
    _, steps = tta.run_method(ckpt, examples, "refine-ttt", "cumulative", tta.TTTConfig(), 2, 0, "cpu")
    assert len(seen) == 2 and steps == 4
    for b, (tokens, rcfg) in enumerate(seen):
        assert tokens.tolist() == [ex.prompt_ids for ex in examples[2 * b:2 * b + 2]]
        assert (rcfg.reward, rcfg.lambda_ntp, rcfg.lambda_rl) == ("binary", 1.0, 0.4)
        assert (rcfg.c, rcfg.k, rcfg.n, rcfg.schedule, rcfg.minibatches) == (8, 5, 1, "minibatch", 2)


@pytest.mark.parametrize("sft_steps", [1, 2])
def test_sft_ttt_steps_cover_every_prompt_of_the_batch(tiny_ckpt, monkeypatch, sft_steps):  # noqa: F811
    """SFT-TTT: one-step NTP over ALL the batch's prompts (method.md §3); with --sft-steps N the prompts are split
    among N steps, each prompt in exactly one. Kills T10 (steps on one prompt only). The spy counts ntp_step
    whether tta calls it itself or through regimes.inner_update "ntp"."""
    rows, real = [], regimes.ntp_step
    for owner in (tta, regimes):
        monkeypatch.setattr(owner, "ntp_step",
                            lambda model, opt, r, clip: rows.append(r.clone()) or real(model, opt, r, clip))
    ckpt = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    examples = make_task_examples("s_niah", 2, LENGTH, None, 0, split="eval")
    _, steps = tta.run_method(ckpt, examples, "sft-ttt", "cumulative", tta.TTTConfig(sft_steps=sft_steps), 2, 0,
                              "cpu")
    assert steps == len(rows) == sft_steps
    assert torch.cat(rows).tolist() == [ex.prompt_ids for ex in examples]


def test_tta_cli_sft_steps_sets_the_sft_ttt_step_count(tiny_ckpt, monkeypatch):  # noqa: F811
    """README/CLI: --sft-steps N NTP optimizer steps per batch for sft-ttt (the table's step count). Kills T07."""
    seen = {}

    def fake_run_method(ckpt, examples, method, mode, cfg, batch_size, seed, device, on_batch=None):
        seen[method] = cfg.sft_steps
        return [0.0] * len(examples), 0
    monkeypatch.setattr(tta, "run_method", fake_run_method)
    tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2", "--sft-steps", "2",
              "--length", str(LENGTH)])
    assert seen["sft-ttt"] == 2
