"""The training regimes around refine_step: nested post-training, matched baselines, test-time REFINE, the CLI."""

import dataclasses

import pytest
import torch

import train
import tta
from refine_mini import posttrain, regimes
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.niah import make_task_examples
from refine_mini.textgen import is_split_value
from refine_mini.trainer import TrainConfig, make_optimizer, save_run

LENGTH = 160  # prompt tokens in these tests (enough for S-NIAH and one-hop QA)


def tiny_model_cfg(mixer="deltanet"):
    return ModelConfig(mixer=mixer, d_model=32, n_layers=1, n_heads=2, n_heads_fast=2, chunk_size=16,
                       lact_chunk=16, window=16)


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = FastWeightLM(tiny_model_cfg())
    cfg = TrainConfig(seq_len=LENGTH)
    save_run(tmp_path / "base", model, make_optimizer(model, cfg), 0, model.cfg, cfg, "pretrain")
    return tmp_path / "base"


@pytest.fixture
def small_defaults(monkeypatch):
    """Regime defaults shrunk to seconds: 2 batches of 2, c 2, k 3, one S-NIAH eval prompt."""
    real = regimes.defaults

    def small(regime):
        cfg = real(regime)
        cfg.max_steps, cfg.batch_size, cfg.eval_samples = 2, 2, 1
        cfg.train_tasks, cfg.eval_tasks = ("s_niah", "qa"), ("s_niah",)
        cfg.refine.update(c=2, k=3, schedule="minibatch", minibatches=2)
        return cfg
    monkeypatch.setattr(regimes, "defaults", small)


