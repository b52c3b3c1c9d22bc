"""Bad inputs found by probing the scripts from outside: an --overwrite stopped before its first save, an --out that
names a checkpoint, a resume of NaN weights, an LR beyond float32, memory that runs out, a .jsonl nested past the
stack, mid/post flags checked only after a base pre-training, --init or --max-steps that a resume would ignore,
checkpoints whose fields were edited, a NaN loss before the first save, a fresh run failing on its data, an empty
path, and a --samples too large to build. Each must end in one line and a non-zero exit, leaving what was written as
it was (and no empty folder that the failed run created)."""

import argparse
import json
from pathlib import Path

import pytest
import torch

import eval_niah
import train
import tta
from refine_mini import data, niah, regimes, trainer
from refine_mini.common import CheckpointError, base_checkpoint, load_checkpoint, save_checkpoint
from refine_mini.evaluate import find_runs
from refine_mini.trainer import model_from_checkpoint
from tests.test_regimes import LENGTH, run_cli, small_defaults, tiny_ckpt, tiny_model_cfg  # noqa: F401 (fixtures)

OOM = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8e12"


@pytest.fixture
def pretrained(tmp_path, monkeypatch):
    """A real 2-step pre-training run of a tiny DeltaNet (the CLI's model config shrunk) in tmp_path/run."""
    monkeypatch.setattr(train, "default_model_config", tiny_model_cfg)
    out = tmp_path / "run"
    train.main(["--model", "deltanet", "--out", str(out), "--max-steps", "2", "--seq-len", "32", "--batch-size", "1",
                "--device", "cpu"])
    return out


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def fails(capsys, main, argv, code=2) -> str:
    """Run a script's main(argv); it must exit with `code` and one error line on stderr (after any progress bar),
    which is returned."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert e.value.code == code and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert not any(line.startswith("error") for line in lines[:-1]), err
    return lines[-1]


def interrupt(*_, **__):
    raise KeyboardInterrupt


def test_an_overwrite_stopped_before_its_first_save_does_not_leave_the_old_checkpoint(pretrained, capsys,
                                                                                      monkeypatch):
    """The old ckpt.pt beside the new config.json and metrics.jsonl would be "resumed" as if it were the new run."""
    monkeypatch.setattr(trainer, "clip_and_step", interrupt)  # Ctrl-C in the first step, long before a save
    argv = ["--model", "deltanet", "--out", str(pretrained), "--max-steps", "2", "--seq-len", "32", "--lr", "0.001"]
    err = fails(capsys, train.main, [*argv, "--overwrite"], code=130)
    assert f"no checkpoint was saved in {pretrained} yet" in err
    assert not (pretrained / "ckpt.pt").exists() and json.loads((pretrained / "config.json").read_text())["train"]["lr"] == 0.001
    assert "holds no checkpoint" in fails(capsys, train.main, [*argv, "--resume"])


def test_an_interrupted_resume_names_the_checkpoint_it_keeps(pretrained, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "clip_and_step", interrupt)
    before = files(pretrained)
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(pretrained), "--resume", "--max-steps", "4"],
                code=130)
    assert f"the last checkpoint in {pretrained} is kept (--resume continues from it)" in err
    assert files(pretrained)["ckpt.pt"] == before["ckpt.pt"]


def test_a_regime_overwrite_clears_the_old_checkpoint_before_it_writes(tiny_ckpt, small_defaults, tmp_path,  # noqa
                                                                       capsys, monkeypatch):
    run_cli(tmp_path, "mid", "ntp", tiny_ckpt)
    out = tmp_path / "mid-ntp"
    monkeypatch.setattr(regimes, "clip_and_step", interrupt)
    argv = ["--model", "deltanet", "--regime", "mid", "--objective", "ntp", "--init", str(tiny_ckpt), "--out",
            str(out), "--seq-len", str(LENGTH), "--max-steps", "2", "--lr", "0.002", "--overwrite"]
    assert "no checkpoint was saved" in fails(capsys, train.main, argv, code=130)
    assert not (out / "ckpt.pt").exists() and json.loads((out / "config.json").read_text())["run"]["lr"] == 0.002


def test_a_resume_keeps_its_base_and_refuses_to_go_backwards(tiny_ckpt, small_defaults, tmp_path, capsys):  # noqa
    """--init on a resume must name the run's own base; --max-steps below the reached step would do nothing and
    rewrite config.json. Both refused, the folder unchanged (pre-training's --max-steps too: next test)."""
    run_cli(tmp_path, "mid", "ntp", tiny_ckpt)
    out = tmp_path / "mid-ntp"
    before = files(out)
    resume = ["--model", "deltanet", "--regime", "mid", "--out", str(out), "--resume"]
    assert "--init" in fails(capsys, train.main, [*resume, "--init", str(tmp_path / "elsewhere.pt")])
    assert "--max-steps 1 is below step 2" in fails(capsys, train.main, [*resume, "--max-steps", "1"])
    assert files(out) == before
    train.main([*resume, "--init", str(tiny_ckpt), "--max-steps", "3"])  # its own base, restated: accepted
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_pretraining_resume_refuses_nan_weights_and_fewer_steps(pretrained, capsys):
    resume = ["--model", "deltanet", "--out", str(pretrained), "--resume"]
    assert "--max-steps 1 is below step 2" in fails(capsys, train.main, [*resume, "--max-steps", "1"])
    ckpt = load_checkpoint(pretrained)
    next(iter(ckpt["model"].values()))[0].fill_(float("nan"))
    save_checkpoint(pretrained / "ckpt.pt", ckpt)
    before = files(pretrained)
    assert "non-finite (NaN or inf) weights" in fails(capsys, train.main, [*resume, "--max-steps", "3"])
    assert files(pretrained) == before


def test_eval_never_overwrites_a_file_that_is_not_a_results_json(pretrained, capsys):
    """Neither the checkpoint nor the run's config.json (a JSON object, but not an eval_niah results file)."""
    before = files(pretrained)
    for name in ("ckpt.pt", "config.json"):
        err = fails(capsys, eval_niah.main, ["--ckpt", str(pretrained), "--out", str(pretrained / name), "--tasks",
                                            "s_niah", "--lengths", "128", "--samples", "1"])
        assert "is not an eval_niah results file; refusing to overwrite it" in err and files(pretrained) == before


def test_out_of_memory_is_one_line_and_other_runtime_errors_still_surface(tiny_ckpt, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    def oom(*_, **__):
        raise RuntimeError(OOM)

    monkeypatch.setattr(train, "run_pretrain", oom)
    assert "out of memory" in fails(capsys, train.main, ["--model", "deltanet", "--out", str(tmp_path / "a")])
    monkeypatch.setattr(tta, "run_method", oom)
    assert "out of memory" in fails(capsys, tta.main, ["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2",
                                                       "--batch-size", "2"])
    monkeypatch.setattr(eval_niah, "evaluate_run", oom)
    assert "out of memory" in fails(capsys, eval_niah.main, ["--ckpt", str(tiny_ckpt), "--tasks", "s_niah",
                                                             "--lengths", str(LENGTH), "--samples", "1"])
    monkeypatch.setattr(train, "run_pretrain", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not dressed up as bad input
        train.main(["--model", "deltanet", "--out", str(tmp_path / "b")])


def test_eval_interrupted_while_loading_runs_is_one_line(tiny_ckpt, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(eval_niah, "resolve_runs", interrupt)
    assert "interrupted" in fails(capsys, eval_niah.main, ["--ckpt", str(tiny_ckpt)], code=130)


def test_a_jsonl_line_python_cannot_parse_names_its_file_and_line(tmp_path):
    deep, huge = tmp_path / "deep.jsonl", tmp_path / "huge.jsonl"
    deep.write_text('{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    huge.write_text('{"text": "ok", "n": ' + "9" * 5000 + "}\n")  # past Python's 4300-digit int limit
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: bad JSON line \(RecursionError\)"):
        data.load_text_documents(deep)
    with pytest.raises(ValueError, match=r"huge\.jsonl:1: bad JSON line"):
        data.load_text_documents(huge)


def test_regime_flags_are_checked_before_a_base_is_pretrained(tmp_path, capsys, monkeypatch):
    """With no base checkpoint, a bad --c (or a --seq-len too short for post's prompts) used to surface only after
    minutes of pre-training the base."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(regimes, "base_checkpoint", lambda *a: pytest.fail("pre-trained a base for a bad flag"))
    err = fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", "--c", "0"])
    assert "c, k, n and minibatches must all be ints >= 1, got (0, 5, 1, 4)" in err
    assert "too short for task" in fails(capsys, train.main, ["--model", "deltanet", "--regime", "post", "--seq-len",
                                                              "64"])
    assert "cannot be cut into c=100 chunks" in fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid",
                                                                           "--seq-len", "64", "--c", "100"])


def test_edited_checkpoint_fields_are_checkpoint_errors(pretrained, capsys):
    ckpt = load_checkpoint(pretrained)
    with pytest.raises(CheckpointError, match="do not fit its model config"):  # ZeroDivisionError inside
        model_from_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], "n_heads": 0}}, torch.device("cpu"))
    for field, value in (("rng", {}), ("step", "2"), ("step", -1), ("optimizer", [])):
        save_checkpoint(pretrained / "ckpt.pt", {**ckpt, field: value})
        with pytest.raises(CheckpointError, match="step, optimizer, RNG states or skipped-step count are malformed"):
            load_checkpoint(pretrained, for_resume=True)
    save_checkpoint(pretrained / "ckpt.pt", {**ckpt, "train_config": {**ckpt["train_config"], "seq_len": "abc"}})
    before = files(pretrained)
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(pretrained), "--resume"])
    assert "saved seq_len is 'abc' (str, not int)" in err and files(pretrained) == before
    assert "not a length: 'abc'" in fails(capsys, eval_niah.main, ["--ckpt", str(pretrained)])


def test_a_folder_named_ckpt_pt_is_not_a_run(tmp_path):
    (tmp_path / "runs" / "r" / "ckpt.pt").mkdir(parents=True)
    assert find_runs(tmp_path / "runs") == []


def test_a_base_whose_pretraining_was_stopped_is_finished_before_it_is_used(pretrained, tmp_path, capsys,
                                                                            monkeypatch):
    """A Ctrl-C in the base pre-training that a mid/post run started leaves runs/<model>-pretrain at its last
    checkpoint; the next run must finish it (resuming with its own settings), not train on a half-trained base."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "runs" / "deltanet-pretrain"
    base.parent.mkdir()
    pretrained.rename(base)  # finished: 2 steps of 2
    calls, real = [], train.run_pretrain
    monkeypatch.setattr(train, "run_pretrain", lambda args, out, device: calls.append((vars(args), out)))
    args = argparse.Namespace(model="deltanet", seed=None, init=None, compile="off", grad_checkpoint=True)
    assert base_checkpoint(args, "cpu") == Path("runs/deltanet-pretrain") and calls == []
    ckpt = load_checkpoint(base)
    save_checkpoint(base / "ckpt.pt", {**ckpt, "train_config": {**ckpt["train_config"], "max_steps": 5}})
    base_checkpoint(args, "cpu")
    assert calls == [({"model": "deltanet", "resume": True, "compile": "off", "grad_checkpoint": True},
                      Path("runs/deltanet-pretrain"))]
    assert "stopped at step 2 of 5: finishing it first" in capsys.readouterr().out
    monkeypatch.setattr(train, "run_pretrain", real)  # and the real resume gets there, with the base's settings
    base_checkpoint(args, "cpu")
    finished = load_checkpoint(base)
    assert finished["step"] == 5 and finished["train_config"]["seq_len"] == 32


def nan_weights(tokens, answer_weight):  # stands in for trainer.answer_weights: the step's loss comes out NaN
    return torch.full(tokens.shape, float("nan"))


def test_a_nan_loss_says_whether_a_checkpoint_was_kept(pretrained, tmp_path, capsys, monkeypatch):
    """At step 0 of a fresh run there is no "last good checkpoint" to keep; after a save there is one."""
    monkeypatch.setattr(trainer, "answer_weights", nan_weights)
    before = files(pretrained)
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(pretrained), "--resume", "--max-steps", "3"])
    assert "non-finite loss nan at step 2; stopping" in err and "the last checkpoint in" in err and "is kept" in err
    assert files(pretrained)["ckpt.pt"] == before["ckpt.pt"]
    fresh = tmp_path / "fresh"
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(fresh), "--max-steps", "2", "--seq-len",
                                     "32", "--batch-size", "1"])
    assert "at step 0; stopping; no checkpoint was saved in" in err and not (fresh / "ckpt.pt").exists()


def test_tta_stopped_by_nan_says_it_wrote_nothing(tiny_ckpt, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(tta, "run_method", lambda *a: (_ for _ in ()).throw(FloatingPointError("non-finite logits")))
    err = fails(capsys, tta.main, ["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2"])
    assert err == "error: non-finite logits; nothing was written"


def test_a_fresh_run_that_fails_on_its_data_leaves_no_empty_folder(tiny_ckpt, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch):
    """A run that fails before writing anything leaves no folder (its --out, the runs/ above it, a base's folder):
    each is made only at its first write. A folder that was there before stays."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    bad = ["--data", str(tmp_path / "empty.txt")]
    assert "empty corpus" in fails(capsys, train.main, ["--model", "deltanet", "--out", "a/b/run", *bad])
    assert "empty corpus" in fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", "--init",
                                                        str(tiny_ckpt), "--out", "mid", *bad])
    assert "empty corpus" in fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", *bad])  # base too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "empty.txt"]
    (tmp_path / "kept").mkdir()
    assert "empty corpus" in fails(capsys, train.main, ["--model", "deltanet", "--out", "kept", *bad])
    assert (tmp_path / "kept").is_dir()


@pytest.mark.parametrize("flag", ["--out", "--data", "--init"])
def test_an_empty_path_is_refused_not_taken_for_the_default(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", flag, " "])
    assert f"{flag} is empty" in err and list(tmp_path.iterdir()) == []


def test_a_prompt_count_too_large_to_build_is_refused_before_building(tiny_ckpt, capsys, monkeypatch):  # noqa: F811
    """--samples 10**12 used to spend hours building prompts before running out of memory."""
    niah.check_prompt_budget(niah.MAX_PROMPT_TOKENS // 512, 512, "x")  # at the limit: accepted
    with pytest.raises(ValueError, match="at most 67,108,864 tokens"):
        niah.check_prompt_budget(niah.MAX_PROMPT_TOKENS // 512 + 1, 512, "x")
    monkeypatch.setattr(niah, "make_example", lambda *a: pytest.fail("built a prompt"))
    err = fails(capsys, tta.main, ["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", str(10 ** 12),
                                   "--batch-size", "4", "--length", "512"])
    assert "--samples and --length ask for 1,000,000,000,000 prompts of 512 tokens" in err
    err = fails(capsys, eval_niah.main, ["--ckpt", str(tiny_ckpt), "--tasks", "s_niah", "--lengths", "512",
                                         "--depths", "0", "1", "--samples", str(2 ** 17)])
    assert "--samples x --depths ask for 262,144 prompts of 512 tokens" in err
