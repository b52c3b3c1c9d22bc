"""A resumed run keeps the settings it was started with (resume.py, README "Errors"): the flags not given again keep
their saved values, a given one that would change the run's numbers is refused, the FREE ones may change; the
pre-training CLI, the library's pretrain() and the regimes all honour it, and a bf16 mid run with non-default REFINE
flags, resumed with `--resume` alone, ends with the uninterrupted run's weights."""
import argparse
import dataclasses
import json

import pytest
import torch

import train
from refine_mini.common import load_checkpoint, save_checkpoint
from refine_mini.resume import FREE, configure, given_flags, rng_state, saved_config
from refine_mini.trainer import TrainConfig, pretrain
from tests.test_cli_contracts import pretrain_calls  # noqa: F401 (a fixture)
from tests.test_regime_contracts import ckpt_every_2, killed_in_batch  # noqa: F401 (a fixture)
from tests.test_regimes import LENGTH, small_defaults, tiny_ckpt  # noqa: F401 (fixtures)
from tests.test_train import RandomCorpus, short_run, tiny_cfg


# ---- resume.py ----------------------------------------------------------------------------------------------------

def test_given_flags_are_the_ones_not_left_at_none_and_a_zero_counts():
    args = argparse.Namespace(lr=None, lambda_rl=0.0, seed=0, grad_checkpoint=False, precision="bf16")
    assert given_flags(args, ("lr", "lambda_rl", "seed", "grad_checkpoint", "precision", "absent")) == \
        {"lambda_rl": 0.0, "seed": 0, "precision": "bf16"}


def test_a_fresh_run_takes_every_given_flag_over_the_defaults():
    cfg = TrainConfig()
    configure(cfg, {"lr": 0.01, "precision": "bf16", "seed": 4})
    assert (cfg.lr, cfg.precision, cfg.seed, cfg.seq_len) == (0.01, "bf16", 4, TrainConfig().seq_len)


def test_a_resumed_run_takes_its_saved_values_and_only_free_flags_may_change_them():
    saved = dataclasses.asdict(TrainConfig(lr=0.01, precision="bf16", seed=4, seq_len=64, max_steps=10,
                                           data="/corpus.txt"))
    cfg = TrainConfig()
    configure(cfg, {"max_steps": 20, "grad_checkpoint": True, "lr": 0.01, "compile": True}, saved)  # lr restated
    assert dataclasses.asdict(cfg) == {**saved, "max_steps": 20, "grad_checkpoint": True, "compile": True}
    for name, value in (("lr", 0.02), ("precision", "fp32"), ("seed", 0), ("seq_len", 128), ("data", None),
                        ("batch_size", 3), ("answer_weight", 1.0)):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} {value} differs from the "
                                             f"{saved[name]} this run was started with"):
            configure(TrainConfig(), {name: value}, saved)
    assert FREE == {"max_steps", "compile", "grad_checkpoint", "checkpoint_segment", "ckpt_every", "eval_every",
                    "val_every"}


def test_an_older_checkpoint_lacking_a_field_gets_its_default_and_unknown_fields_are_ignored():
    saved = {k: v for k, v in dataclasses.asdict(TrainConfig(lr=0.01)).items() if k != "precision"}
    cfg = TrainConfig(precision="bf16")
    configure(cfg, {}, {**saved, "from_the_future": 1})
    assert (cfg.lr, cfg.precision) == (0.01, "bf16")  # cfg's own value stands: the caller's default
    with pytest.raises(ValueError, match="--precision bf16 differs from the fp32"):
        configure(TrainConfig(), {"precision": "bf16"}, saved)


def test_a_run_of_another_regime_is_not_resumed():
    with pytest.raises(ValueError, match="--regime mid: out holds a pretrain run"):
        saved_config({"regime": "pretrain", "train_config": {}}, "mid", "out")
    assert saved_config({"regime": "mid", "train_config": {"lr": 1}}, "mid", "out") == {"lr": 1}


# ---- train.py --regime pretrain (pretrain replaced by a recorder) -------------------------------------------------

@pytest.fixture
def saved_pretrain_run(tmp_path):
    """A run folder whose checkpoint holds a non-default pre-training config (and no real weights: the recorder
    never loads them)."""
    out = tmp_path / "run"
    cfg = TrainConfig(max_steps=40, seq_len=64, batch_size=3, lr=0.002, seed=7, precision="bf16",
                      data=str(tmp_path / "corpus.txt"), answer_weight=5.0)
    save_checkpoint(out / "ckpt.pt", {"model": {}, "model_config": {"mixer": "deltanet"}, "optimizer": {},
                                      "step": 20, "rng": rng_state(), "regime": "pretrain",
                                      "train_config": dataclasses.asdict(cfg)})
    return out, cfg


