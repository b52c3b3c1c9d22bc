"""Contracts of the entry scripts and the bench helpers (train.py, tta.py, bench/measure.py, bench/baselines.py):
every train.py flag reaches the pre-training config and corpus, --compile auto/on/off, the malloc setting
on CPU only, the sizes and rates each CLI refuses; tta.py's defaults, the flags that reach run_method, scoring after
the adaptation, its per-batch rollout streams, the returned dict and the printed table; measure.py's medians,
interleaving, warm-ups, CUDA syncs, alternating blocks and the oneDNN FLOP count; and the baselines' default scale
and zero initial state. Each test catches a planted bug that the rest of the suite let through (mutation
testing); the module docstrings are the reference. No test trains or decodes: the heavy calls are
replaced by recorders, so the file runs in seconds."""
import types

import pytest
import torch

import train
import tta
from bench import baselines, measure
from refine_mini import data, regimes
from refine_mini.delta_rule import delta_rule_recurrent
from refine_mini.niah import make_task_examples
from refine_mini.trainer import TrainConfig
from tests.test_deltanet import inputs, rel
from tests.test_regimes import LENGTH, tiny_ckpt  # noqa: F401 (a fixture)

LR_BOUND = "--lr must be > 0 and below 1.7e+37 (AdamW divides it by 1 - beta1 in float32)"


# ---- train.py -----------------------------------------------------------------------------------------------------

@pytest.fixture
def pretrain_calls(monkeypatch):
    """Replace pre-training and the corpus by recorders; returns the list of what each run_pretrain passed on."""
    calls = []
    monkeypatch.setattr(data, "make_corpus", lambda path, seq_len, seed: calls.append(("corpus", path, seq_len, seed)))
    monkeypatch.setattr(train, "pretrain", lambda model_cfg, cfg, corpus, out, device, resume=False:
                        calls.append(("pretrain", model_cfg.mixer, cfg, device.type, resume)) or {})
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(("malloc",)))
    return calls


def test_pretrain_flags_reach_the_train_config_and_the_corpus(tmp_path, pretrain_calls):
    """--max-steps, --seq-len, --batch-size, --lr, --answer-weight and --seed each set their own TrainConfig field,
    and the corpus is cut at --seq-len with --seed (catches a flag dropped or two swapped)."""
    train.main(["--model", "lact", "--out", str(tmp_path / "run"), "--max-steps", "3", "--seq-len", "64",
                "--batch-size", "5", "--lr", "0.002", "--answer-weight", "7", "--seed", "9", "--device", "cpu"])
    (_, _, corpus_len, corpus_seed), (_, mixer, cfg, _, resume) = pretrain_calls[1:]
    assert (mixer, cfg.max_steps, cfg.seq_len, cfg.batch_size, cfg.lr, cfg.answer_weight, cfg.seed, resume) == \
        ("lact", 3, 64, 5, 0.002, 7.0, 9, False)
    assert (corpus_len, corpus_seed) == (64, 9)
    default = TrainConfig()
    train.main(["--model", "deltanet", "--out", str(tmp_path / "default"), "--device", "cpu"])
    cfg = pretrain_calls[-1][2]
    assert (cfg.max_steps, cfg.seq_len, cfg.batch_size, cfg.lr, cfg.answer_weight, cfg.seed) == \
        (400, default.seq_len, default.batch_size, default.lr, default.answer_weight, 0)
    assert pretrain_calls[-2][2:] == (default.seq_len, 0)


@pytest.mark.parametrize("device, flag, compiled", [("cpu", "auto", False), ("cuda", "auto", True),
                                                    ("cpu", "on", True), ("cuda", "off", False)])
