"""Contracts of the evaluation path that the end-to-end tests leave open (found by mutation testing).

Pins, against exact numbers or an independent reference: run discovery (any depth, sorted) and run names; the
checkpoint metadata; state_bytes in bytes and per row; the prefill's segment bound (also below one token per row);
the decoding budget and --batch splitting; which examples a cell scores, with which seed, and its haystack field;
the default grid and --samples check; eval_niah's plan, duplicate run names, summary means, comma lists and default
output path; the heatmap's colour step; decoding a cut character; the generators (gold needle depth for MK/MV/MQ,
MQ answers, answer budget, distinct samples, haystack fragment, 2-hop gold order, QA distractor names, QA filler,
QA depth check); textgen's unique/join_keys; set_seed and pick_device.
"""

import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval_niah
from refine_mini import common, evaluate, niah, qa, textgen
from refine_mini.heatmap import render_heatmap
from refine_mini.tokenizer import decode, encode
from tests.test_eval import naive_greedy, save_tiny_run, tiny_model

CPU = torch.device("cpu")
N_HEADER = len(textgen.encode_cached(textgen.NIAH_HEADER))


def test_find_runs_looks_at_any_depth_and_sorts(tmp_path):
    """Every folder holding a ckpt.pt, nested ones included, sorted by path; a missing root is no runs."""
    for sub in ("b", "a", "group/c"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "ckpt.pt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert evaluate.find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b", tmp_path / "group" / "c"]
    assert evaluate.find_runs(tmp_path / "nope") == []


def test_run_names_and_metadata_come_from_the_checkpoint(tmp_path):
    """Folder or ckpt.pt -> the folder's name; another .pt file -> folder/stem; seq_len from train_config."""
    run = save_tiny_run(tmp_path / "r1")
    shutil.copy(run / "ckpt.pt", run / "step7.pt")
    names = [evaluate.load_run(p, CPU).name for p in (run, run / "ckpt.pt", run / "step7.pt")]
    assert names == ["r1", "r1", "r1/step7"]
    meta = evaluate.load_run(run, CPU).meta
    assert (meta["seq_len"], meta["step"], meta["regime"], meta["mixer"]) == (128, 0, "pretrain", "deltanet")


def test_state_bytes_are_bytes_per_row():
    """fp64 state = 2 x fp32 state (element size counts); the per-row figure does not depend on the batch."""
    model = tiny_model()
    prompt = torch.randint(0, 8000, (3, 20), generator=torch.Generator().manual_seed(0))
    one = evaluate.greedy_decode(model, prompt[:1], 1)[1]
    assert one > 0 and evaluate.greedy_decode(model, prompt, 1)[1] == one
    assert evaluate.greedy_decode(model.double(), prompt[:1], 1)[1] == 2 * one


class Recording(torch.nn.Module):
    """Wraps a model and records the (B, T) shape of every prefill call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, tokens, state=None):
        self.shapes.append(tuple(tokens.shape))
        return self.model(tokens, state)

    def generate(self, *args, **kw):
        return self.model.generate(*args, **kw)


@pytest.mark.parametrize("prefill_tokens", [12, 2])
def test_prefill_segments_hold_at_most_prefill_tokens(prefill_tokens):
    """Each prefill call has <= max(B, prefill_tokens) tokens, covers T-1 positions, and decoding still equals
    re-encoding, also when prefill_tokens < B (one position per segment)."""
    model = tiny_model().double()
    prompt = torch.randint(0, 8193, (3, 25), generator=torch.Generator().manual_seed(1))
    rec = Recording(model)
    fast, _ = evaluate.greedy_decode(rec, prompt, 5, prefill_tokens=prefill_tokens)
    assert all(b * t <= max(3, prefill_tokens) for b, t in rec.shapes) and sum(t for _, t in rec.shapes) == 24
    assert torch.equal(fast, naive_greedy(model, prompt, fast.shape[1]))


def test_decoding_budget_is_max_new_tokens_and_batches_cover_every_example(monkeypatch):
    """A model that never stops decodes exactly the task's max_new_tokens; --batch 2 loses no example."""
    model = tiny_model()
    x = encode(" x")[0]

    def always_x(hidden):
        logits = torch.zeros(*hidden.shape[:-1], model.cfg.vocab_size)
        logits[..., x] = 1.0
        return logits

    monkeypatch.setattr(model, "head", always_x)
    examples = niah.make_task_examples("s_niah", 5, 96, 0.5) + niah.make_task_examples("mv_niah", 1, 160, 0.5)
    outputs, _ = evaluate.greedy_outputs(model, examples, CPU, max_batch=2)
    assert outputs == [" x" * 12] * 5 + [" x" * 40]


