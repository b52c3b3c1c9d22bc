"""Evaluation-side bugs found by an outside probe (evaluate.py, eval_niah.py, tta.py and the checkpoint fields they
read): a batch of tasks with different decoding budgets, checkpoints whose train_config is malformed, a --plot that
names the results file by another spelling, length errors that did not say which length was too short, and a
report piped into a reader that stops early, which lost the results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_niah
import tta
from refine_mini import evaluate, niah
from refine_mini.common import load_checkpoint, save_checkpoint
from refine_mini.tokenizer import encode
from tests.test_eval import save_tiny_run, tiny_model
from tests.test_input_guards import fails

CPU = torch.device("cpu")


def test_each_row_of_a_mixed_batch_keeps_its_own_decoding_budget(monkeypatch):
    """S-NIAH (12 tokens) and MV-NIAH (40) prompts of the same length share a batch; the S-NIAH row must still get
    exactly 12 tokens, as it does decoded alone (it used to get the batch's 40, so batching changed its answer)."""
    model = tiny_model()
    x = encode(" x")[0]

    def always_x(hidden):  # never a newline: every row decodes its whole budget
        logits = torch.zeros(*hidden.shape[:-1], model.cfg.vocab_size)
        logits[..., x] = 1.0
        return logits

    monkeypatch.setattr(model, "head", always_x)
    examples = niah.make_task_examples("s_niah", 2, 160, 0.5) + niah.make_task_examples("mv_niah", 1, 160, 0.5)
    batched, _ = evaluate.greedy_outputs(model, examples, CPU)
    alone = [evaluate.greedy_outputs(model, [ex], CPU)[0][0] for ex in examples]
    assert batched == alone == [" x" * 12] * 2 + [" x" * 40]


@pytest.mark.parametrize("train_config, shown", [([128], "[128]"), ("512", "'512'"),
                                                 ({"seq_len": float("inf")}, "inf"), ({"seq_len": -5}, "-5"),
                                                 ({"seq_len": True}, "True"), ({"seq_len": 256.0}, "256.0")])
def test_a_malformed_train_config_is_a_one_line_checkpoint_error(train_config, shown, tmp_path, capsys):
    """A train_config that is not a dict, or a seq_len that is not a positive int, was a traceback (AttributeError,
    OverflowError) or silently taken (a length of -5 or True); both scripts now name the field in one line."""
    run = save_tiny_run(tmp_path / "run")
    save_checkpoint(run / "ckpt.pt", {**load_checkpoint(run), "train_config": train_config})
    out = tmp_path / "r.json"
    err = fails(capsys, eval_niah.main, ["--ckpt", str(run), "--tasks", "s_niah", "--samples", "1", "--out", str(out)])
    assert "train_config" in err and shown in err and not out.exists()
    err = fails(capsys, tta.main, ["--ckpt", str(run), "--task", "s_niah", "--samples", "1", "--batch-size", "1"])
    assert "train_config" in err and shown in err


def test_a_plot_that_is_the_results_file_by_another_spelling_is_refused(tmp_path, capsys, monkeypatch):
    """--out sub/../r.png and --plot r.png (or a link to it) are one file: the PNG would replace the results JSON
    just written, so the pair is refused before evaluating, as the same spelling already was."""
    run = save_tiny_run(tmp_path / "run")
    monkeypatch.setattr(eval_niah, "require_matplotlib", lambda: None)  # as if installed
    (tmp_path / "sub").mkdir()
    old = json.dumps({"meta": {"old": True}, "grid": {}, "runs": [], "cells": []})
    (tmp_path / "r.png").write_text(old)  # an earlier results file (named .png), which must survive
    os.symlink(tmp_path / "r.png", tmp_path / "link.png")
    for plot in (tmp_path / "r.png", tmp_path / "link.png"):
        argv = ["--ckpt", str(run), "--out", str(tmp_path / "sub" / ".." / "r.png"), "--plot", str(plot)]
        assert "is the results file (--out)" in fails(capsys, eval_niah.main, argv)
    assert (tmp_path / "r.png").read_text() == old


def test_a_length_too_short_for_a_summary_task_says_it_is_the_default_plans(tmp_path, capsys):
    """Without --tasks the other tasks run once at the middle length; one too short for them used to read like an
    error in the user's own request ("length 128 is too short for task mk_niah"), with no way out named."""
    run = save_tiny_run(tmp_path / "run")
    out = str(tmp_path / "r.json")
    err = fails(capsys, eval_niah.main, ["--ckpt", str(run), "--lengths", "96", "128", "--out", out])
    assert "too short for task mk_niah" in err and "--tasks" in err and "summary" in err
    err = fails(capsys, eval_niah.main, ["--ckpt", str(run), "--lengths", "20", "--out", out])
    assert "length 20 is too short for task s_niah" in err and "summary" not in err  # a grid task: as it was


def test_a_default_tta_length_too_short_for_the_task_names_where_it_came_from(tmp_path, capsys):
    """tta's --length defaults to the checkpoint's seq_len (128 here); too short for QA, the error must say so rather
    than name a length the user never gave."""
    run = save_tiny_run(tmp_path / "run")
    err = fails(capsys, tta.main, ["--ckpt", str(run), "--task", "qa", "--samples", "1", "--batch-size", "1"])
    assert "seq_len 128 is too short for task qa" in err and "--length" in err
    err = fails(capsys, tta.main, ["--ckpt", str(run), "--task", "qa", "--length", "100", "--samples", "1",
                                   "--batch-size", "1"])
    assert "--length 100 is too short for task qa" in err


def test_a_reader_that_stops_early_costs_no_results(tmp_path):
    """`eval_niah.py | head -1`: the report's print used to raise BrokenPipeError before the JSON was written, so the
    whole evaluation was lost in a traceback. The results are written first now, and the script stops quietly."""
    run, out = save_tiny_run(tmp_path / "run"), tmp_path / "r.json"
    argv = [sys.executable, "eval_niah.py", "--ckpt", str(run), "--tasks", "s_niah", "--lengths", "96", "--depths",
            "0", "--samples", "1", "--threads", "1", "--no-color", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as into a real pipe
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("evaluating 1 run(s)")  # head -1: read the first line, then go
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    assert [(c["task"], c["length"], c["depth"]) for c in json.loads(out.read_text())["cells"]] == [("s_niah", 96, 0.0)]


def test_one_checkpoint_named_twice_is_evaluated_once(tmp_path, capsys):
    """run/, run/ckpt.pt and a link to it are one checkpoint: it used to be evaluated (and reported) three times."""
    run = save_tiny_run(tmp_path / "run")
    (tmp_path / "link.pt").symlink_to(run / "ckpt.pt")
    other = save_tiny_run(tmp_path / "other")
    args = ["--tasks", "s_niah", "--lengths", "96", "--depths", "0", "--samples", "1", "--no-color", "--threads", "1"]
    results = eval_niah.main(["--ckpt", str(run), str(run / "ckpt.pt"), str(tmp_path / "link.pt"), str(other),
                              "--out", str(tmp_path / "r.json"), *args])
    assert [r["name"] for r in results["runs"]] == ["run", "other"]
    assert "evaluated once" in capsys.readouterr().err
