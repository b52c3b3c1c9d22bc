"""The NIAH evaluation (method.md §6): eval_niah.py end to end, refine_mini/evaluate.py and heatmap.py in parts."""

import json
from dataclasses import asdict

import pytest
import torch

import eval_niah
from refine_mini import evaluate, niah, tokenizer
from refine_mini.common import save_checkpoint
from refine_mini.heatmap import render_heatmap, render_table, use_color
from refine_mini.model import FastWeightLM, ModelConfig

TINY = dict(vocab_size=8193, d_model=32, n_layers=2, n_heads=2, n_heads_fast=2, chunk_size=16, lact_chunk=16,
            window=16)


def tiny_model(mixer="deltanet") -> FastWeightLM:
    torch.manual_seed(0)
    return FastWeightLM(ModelConfig(mixer=mixer, **TINY)).eval()


def save_tiny_run(folder, mixer="deltanet"):
    """A run folder in trainer.save_run's format (model, model_config, train_config, regime, step)."""
    model = tiny_model(mixer)
    save_checkpoint(folder / "ckpt.pt", {"model": model.state_dict(), "model_config": asdict(model.cfg),
                                         "train_config": {"seq_len": 128}, "regime": "pretrain", "step": 0})
    return folder


QUICK = ["--lengths", "96", "192", "--depths", "0", "1", "--samples", "2", "--no-color", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread beats two on a busy 2-core box. Restore the process-wide setting afterwards
    (eval_niah --threads changes it too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_eval_of_a_tiny_model_writes_every_cell_and_the_metadata(tmp_path, capsys):
    """Default plan on a 2 x 2 grid: s_niah on every cell, the other five tasks once; JSON == returned dict."""
    run = save_tiny_run(tmp_path / "tiny")
    out = tmp_path / "res.json"
    results = eval_niah.main(["--ckpt", str(run), "--out", str(out), *QUICK])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    cells = {(c["task"], c["length"], c["depth"]): c for c in results["cells"]}
    expected = {("s_niah", n, d) for n in (96, 192) for d in (0.0, 1.0)}
    expected |= {(t, 192, 0.5) for t in niah.TASKS if t != "s_niah"}
    assert set(cells) == expected
    for c in cells.values():
        assert c["run"] == "tiny" and c["samples"] == 2 and len(c["scores"]) == 2
        assert 0.0 <= c["score"] <= 1.0 and all(s in (0.0, 0.25, 0.5, 0.75, 1.0) for s in c["scores"])
        assert c["prompt_tokens"] == [c["length"]] and "\n" not in c["first_output"]
    assert {"seed", "device", "seconds", "memory_method", "torch"} <= set(results["meta"])
    (record,) = results["runs"]
    assert record["mixer"] == "deltanet" and record["params"] > 0
    sizes = {n: m["state_bytes_per_row"] for n, m in record["memory_by_length"].items()}
    assert set(sizes) == {"96", "192"} and len(set(sizes.values())) == 1 and sizes["96"] > 0  # constant in T
    assert record["peak_memory_at_longest"]["length"] == 192 and record["peak_memory_at_longest"]["bytes"] > 0
    printed = capsys.readouterr().out
    assert "s_niah  recall %" in printed and "qa_2hop @192" in printed and "\x1b[" not in printed


def test_several_runs_are_compared_side_by_side_in_one_table(tmp_path, capsys):
    """No --ckpt: every run under --runs is found, evaluated on the same grid, and gets a column."""
    for name in ("a", "b"):
        save_tiny_run(tmp_path / "runs" / name)
    results = eval_niah.main(["--runs", str(tmp_path / "runs"), "--tasks", "s_niah", *QUICK])
    assert [r["name"] for r in results["runs"]] == ["a", "b"]
    assert len(results["cells"]) == 2 * 4
    assert (tmp_path / "runs" / "eval_niah.json").is_file()
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("task @length")]
    assert header and header[0].split()[-2:] == ["a", "b"]


def _bad_inputs(tmp_path):
    run = save_tiny_run(tmp_path / "good")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["model"]["final_norm.weight"].fill_(torch.finfo(torch.float32).max)  # finite, but the logits overflow
    (tmp_path / "overflow").mkdir()
    save_checkpoint(tmp_path / "overflow" / "ckpt.pt", ckpt)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint")
    return {
        "missing checkpoint": (["--ckpt", str(tmp_path / "nope.pt")], "not found"),
        "corrupted checkpoint": (["--ckpt", str(tmp_path / "bad.pt")], "corrupted"),
        "run folder without ckpt.pt": (["--ckpt", str(tmp_path / "empty")], "no ckpt.pt"),
        "a folder of runs as --ckpt": (["--ckpt", str(tmp_path)], "run(s); evaluate them all with --runs"),
        "no runs at all": (["--runs", str(tmp_path / "empty")], "python train.py --model deltanet"),
        "unknown task": (["--ckpt", str(run), "--tasks", "haystack_soup"], "unknown task"),
        "non-positive length": (["--ckpt", str(run), "--lengths", "0"], "positive"),
        "depth outside [0, 1]": (["--ckpt", str(run), "--depths", "1.5"], "[0, 1]"),
        "length too short for the task": (["--ckpt", str(run), "--lengths", "20"], "too short"),
        "weights whose logits overflow": (["--ckpt", str(tmp_path / "overflow"), *QUICK], "non-finite logits"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "corrupted checkpoint", "run folder without ckpt.pt",
                                  "a folder of runs as --ckpt", "no runs at all", "unknown task",
                                  "non-positive length", "depth outside [0, 1]", "length too short for the task",
                                  "weights whose logits overflow"])
def test_bad_input_is_a_one_line_error_with_status_2_and_keeps_old_results(tmp_path, capsys, case):
    argv, message = _bad_inputs(tmp_path)[case]
    out, old = tmp_path / "old.json", '{"meta": {"old": true}, "grid": {}, "runs": [], "cells": []}'
    out.write_text(old)  # an earlier results file: overwritten by a good run, kept by a failing one
    with pytest.raises(SystemExit) as exc:
        eval_niah.main([*argv, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert out.read_text() == old


def test_heatmap_plain_text_grid_for_a_hand_made_score_table():
    """Rows are lengths, columns depths, cells recall %, a missing cell is '-', the row average skips it."""
    assert render_table(["t"], ["r"], {("t", "r"): 0.125}).splitlines()[-1].split()[-1] == "13"  # half up
    for recall, shown in ((23 / 40, "58"), (0.285, "29"), (0.125 - 1e-4, "12")):  # 57.4999.. and 28.4999.. in binary
        assert render_table(["t"], ["r"], {("t", "r"): recall}).splitlines()[-1].split()[-1] == shown
    assert render_heatmap({(1, 0.125): 1.0}, [1], [0.125]).splitlines()[0].split()[2] == "13%"  # the depth header too
    scores = {(256, 0.0): 1.0, (256, 0.5): 0.5, (256, 1.0): 0.0, (512, 0.0): 0.25, (512, 1.0): 0.75}
    text = render_heatmap(scores, [256, 512], [0.0, 0.5, 1.0], title="run-a  s_niah", color=False)
    assert text.splitlines() == [
        "run-a  s_niah",
        "  length |    0%   50%  100% |   avg",
        "  -------+-------------------+------",
        "     256 |   100    50     0 |    50",
        "     512 |    25     -    75 |    50",
    ]
    colored = render_heatmap(scores, [256, 512], [0.0, 0.5, 1.0], color=True)
    assert "\x1b[48;5;46m" in colored and "\x1b[48;5;196m" in colored  # 100 % green, 0 % red backgrounds


def test_summary_table_puts_runs_side_by_side():
    text = render_table(["s_niah @256", "qa @256"], ["run-a", "run-b"],
                        {("s_niah @256", "run-a"): 1.0, ("s_niah @256", "run-b"): 0.5, ("qa @256", "run-a"): 0.0})
    assert text.splitlines() == ["task          run-a   run-b",
                                 "-----------  ------  ------",
                                 "s_niah @256     100      50",
                                 "qa @256           0       -"]


def test_colour_only_on_a_tty_without_no_color(monkeypatch):
    class Tty:
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(False, Tty()) and not use_color(True, Tty()) and not use_color(False, object())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(False, Tty())


@torch.no_grad()
def naive_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The oracle: re-encode the whole sequence from scratch for every new token, take the argmax."""
    seq = prompt
    for _ in range(n):
        logits = model(seq)[0][:, -1]  # (B, V), no state carried between steps
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_carried_state_generation_equals_naive_reencoding(mixer):
    """Segmented prefill + decoding from the carried state gives the same greedy tokens as re-encoding."""
    model = tiny_model(mixer).double()
    prompt = torch.randint(0, 8193, (3, 37), generator=torch.Generator().manual_seed(3))
    fast, state_bytes = evaluate.greedy_decode(model, prompt, 12, prefill_tokens=30)  # 4 segments of 10 x 3
    slow = naive_greedy(model, prompt, fast.shape[1])
    assert torch.equal(fast, slow) and state_bytes > 0
    if fast.shape[1] < 12:  # stopped early: only because every row produced a newline
        assert all(evaluate.newline_id() in row.tolist() for row in fast)


def test_scores_are_taken_after_cutting_at_the_first_newline(monkeypatch):
    """A gold value after the first newline does not count; one before it does (method.md §6)."""
    examples = niah.make_task_examples("s_niah", 2, 96, 0.5, seed=0, split="eval")
    gold = [ex.answers[0] for ex in examples]
    fake = [f"I do not know\n {gold[0]}", f" {gold[1]}\nand then {gold[0]}"]

    def fake_decode(model, prompts, max_new_tokens, prefill_tokens=4096):
        return [torch.tensor(tokenizer.encode(t)) for t in fake], 0

    monkeypatch.setattr(evaluate, "greedy_decode", fake_decode)
    cell = evaluate.eval_cell(None, "s_niah", 96, 0.5, 2, seed=0, device=torch.device("cpu"))
    assert cell["scores"] == [0.0, 1.0] and cell["score"] == 0.5
    assert cell["first_output"] == "I do not know" and cell["first_answers"] == [gold[0]]
    assert evaluate.first_line("  a b \nc") == "a b" and evaluate.first_line("") == ""


def test_decoding_stops_at_end_of_text_and_the_answer_ends_there(monkeypatch):
    """A model that emits EOS stops at once, and nothing after an EOS is scored (method.md §6: stop at EOS)."""
    model = tiny_model()
    eot = tokenizer.eot_id()

    def always_eos(hidden):  # (..., D) -> logits (..., V) with EOS on top
        logits = torch.zeros(*hidden.shape[:-1], model.cfg.vocab_size)
        logits[..., eot] = 1.0
        return logits

    monkeypatch.setattr(model, "head", always_eos)
    new, _ = evaluate.greedy_decode(model, torch.randint(0, 8000, (2, 20)), 12)
    assert new.tolist() == [[eot], [eot]]
    examples = niah.make_task_examples("s_niah", 1, 96, 0.5, seed=0, split="eval")
    gold = examples[0].answers[0]
    monkeypatch.setattr(evaluate, "greedy_decode", lambda model, prompts, n, prefill_tokens=4096: (
        torch.tensor([tokenizer.encode(" no") + [eot] + tokenizer.encode(f" {gold}\n")]), 0))
    outputs, _ = evaluate.greedy_outputs(None, examples, "cpu")
    assert outputs == [" no"]  # the gold value after EOS is gone


def test_plot_without_matplotlib_stops_before_evaluating_with_an_install_hint(tmp_path, capsys, monkeypatch):
    """--plot needs the optional matplotlib; without it: one line naming `pip install matplotlib`, status 2."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib` fail
    run = save_tiny_run(tmp_path / "tiny")
    with pytest.raises(SystemExit) as exc:
        eval_niah.main(["--ckpt", str(run), "--plot", str(tmp_path / "h.png"), *QUICK])
    assert exc.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "eval_niah.json").exists()


def test_png_heatmaps_when_matplotlib_is_installed(tmp_path):
    """The optional PNG: one panel per (run, task); skipped where matplotlib is not installed."""
    pytest.importorskip("matplotlib")
    from refine_mini.heatmap import save_png
    scores = {(256, 0.0): 1.0, (256, 1.0): 0.5, (512, 0.0): 0.0}
    save_png(str(tmp_path / "h.png"), [[("a: s_niah", scores)], [("b: s_niah", {})]], [256, 512], [0.0, 1.0])
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_line_is_cut_before_stripping():
    """method.md §6 (RULER QA): the text before the FIRST newline, then stripped. An output that starts with a
    newline has an empty first line (only some LongBench tasks strip leading newlines first)."""
    assert evaluate.first_line("\n Ashton") == "" and evaluate.first_line("  \n Ashton") == ""
    assert evaluate.first_line(" Ashton \nBelford") == "Ashton"