def _fake_decode_needle_in_first_half(model, prompts, max_new_tokens, prefill_tokens=4096):
    """Answers with the needle's value when the needle sits in the first half of the prompt, else ' none'."""
    out = []
    for row in prompts.tolist():
        text = decode(row)
        m = re.search(r"magic number for [a-z]+-[a-z]+ is: (\d{7})\.", text)
        out.append(torch.tensor(encode(f" {m.group(1)}\n" if m and m.start() < len(text) / 2 else " none\n")))
    return out, 0


def test_a_cell_scores_its_own_depths_examples_with_the_given_seed(monkeypatch):
    """Cell j holds the samples of depth j (not every len(depths)-th one), drawn with `seed`; QA has no haystack."""
    monkeypatch.setattr(evaluate, "greedy_decode", _fake_decode_needle_in_first_half)
    cells = evaluate.eval_row(None, "s_niah", 160, [0.0, 1.0], 3, seed=7, device=CPU)
    assert [c["scores"] for c in cells] == [[1.0] * 3, [0.0] * 3] and [c["depth"] for c in cells] == [0.0, 1.0]
    assert cells[0]["first_answers"] == niah.make_task_examples("s_niah", 1, 160, 0.0, seed=7)[0].answers
    assert cells[0]["first_answers"] != niah.make_task_examples("s_niah", 1, 160, 0.0, seed=0)[0].answers
    assert cells[0]["haystack"] == "noise"
    assert evaluate.eval_cell(None, "qa", 200, 0.5, 1, seed=0, device=CPU, haystack="essay")["haystack"] is None