def test_compile_auto_is_on_for_cuda_only_and_malloc_is_tuned_for_cpu_only(device, flag, compiled, tmp_path,
                                                                          pretrain_calls, monkeypatch):
    """--compile auto: on for CUDA, off on CPU; on/off force it. keep_freed_memory is for CPU runs only (common.py)."""
    monkeypatch.setattr(train, "pick_device", lambda name: torch.device(device))
    train.main(["--model", "deltanet", "--out", str(tmp_path), "--compile", flag])
    assert pretrain_calls[-1][2].compile is compiled and pretrain_calls[-1][3] == device
    assert (("malloc",) in pretrain_calls) == (device == "cpu")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--lr", "0"], f"{LR_BOUND}, got 0.0"),
    (["--lr", "1e300"], f"{LR_BOUND}, got 1e+300"),
    (["--lr", "1e38"], f"{LR_BOUND}, got 1e+38"),  # finite in fp32, but AdamW's first step, 10 lr, would overflow
    (["--lr", "nan"], f"{LR_BOUND}, got nan"),
    (["--c", "4"], "--c is a mid/post flag"),
    (["--regime", "mid", "--answer-weight", "5"], "--answer-weight is a pretrain flag"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
])
def test_train_cli_refuses_bad_sizes_rates_and_misplaced_flags(argv, message, tmp_path, capsys, pretrain_calls,
                                                              monkeypatch):
    """Sizes >= 1, an LR > 0, REFINE flags only for mid/post: status 2 before anything is written (pre-training is
    a recorder here, so a bug that lets a flag through fails at once instead of training for minutes, as the same
    cases in test_train.py would)."""
    monkeypatch.chdir(tmp_path)  # a mid run let through pre-trains its base in runs/ of the working folder
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "deltanet", "--out", str(tmp_path / "run"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and all(c == ("malloc",) for c in pretrain_calls)


def test_lambda_rl_zero_is_accepted():
    """--lambda-rl is checked as finite and >= 0: 0 (no policy loss) is a valid setting."""
    args = train.build_parser().parse_args(["--model", "deltanet", "--regime", "mid", "--lambda-rl", "0"])
    assert train.check_args(args) is None
    assert regimes.resolve_config(args).refine["lambda_rl"] == 0.0


# ---- tta.py -------------------------------------------------------------------------------------------------------

def test_tta_defaults_are_the_documented_ones():
    """tta docstring: batches of 8, 1 SFT step, constant LR 1e-4, cumulative mode; 32 prompts, seed 0."""
    args = tta.build_parser().parse_args(["--ckpt", "x", "--task", "s_niah"])
    assert (args.batch_size, args.sft_steps, args.lr, args.mode, args.samples, args.seed, args.length) == \
        (8, 1, 1e-4, "cumulative", 32, 0, None)
    cfg = tta.TTTConfig()
    assert (cfg.lr, cfg.sft_steps) == (1e-4, 1)


def fake_methods(monkeypatch):
    """run_method replaced: records its arguments; scores 1 on a quarter / half / three quarters of the prompts."""
    seen = {}
    hits = {"none": 1, "sft-ttt": 2, "refine-ttt": 3}

    def fake(ckpt, examples, method, mode, cfg, batch_size, seed, device, on_batch=None):
        seen[method] = (examples, mode, cfg.lr, cfg.sft_steps, batch_size, seed)
        return [1.0] * hits[method] + [0.0] * (len(examples) - hits[method]), 2 * hits[method]
    monkeypatch.setattr(tta, "run_method", fake)
    return seen


def test_tta_flags_reach_every_method_and_the_table_is_their_scores(tiny_ckpt, monkeypatch, capsys):  # noqa: F811
    """--mode, --lr, --seed, --length and --batch-size reach run_method for all three methods, on EVAL-split
    prompts of --length tokens; the result is each method's mean score in % and its steps, and the last line the
    differences."""
    seen = fake_methods(monkeypatch)
    results = tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "4", "--batch-size", "2",
                        "--mode", "reset", "--lr", "0.003", "--seed", "5", "--length", "128"])
    expected = [ex.prompt_ids for ex in make_task_examples("s_niah", 4, 128, None, 5, split="eval")]
    for method in tta.METHODS:
        examples, *rest = seen[method]
        assert [ex.prompt_ids for ex in examples] == expected and rest == ["reset", 0.003, 1, 2, 5]
    assert results == {"none": {"score": 25.0, "optimizer_steps": 2}, "sft-ttt": {"score": 50.0, "optimizer_steps": 4},
                       "refine-ttt": {"score": 75.0, "optimizer_steps": 6}}
    out = capsys.readouterr().out
    assert "  sft-ttt     score  50.0   optimizer steps 4" in out
    assert out.splitlines()[-1] == "refine-ttt vs none: +50.0   vs sft-ttt: +25.0"
    tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2"])
    assert len(seen["none"][0][0].prompt_ids) == LENGTH  # no --length: the checkpoint's training length


@pytest.mark.parametrize("argv, message", [(["--length", "0"], "--length must be >= 1, got 0"),
                                           (["--lr", "0"], f"{LR_BOUND}, got 0.0"),
                                           (["--lr", "1e38"], f"{LR_BOUND}, got 1e+38")])