def test_resume_alone_continues_with_the_saved_settings_and_data(saved_pretrain_run, pretrain_calls,  # noqa: F811
                                                                  monkeypatch):
    """Also: the data path is compared resolved, so restating it relative to the working folder is no change."""
    out, saved = saved_pretrain_run
    train.main(["--model", "deltanet", "--out", str(out), "--device", "cpu", "--resume"])
    (_, data, seq_len, seed), (_, _, cfg, _, resume) = pretrain_calls[1:]
    assert resume is True and (data, seq_len, seed) == (saved.data, 64, 7)
    assert cfg == saved
    train.main(["--model", "deltanet", "--out", str(out), "--device", "cpu", "--resume", "--max-steps", "90",
                "--grad-checkpoint", "--precision", "bf16", "--seed", "7"])  # FREE flags, and two restated
    monkeypatch.chdir(out.parent)
    train.main(["--model", "deltanet", "--out", "run", "--device", "cpu", "--resume", "--max-steps", "90",
                "--grad-checkpoint", "--data", "corpus.txt"])
    assert pretrain_calls[-1][2] == dataclasses.replace(saved, max_steps=90, grad_checkpoint=True)
    train.main(["--model", "deltanet", "--out", str(out), "--device", "cpu", "--overwrite"])  # a fresh run
    assert pretrain_calls[-1][2] == TrainConfig(max_steps=train.PRETRAIN_STEPS["deltanet"])
    assert pretrain_calls[-1][4] is False


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp32"], "--precision fp32 differs from the bf16 this run was started with"),
    (["--seq-len", "128"], "--seq-len 128 differs from the 64"),
    (["--lr", "0.003"], "--lr 0.003 differs from the 0.002"),
    (["--seed", "0"], "--seed 0 differs from the 7"),
    (["--data", "other.txt"], "other.txt differs from the "),
    (["--regime", "mid"], "holds a pretrain run; --resume continues a run in its own regime"),
])
def test_resume_refuses_a_flag_that_would_change_the_run(argv, message, saved_pretrain_run, pretrain_calls,  # noqa
                                                         capsys):
    """Status 2 and one line, and the run folder as it was (nothing but its checkpoint)."""
    out, _ = saved_pretrain_run
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "deltanet", "--out", str(out), "--device", "cpu", "--resume", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["ckpt.pt"] and (out / "ckpt.pt").read_bytes() == before
    assert not any(call[0] == "pretrain" for call in pretrain_calls)


def test_pretrain_refuses_to_resume_a_run_with_another_config_but_takes_free_changes(tmp_path):
    """The library's guard, for callers that build their own TrainConfig: a resumed pretrain() with another lr is
    a ValueError before any step; one with more steps and another checkpoint cadence resumes."""
    cfg = short_run()
    pretrain(tiny_cfg(), cfg, RandomCorpus(), tmp_path, "cpu")
    with pytest.raises(ValueError, match="--lr .* differs from the"):
        pretrain(tiny_cfg(), dataclasses.replace(cfg, lr=cfg.lr * 2), RandomCorpus(), tmp_path, "cpu", resume=True)
    assert load_checkpoint(tmp_path)["step"] == cfg.max_steps
    longer = dataclasses.replace(cfg, max_steps=cfg.max_steps + 1, ckpt_every=1)
    pretrain(tiny_cfg(), longer, RandomCorpus(), tmp_path, "cpu", resume=True)
    assert load_checkpoint(tmp_path)["step"] == cfg.max_steps + 1


# ---- the regimes: exact resume with nothing restated --------------------------------------------------------------

def test_a_bf16_mid_run_resumed_with_resume_alone_ends_with_the_uninterrupted_weights(tmp_path, tiny_ckpt,  # noqa
                                                                                        ckpt_every_2, monkeypatch):
    """Started with --precision bf16, --seed 3, --lr, --c 1 --k 2 --reward hybrid, killed in batch 4, resumed with
    only --resume (and --init, --out): the run goes on with every saved setting and ends bit-identical to the
    uninterrupted one, and its config.json still names the base it started from. Restating a REFINE flag with another
    value is refused."""
    first = ["--model", "deltanet", "--regime", "mid", "--init", str(tiny_ckpt), "--seq-len", str(LENGTH),
             "--max-steps", "4", "--precision", "bf16", "--seed", "3", "--lr", "0.001", "--c", "1", "--k", "2",
             "--reward", "hybrid"]
    train.main([*first, "--out", str(tmp_path / "full")])
    killed_in_batch(4, lambda: train.main([*first, "--out", str(tmp_path / "killed")]), monkeypatch)
    with pytest.raises(SystemExit):
        train.main(["--model", "deltanet", "--regime", "mid", "--out", str(tmp_path / "killed"), "--resume",
                    "--k", "3"])
    train.main(["--model", "deltanet", "--regime", "mid", "--out", str(tmp_path / "killed"), "--resume"])
    full, killed = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert killed["step"] == full["step"] == 4
    assert json.loads((tmp_path / "killed" / "config.json").read_text())["init"] == str(tiny_ckpt.resolve())
    assert (killed["train_config"]["precision"], killed["train_config"]["seed"]) == ("bf16", 3)
    assert {k: killed["train_config"]["refine"][k] for k in ("c", "k", "reward")} == {"c": 1, "k": 2,
                                                                                     "reward": "hybrid"}
    for name, value in full["model"].items():
        assert torch.equal(value, killed["model"][name]), name