def run_cli(tmp_path, regime, objective, init, steps=2, extra=()):
    out = tmp_path / f"{regime}-{objective}"
    train.main(["--model", "deltanet", "--regime", regime, "--objective", objective, "--init", str(init),
                "--out", str(out), "--seq-len", str(LENGTH), "--max-steps", str(steps), *extra])
    return [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_answer_loss_only_counts_answer_tokens():
    """Gradient of the SFT loss w.r.t. the hidden states is zero at every prompt position and non-zero at answer
    ones."""
    examples = posttrain.train_batch(("s_niah", "qa"), 2, LENGTH, seed=0, step=0)
    tokens, labels = posttrain.answer_batch(examples)
    for i, ex in enumerate(examples):
        assert (labels[i, :LENGTH] == posttrain.IGNORE).all()
        answer = labels[i][labels[i] != posttrain.IGNORE]
        assert tokens[i, LENGTH:LENGTH + len(answer)].tolist() == answer.tolist()
    model = FastWeightLM(ModelConfig(d_model=16, n_layers=1))
    hidden = torch.randn(*tokens.shape, 16, requires_grad=True)  # (B, L, D): a leaf standing in for the encoder
    model.encode = lambda t: (hidden, None)
    posttrain.answer_loss(model, tokens, labels).backward()
    per_position = hidden.grad.abs().sum(-1)  # (B, L)
    assert (per_position[:, :LENGTH - 1] == 0).all()  # logits at p predict p+1: prompt targets never count
    answer_rows = labels[:, 1:] != posttrain.IGNORE  # (B, L-1)
    assert (per_position[:, :-1][answer_rows] > 0).all()


def test_post_step_runs_refine_on_the_prompt_then_one_answer_sft_step(tmp_path, tiny_ckpt, small_defaults,
                                                                       monkeypatch):
    """Per batch: REFINE's optimizer steps on the prompt tokens only, then exactly one answer-SFT step."""
    calls = []
    real_inner, real_sft = posttrain.inner_update, posttrain.sft_step

    def spy_inner(model, optimizer, tokens, objective, *a):
        calls.append(("inner", objective, tokens.shape[1]))
        return real_inner(model, optimizer, tokens, objective, *a)

    def spy_sft(*a):
        calls.append(("sft",))
        return real_sft(*a)
    monkeypatch.setattr(posttrain, "inner_update", spy_inner)
    monkeypatch.setattr(posttrain, "sft_step", spy_sft)
    lines = run_cli(tmp_path, "post", "refine", tiny_ckpt)
    assert calls == [("inner", "refine", LENGTH), ("sft",)] * 2  # prompts only: exactly LENGTH tokens, no answer
    assert [line["phase"] for line in lines] == ["refine", "refine", "sft"] * 2
    assert {"ntp_loss", "policy_loss", "grad_norm"} <= set(lines[0]) and "sft_loss" in lines[2]
    assert [line["opt_step"] for line in lines] == list(range(1, 7))


def test_baselines_take_as_many_optimizer_steps_as_refine(tmp_path, tiny_ckpt, small_defaults):
    """mid: ntp == refine; post: sft == nested-sft == refine (counted from metrics.jsonl, one line per step)."""
    mid = {obj: len(run_cli(tmp_path, "mid", obj, tiny_ckpt, steps=1)) for obj in ("refine", "ntp")}
    assert mid["refine"] == mid["ntp"] == 2
    post = {obj: len(run_cli(tmp_path, "post", obj, tiny_ckpt, steps=1)) for obj in ("sft", "nested-sft")}
    assert post["sft"] == post["nested-sft"] == 3  # refine: 3 per batch too (previous test)


def test_mid_training_validates_before_and_at_the_end_on_val_split_rows(tmp_path, tiny_ckpt, small_defaults, capsys):
    """The last batch's line holds the validation of the final weights (recomputed here from the checkpoint)."""
    from refine_mini.common import load_checkpoint
    from refine_mini.data import make_corpus
    from refine_mini.trainer import model_from_checkpoint, validation_metrics
    lines = run_cli(tmp_path, "mid", "refine", tiny_ckpt, steps=2)
    assert "val_loss" in lines[-1] and not any("val_loss" in line for line in lines[:-1])
    assert "validation before: val_loss=" in capsys.readouterr().out
    model = model_from_checkpoint(load_checkpoint(tmp_path / "mid-refine"), "cpu")
    val = make_corpus(None, LENGTH, seed=0).val_batches(2)[:2]
    m = validation_metrics(model, val, regimes.step_generator(0, 0, 2))
    assert lines[-1]["val_loss"] == pytest.approx(m["val_loss"], abs=2e-6)
    assert lines[-1]["val_sampled_acc"] == pytest.approx(m["val_sampled_acc"], abs=2e-6)


def ttt_weights_before_each_batch(ckpt, method, mode, cfg):
    """Run tta.run_method on 2 batches of 2 eval prompts; return (state dicts seen before each batch, steps)."""
    examples = make_task_examples("s_niah", 4, LENGTH, None, 0, split="eval")
    seen = []
    record = lambda b, model: seen.append({k: v.clone() for k, v in model.state_dict().items()})
    scores, steps = tta.run_method(ckpt, examples, method, mode, cfg, 2, 0, "cpu", on_batch=record)
    assert len(scores) == 4
    return seen, steps


def test_tta_reset_restores_weights_and_cumulative_carries_them(tiny_ckpt):
    """reset: the weights before every batch equal the checkpoint's exactly; cumulative: batch 2 starts adapted.
    REFINE-TTT takes 2 optimizer steps per batch, SFT-TTT 1 (the paper's counts)."""
    ckpt = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    initial = ckpt["model"]
    same = lambda state: all(torch.equal(state[k], initial[k]) for k in initial)
    cfg = tta.TTTConfig(lr=1e-2)
    cfg.refine.update(c=2, k=3)
    reset, steps = ttt_weights_before_each_batch(ckpt, "sft-ttt", "reset", cfg)
    assert steps == 2 and all(same(state) for state in reset)
    carried, steps = ttt_weights_before_each_batch(ckpt, "refine-ttt", "cumulative", cfg)
    assert steps == 4 and same(carried[0]) and not same(carried[1])


def test_mid_training_on_user_data_keeps_whole_long_documents(tmp_path, tiny_ckpt, small_defaults, monkeypatch):
    """--data in mid: documents of >= T tokens truncated to T (method.md §3), never short ones packed together."""
    from refine_mini.tokenizer import encode
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[(i + j) % 10] for j in range(n)) for i, n in enumerate([400, 30, 500, 20, 450, 25] * 4)]
    (tmp_path / "docs.txt").write_text("\n\n\n".join(docs))
    seen = []
    real = regimes.inner_update
    monkeypatch.setattr(regimes, "inner_update", lambda model, opt, tokens, *a: seen.append(tokens) or
                        real(model, opt, tokens, *a))
    run_cli(tmp_path, "mid", "refine", tiny_ckpt, steps=2, extra=["--data", str(tmp_path / "docs.txt")])
    long_prefixes = {tuple(encode(d)[:LENGTH]) for d in docs if len(encode(d)) >= LENGTH}
    rows = [tuple(row) for batch in seen for row in batch.tolist()]
    assert rows and all(row in long_prefixes for row in rows)