def test_tta_refuses_a_zero_length_or_rate(argv, message, tiny_ckpt, capsys):  # noqa: F811
    """--length 0 would silently fall back to the checkpoint's length (`args.length or ...`); an LR of 0 adapts
    nothing. Both are one-line errors."""
    with pytest.raises(SystemExit) as e:
        tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_run_method_scores_each_batch_after_adapting_it_with_its_own_rollout_stream(tiny_ckpt, monkeypatch):  # noqa
    """Per batch b: adapt on its prompts with step_generator(seed, b, 1), then score it with the adapted weights."""
    events = []

    def fake_adapt(model, optimizer, prompts, method, cfg, rcfg, generator):
        events.append(("adapt", prompts.tolist(), torch.randint(0, 2 ** 62, (1,), generator=generator).item()))
        return 1

    monkeypatch.setattr(tta, "adapt", fake_adapt)
    monkeypatch.setattr(tta, "score_examples", lambda model, batch, device:
                        events.append(("score", [ex.prompt_ids for ex in batch])) or [0.0] * len(batch))
    ckpt = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    examples = make_task_examples("s_niah", 4, LENGTH, None, 0, split="eval")
    _, steps = tta.run_method(ckpt, examples, "refine-ttt", "cumulative", tta.TTTConfig(), 2, 7, "cpu")
    draw = lambda b: torch.randint(0, 2 ** 62, (1,), generator=regimes.step_generator(7, b, 1)).item()
    rows = lambda b: [ex.prompt_ids for ex in examples[2 * b:2 * b + 2]]
    assert events == [("adapt", rows(0), draw(0)), ("score", rows(0)), ("adapt", rows(1), draw(1)), ("score", rows(1))]
    assert steps == 2


# ---- bench/measure.py ---------------------------------------------------------------------------------------------

def fake_clock(monkeypatch, durations: dict):
    """A clock that only callables advance (by their next duration); events log calls, clock reads and syncs."""
    now, events = [0.0], []

    def read():
        events.append("clock")
        return now[0]

    def make(name):
        def f():
            events.append(name)
            now[0] += durations[name].pop(0)
        return f
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=read))
    monkeypatch.setattr(measure, "sync", lambda: events.append("sync"))
    return {name: make(name) for name in durations}, events


def test_timed_interleaves_after_warmup_syncs_around_each_call_and_takes_the_median(monkeypatch):
    """Warm-up calls first (not timed), then round-robin a, b, a, b, ...; each call between syncs, so CUDA work is
    timed, not launched; the median, not the mean."""
    fns, events = fake_clock(monkeypatch, {"a": [100, 100, 1, 2, 10], "b": [100, 100, 5, 5, 6]})
    assert measure.timed(fns, 3, warmup=2) == {"a": 2, "b": 5}
    assert events[:4] == ["a", "a", "b", "b"]
    assert events[4:] == [e for _ in range(3) for name in "ab" for e in ("sync", "clock", name, "sync", "clock")]


def test_back_to_back_alternates_warmed_blocks_and_takes_their_median(monkeypatch):
    """Each round runs every callable's block once, in order (a slow phase hits them all); blocks of > 3 repeats
    warm up twice, slower ones once; the result is the median of the blocks."""
    calls, block = [], {"a": iter([5.0, 4.0, 1.0]), "b": iter([9.0, 7.0, 8.0])}

    def fake_timed(fns, repeats, warmup=1):
        (name,) = fns
        calls.append((name, repeats, warmup))
        return {name: next(block[name])}
    monkeypatch.setattr(measure, "timed", fake_timed)
    assert measure.back_to_back({"a": (None, 4), "b": (None, 3)}) == {"a": 4.0, "b": 8.0}
    assert calls == [("a", 4, 2), ("b", 3, 1)] * 3


def test_onednn_rate_counts_two_flops_per_multiply_add(monkeypatch):
    """An n x n by n x n product is 2 n^3 FLOP."""
    monkeypatch.setattr(measure, "timed", lambda fns, repeats, warmup=1: {"dnn": 0.5})
    rate = measure.onednn_rate(torch.randn(8, 8))
    if rate is None:
        pytest.skip("no oneDNN in this PyTorch build")
    assert rate == 2 * 8 ** 3 / 0.5


# ---- bench/baselines.py -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [baselines.delta_rule_recurrent_indexed, baselines.delta_rule_chunked_plain])
def test_baselines_default_to_a_zero_state_and_honour_the_scale(kernel):
    """Without initial_state the state starts at zero, without scale it is Dk^-1/2, and a given scale is used, as
    the oracle's (tests/test_bench_baselines.py always passes a state and never a scale)."""
    q, k, v, beta, _ = inputs(2, 2, 16, 5, 3, seed=1)
    kw = {"chunk_size": 4} if kernel is baselines.delta_rule_chunked_plain else {}
    for scale in (None, 0.3):
        o, S = kernel(q, k, v, beta, scale=scale, **kw)
        o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, scale=scale)
        assert rel(o, o_ref) < 1e-12 and rel(S, S_ref) < 1e-12, scale