def test_default_grid_and_sample_check():
    """Lengths T/2, T, 2T (full: T/4 .. 8T), >= 128; depths by quarters (full: tenths, 11); samples >= 1."""
    assert evaluate.default_lengths(512, False) == [256, 512, 1024]
    assert evaluate.default_lengths(None, True) == [128, 256, 512, 1024, 2048, 4096]
    assert evaluate.default_lengths(200, False) == [128, 200, 400]
    assert evaluate.default_depths(False) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert evaluate.default_depths(True) == [i / 10 for i in range(11)]
    with pytest.raises(ValueError, match="samples"):
        evaluate.check_grid(["s_niah"], [96], [0.5], 0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_is_in_bytes():
    """ru_maxrss is KiB on Linux: the reported peak matches /proc's VmHWM (kB) x 1024."""
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    assert 0.5 < evaluate.peak_memory(CPU)["bytes"] / hwm < 2


def test_plan_defaults_comma_lists_sorted_depths_and_qa_on_one_haystack():
    """4 samples (full: 8); '192,96' is two lengths; depths sorted; QA runs once, on its own filler."""
    argv = ["--haystack", "noise", "essay", "--depths", "1", "0", "0.5", "--lengths", "192,96"]
    runs = [SimpleNamespace(meta={"seq_len": 128})]
    plan, grid = eval_niah.make_plan(eval_niah.build_parser().parse_args(argv), runs)
    assert grid["samples"] == 4 and grid["lengths"] == [96, 192] and grid["depths"] == [0.0, 0.5, 1.0]
    labels = [item["label"] for item in plan]
    assert labels.count("qa") == labels.count("qa_2hop") == 1 and not any(l.startswith("qa[") for l in labels)
    assert {"s_niah", "s_niah[essay]", "mk_niah[essay]"} <= set(labels)
    assert eval_niah.make_plan(eval_niah.build_parser().parse_args([*argv, "--full"]), runs)[1]["samples"] == 8
    assert eval_niah._numbers(["256,512", "1024"], int, "lengths") == [256, 512, 1024]


def test_runs_sharing_a_folder_name_get_their_index(tmp_path):
    """Two runs named 'run' become run#0 and run#1 (distinct table columns); a unique name is kept."""
    paths = [save_tiny_run(tmp_path / p) for p in ("x/run", "y/run", "z/other")]
    args = eval_niah.build_parser().parse_args(["--ckpt", *map(str, paths)])
    assert [r.name for r in eval_niah.resolve_runs(args, CPU)] == ["run#0", "run#1", "other"]


def test_default_results_path(tmp_path):
    """One run: next to it (folder or checkpoint file); several: in the runs root."""
    (tmp_path / "a").mkdir()
    one, here = [SimpleNamespace(path=tmp_path / "a")], tmp_path / "a" / "eval_niah.json"
    assert eval_niah.default_out(one, "runs") == here
    assert eval_niah.default_out([SimpleNamespace(path=tmp_path / "a" / "s.pt")], "x") == here
    assert eval_niah.default_out(one * 2, "runs") == Path("runs/eval_niah.json")


def test_summary_table_averages_the_depths_of_a_row(capsys):
    """The '<task> @<length>' row is the mean over its depths (here (100 + 50) / 2 = 75)."""
    run = {"name": "r", "mixer": "deltanet", "model_config": {"d_model": 32, "n_layers": 2}, "params": 1000,
           "regime": "pretrain", "step": 0, "seconds": 1.0, "memory_by_length": {"96": {"state_bytes_per_row": 8}},
           "peak_memory_at_longest": {"length": 96, "bytes": 2 ** 20, "method": "x"}}
    cells = [{"run": "r", "label": "s_niah", "task": "s_niah", "length": 96, "depth": d, "score": s}
             for d, s in ((0.0, 1.0), (1.0, 0.5))]
    cells.append({"run": "r", "label": "qa", "task": "qa", "length": 96, "depth": 0.5, "score": 0.0})
    grid = {"grid_tasks": ["s_niah"], "lengths": [96], "depths": [0.0, 1.0], "samples": 1}
    eval_niah.report({"grid": grid, "runs": [run], "cells": cells}, color=False)
    rows = {line.rsplit(None, 1)[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines() if "@96" in line}
    assert rows == {"s_niah @96": "75", "qa @96": "0"}


def test_heatmap_colour_is_the_nearest_ten_percent_step():
    """96 % gets the 100 % green, 4 % the 0 % red (nearest step, not truncation)."""
    text = render_heatmap({(1, 0.0): 0.96, (1, 1.0): 0.04}, [1], [0.0, 1.0], color=True)
    assert "\x1b[48;5;46m" in text and "\x1b[48;5;196m" in text and "\x1b[48;5;82m" not in text


def test_decoding_a_cut_character_gives_the_replacement_character():
    """A rollout cut mid-character decodes to U+FFFD instead of raising."""
    ids = encode("🙂")
    assert len(ids) > 1 and decode(ids[:1]) == "\ufffd" and decode(ids) == "🙂"


@pytest.mark.parametrize("task", ["mk_niah", "mv_niah", "mq_niah"])
def test_the_first_needle_sits_at_the_requested_depth(task):
    """needle_token_pos[0] (the asked key / first value) is at the start for depth 0 and near the end for depth 1."""
    for seed in range(3):
        assert niah.make_example(task, 600, 0.0, random.Random(seed)).needle_token_pos[0] < N_HEADER + 16
        assert niah.make_example(task, 600, 1.0, random.Random(seed)).needle_token_pos[0] > 0.8 * 600


def test_mq_asks_and_answers_all_four_keys():
    """MQ-NIAH: four gold values, one per planted key, each key named in the question, target lists them all."""
    for seed in range(3):
        ex = niah.make_example("mq_niah", 400, 0.5, random.Random(seed))
        question = decode(ex.prompt_ids).rsplit("Question:", 1)[1]
        found = [re.match(r" The special magic number for ([a-z-]+) is: (\d{7})\.", decode(ex.prompt_ids[p:p + 24]))
                 for p in ex.needle_token_pos]
        assert ex.answers == [m.group(2) for m in found] and len(set(ex.answers)) == 4
        assert all(m.group(1) in question for m in found) and ex.target == textgen.format_answer(ex.answers)


def test_every_target_fits_the_decoding_budget():
    """Greedy decoding of max_new_tokens can emit the whole gold continuation, for every task."""
    for task in niah.TASKS:
        for ex in niah.make_task_examples(task, 10, 300, 0.5):
            assert len(encode(ex.target)) <= ex.max_new_tokens, (task, ex.target)


def test_the_samples_of_a_cell_differ():
    """make_task_examples draws sample i from its own rng: the 4 samples of a cell are 4 different prompts."""
    for task in niah.TASKS:
        assert len({tuple(e.prompt_ids) for e in niah.make_task_examples(task, 4, 300, 0.5)}) == 4


def test_noise_haystack_reads_as_cut_from_the_repeated_sentences():
    """The filler is a contiguous piece of RULER's cycle: a sentence TAIL first, then whole sentences in order."""
    cycle = "".join(" " + s for s in textgen.NOISE_SENTENCES) * 40
    for length in range(150, 160):
        ex = niah.make_example("s_niah", length, 1.0, random.Random(length))
        assert decode(ex.prompt_ids[N_HEADER:ex.needle_token_pos[0]]) in cycle, length


def test_two_hop_gold_positions_are_company_then_founder():
    """needle_token_pos[0] starts the asked company's passage and [1] the founder's, wherever they land."""
    for seed in range(60):
        ex = qa.make_qa_example(300, (seed % 5) / 4, random.Random(seed), hops=2)
        company = re.search(r"founder of (.+) born\?\nAnswer:$", decode(ex.prompt_ids)).group(1)
        first, second = (decode(ex.prompt_ids[p:]).split("\n")[0] for p in ex.needle_token_pos)
        assert company in first and "found" in first and ex.answers[0] in second and "born" in second.lower()


def test_qa_gold_person_is_named_in_one_passage_only():
    """Distractors never reuse the asked person's name (two birthplaces would make the question ambiguous)."""
    for seed in range(30):
        ex = qa.make_qa_example(2000, 0.5, random.Random(seed))
        passages, question = decode(ex.prompt_ids).rsplit("\n\n" + textgen.QA_INSTRUCTION, 1)
        name = re.search(r"Question: (?:Where was|Which company does) ([A-Z][a-z]+ [A-Z][a-z]+)", question).group(1)
        assert sum(name in p for p in passages.split("\nPassage ")[1:]) == 1, seed


def test_qa_filler_ends_on_a_whole_sentence():
    """The prose filler is a sentence tail then whole sentences, so the passages end on '.' before the question."""
    for seed in range(20):
        text = decode(qa.make_qa_example(400, 0.5, random.Random(seed)).prompt_ids)
        assert text.rsplit("\n\n" + textgen.QA_INSTRUCTION, 1)[0].endswith("."), seed


def test_qa_depth_outside_the_unit_interval_is_refused():
    for task, depth in (("qa", 1.5), ("qa_2hop", -0.1)):
        with pytest.raises(ValueError, match="depth"):
            niah.make_example(task, 500, depth, random.Random(0))


def test_unique_draws_distinct_items_avoiding_the_given_ones_and_keys_join_with_and():
    """unique() never repeats or returns an avoided item; MQ keys read 'a, b and c'."""
    def letter(rng, split):
        return rng.choice("abc")
    for seed in range(5):
        assert sorted(textgen.unique(random.Random(seed), letter, "eval", 3)) == ["a", "b", "c"]
        assert sorted(textgen.unique(random.Random(seed), letter, "eval", 2, avoid={"a"})) == ["b", "c"]
    assert textgen.join_keys(["a"]) == "a" and textgen.join_keys(["a", "b", "c"]) == "a, b and c"


def test_set_seed_reaches_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))
    common.set_seed(3)
    first = draw()
    common.set_seed(3)
    assert draw() == first
    common.set_seed(4)
    assert all(a != b for a, b in zip(draw(), first))


def test_pick_device_auto_and_cuda_index_bounds(monkeypatch):
    """auto is CUDA when present; cuda:N must exist; without CUDA, auto is the CPU and cuda is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.pick_device("auto") == torch.device("cuda") and common.pick_device("cuda:0").index == 0
    with pytest.raises(ValueError, match="1 CUDA device"):
        common.pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.pick_device("auto") == CPU
    with pytest.raises(ValueError, match="not available"):
        common.pick_device("cuda")