def test_training_batches_never_contain_eval_split_items():
    """Post-training draws keys/values/entities from the train partition only: no overlap with the eval prompts."""
    train_examples = [ex for step in range(10) for ex in posttrain.train_batch(("s_niah", "mk_niah", "qa"), 4,
                                                                                 LENGTH, seed=0, step=step)]
    eval_examples = [ex for task in ("s_niah", "mk_niah", "qa")
                     for ex in make_task_examples(task, 20, LENGTH, None, 0, split="eval")]
    train_answers = {a for ex in train_examples for a in ex.answers}
    eval_answers = {a for ex in eval_examples for a in ex.answers}
    assert not train_answers & eval_answers
    assert all(is_split_value(a, "train") for ex in train_examples if ex.task != "qa" for a in ex.answers)
    eval_prompts = {tuple(ex.prompt_ids) for ex in eval_examples}
    assert not eval_prompts & {tuple(ex.prompt_ids) for ex in train_examples}


def test_default_post_command_pretrains_a_base_then_prints_before_after(tmp_path, small_defaults, monkeypatch,
                                                                         capsys):
    """`train.py --model deltanet --regime post` on a fresh clone: base pre-training, post run, score line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "default_model_config", lambda mixer: dataclasses.replace(tiny_model_cfg(mixer)))
    tiny_pretrain = lambda **kw: TrainConfig(**{**dict(max_steps=2, batch_size=2, seq_len=LENGTH, warmup_steps=1,
                                                        eval_every=2, eval_batches=1, ckpt_every=2), **kw})
    monkeypatch.setattr(train, "TrainConfig", tiny_pretrain)
    monkeypatch.setitem(train.PRETRAIN_STEPS, "deltanet", 2)
    summary = train.main(["--model", "deltanet", "--regime", "post"])
    printed = capsys.readouterr().out
    assert "pre-training the base model first" in printed
    assert (tmp_path / "runs/deltanet-pretrain/ckpt.pt").exists() and (tmp_path / "runs/deltanet-post/ckpt.pt").exists()
    assert "score before: s_niah" in printed and "| after: s_niah" in printed
    assert summary["optimizer_steps"] == 6 and set(summary["after"]) == {"s_niah"}


def test_bad_inputs_exit_2(tmp_path, tiny_ckpt):
    with pytest.raises(SystemExit) as e:
        tta.main(["--ckpt", str(tmp_path / "missing"), "--task", "s_niah"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        tta.main(["--ckpt", str(tiny_ckpt), "--task", "bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # a partial last batch: the official loader drops it, we refuse it
        tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "6", "--batch-size", "4"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "deltanet", "--regime", "post", "--objective", "ntp", "--init", str(tiny_ckpt),
                    "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "deltanet", "--regime", "mid", "--init", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "y")])
    assert e.value.code == 2


def test_answer_nll_in_blocks_equals_one_batch_and_falls_when_the_answers_are_trained():
    torch.manual_seed(0)
    model = FastWeightLM(tiny_model_cfg())
    examples = posttrain.train_batch(("s_niah", "qa"), 5, LENGTH, seed=0, step=0)
    with torch.no_grad():
        whole = posttrain.answer_loss(model, *posttrain.answer_batch(examples)).item()
    before = posttrain.answer_nll(model, examples, "cpu", batch_size=2)  # blocks of 2, 2 and 1 prompts
    assert before == pytest.approx(whole, rel=1e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        posttrain.sft_step(model, optimizer, examples, grad_clip=1.0, device="cpu")
    assert posttrain.answer_nll(model, examples, "cpu") < 0.9 * before


def test_answer_sft_labels_are_the_whole_target_including_its_newline():
    """posttrain.py: the SFT target is Example.target, " <answer>\\n"; the newline plays EOS's role, since decoding
    and scoring stop at the first newline (method.md §6). The cross-entropy is taken on exactly those tokens."""
    from refine_mini import tokenizer
    examples = posttrain.train_batch(("s_niah", "qa"), 2, 160, seed=0, step=0)
    tokens, labels = posttrain.answer_batch(examples)
    for i, ex in enumerate(examples):
        answer = labels[i][labels[i] != posttrain.IGNORE].tolist()
        assert tokenizer.decode(answer) == ex.target and ex.target.endswith("\n")
        assert tokens[i, len(ex.prompt_ids):len(ex.prompt_ids) + len(answer)].tolist() == answer
