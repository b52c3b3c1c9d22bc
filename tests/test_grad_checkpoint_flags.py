"""The activation-checkpointing flags (--grad-checkpoint, --checkpoint-segment) of train.py and tta.py: they reach
the model, change no number of a REFINE step, and a segment the recorded pass cannot join is a one-line error. The
model-level checks (same values and gradients, less memory) are in test_grad_checkpoint.py.
"""
import json

import pytest

import train
import tta
from tests.test_grad_checkpoint import spy_checkpoint
from tests.test_regimes import LENGTH, run_cli, small_defaults, tiny_ckpt  # noqa: F401 (fixtures)


@pytest.mark.parametrize("flags, segment", [(["--grad-checkpoint"], 0), (["--checkpoint-segment", "32"], 32)])
def test_the_train_flags_reach_the_model_and_change_no_number(tmp_path, tiny_ckpt, small_defaults,  # noqa: F811
                                                              monkeypatch, flags, segment):
    calls = spy_checkpoint(monkeypatch)
    plain = run_cli(tmp_path / "a", "mid", "refine", tiny_ckpt, steps=1)
    assert not calls
    checkpointed = run_cli(tmp_path / "b", "mid", "refine", tiny_ckpt, steps=1, extra=flags)
    assert calls
    config = json.loads((tmp_path / "b" / "mid-refine" / "config.json").read_text())
    assert config["run"]["grad_checkpoint"] is (segment == 0) and config["run"]["checkpoint_segment"] == segment
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("loss", "ntp_loss", "policy_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_pretrain_and_tta_grad_checkpoint_flags_reach_the_model(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    seen = {}

    def fake_pretrain(model_cfg, cfg, corpus, out, device, resume=False):
        seen["pretrain"] = cfg.grad_checkpoint
        return {}
    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    train.main(["--model", "deltanet", "--grad-checkpoint", "--out", str(tmp_path / "pre")])
    calls = spy_checkpoint(monkeypatch)
    tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2",
              "--length", str(LENGTH), "--grad-checkpoint"])
    assert seen == {"pretrain": True} and calls


@pytest.mark.parametrize("script", ["train", "tta"])
def test_a_bad_checkpoint_segment_is_a_one_line_error(script, tmp_path, tiny_ckpt, capsys):  # noqa: F811
    """tiny_ckpt's chunks are 16 tokens: 24 is not a multiple; 0 is not a length."""
    for value, message in (("24", "multiple of the model's chunk size (16 tokens)"), ("0", "must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            if script == "train":
                train.main(["--model", "deltanet", "--regime", "mid", "--init", str(tiny_ckpt), "--out",
                            str(tmp_path / "mid"), "--checkpoint-segment", value])
            else:
                tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2",
                          "--length", str(LENGTH), "--checkpoint-segment", value])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "mid" / "config.json").exists()  # nothing written for the refused run
