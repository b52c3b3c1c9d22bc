"""A run never loses what it already wrote: no non-finite checkpoint, no run folder clobbered by a run that fails on
bad input, no duplicate metric lines after a resume, no stale temp files (common.py, trainer.py, train.py)."""
import dataclasses
import json
import os

import pytest
import torch

import train
import tta
from refine_mini import trainer
from refine_mini.common import CheckpointError, clock, load_checkpoint, save_checkpoint
from refine_mini.model import FastWeightLM
from refine_mini.resume import rng_state, set_rng_state, trim_log
from refine_mini.trainer import make_optimizer, model_from_checkpoint, pretrain, save_run, skip_streak
from tests.test_regimes import LENGTH, tiny_ckpt  # noqa: F401 (a fixture)
from tests.test_train import KillingCorpus, Killed, RandomCorpus, short_run, tiny_cfg


def test_a_step_that_makes_the_weights_non_finite_stops_the_run_before_it_saves(tmp_path, monkeypatch):
    """The last step before a checkpoint blows the weights up (its lr is inf); the loss of that step was still
    finite."""
    cfg = short_run()
    pretrain(tiny_cfg(), dataclasses.replace(cfg, max_steps=3), RandomCorpus(), tmp_path, "cpu")
    good = load_checkpoint(tmp_path)
    monkeypatch.setattr(trainer, "lr_at", lambda step, cfg: float("inf"))
    with pytest.raises(FloatingPointError, match="an optimizer step made the weights non-finite"):
        pretrain(tiny_cfg(), dataclasses.replace(cfg, max_steps=4), RandomCorpus(), tmp_path, "cpu", resume=True)
    kept = load_checkpoint(tmp_path)
    assert kept["step"] == 3 and all(torch.equal(v, kept["model"][k]) for k, v in good["model"].items())
    model = model_from_checkpoint(good, "cpu")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not saved"):
        save_run(tmp_path, model, make_optimizer(model, cfg), 4, model.cfg, cfg, "pretrain")
    assert load_checkpoint(tmp_path)["step"] == 3


def test_checkpoints_with_bad_weights_or_config_are_one_line_errors(tmp_path):
    model = FastWeightLM(tiny_cfg())
    cfg = dataclasses.asdict(model.cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    next(iter(weights.values())).view(-1)[0] = float("inf")
    cases = {"non-finite": {"model": weights, "model_config": cfg},
             "do not fit": {"model": model.state_dict(), "model_config": {**cfg, "d_model": 48}},
             "do not fit ": {"model": model.state_dict(), "model_config": {**cfg, "no_such_field": 1}}}
    for message, payload in cases.items():
        save_checkpoint(tmp_path / "c.pt", payload)
        with pytest.raises(CheckpointError, match=message.strip()):
            model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"), "cpu")
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "model_config": "deltanet"})
    with pytest.raises(CheckpointError, match="no model_config"):
        load_checkpoint(tmp_path / "c.pt")
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "model_config": cfg})
    with pytest.raises(CheckpointError, match="cannot be resumed: it holds no optimizer, step, rng"):
        load_checkpoint(tmp_path / "c.pt", for_resume=True)


def fake_run_folder(path):
    path.mkdir(parents=True)
    files = {"ckpt.pt": b"old checkpoint", "config.json": b'{"old": 1}', "metrics.jsonl": b'{"step": 1}\n'}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def test_a_fresh_run_into_a_run_folder_is_refused_and_leaves_it_untouched(tmp_path, capsys):
    files = fake_run_folder(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "deltanet", "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert e.value.code == 2 and "already holds a run; pass --resume" in capsys.readouterr().err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files


def test_a_run_that_fails_on_its_inputs_writes_nothing_even_with_overwrite(tmp_path, tiny_ckpt, capsys):  # noqa: F811
    """mid with an empty corpus, post with a length a training task cannot fit, c chunks or k-token rollouts that a
    document cannot hold: all checked before any write."""
    (tmp_path / "empty.txt").write_text("")
    for i, (regime, extra, message) in enumerate((
            ("mid", ["--data", str(tmp_path / "empty.txt")], "empty"),
            ("post", ["--seq-len", "100"], "--seq-len 100 is too short for task mk_niah"),
            ("mid", ["--seq-len", "64", "--c", "65"], "documents of 64 tokens cannot be cut into c=65 chunks"),
            ("mid", ["--seq-len", "64", "--k", "64"], "too short for min_prefix=1, end_margin=64"),
            ("post", ["--k", "512"], "too short for min_prefix=1, end_margin=512"))):
        files = fake_run_folder(tmp_path / str(i))
        with pytest.raises(SystemExit) as e:
            train.main(["--model", "deltanet", "--regime", regime, "--init", str(tiny_ckpt), "--overwrite",
                        "--out", str(tmp_path / str(i)), *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err.lower()
        assert {name: (tmp_path / str(i) / name).read_bytes() for name in files} == files


def test_resume_drops_the_lines_logged_after_the_checkpoint(tmp_path):
    cfg = short_run()
    with pytest.raises(Killed):  # killed during step 5: lines for steps 1-4 logged, checkpoint at step 3
        pretrain(tiny_cfg(), cfg, KillingCorpus(at=4), tmp_path, "cpu")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by the kill
    pretrain(tiny_cfg(), cfg, RandomCorpus(), tmp_path, "cpu", resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    trim_log(tmp_path / "metrics.jsonl", 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoint_gets_the_usual_file_mode_and_stale_temp_files_go(tmp_path):
    stale = tmp_path / ".ckpt.pt.abc123.tmp"  # what a save killed by SIGKILL leaves behind
    stale.write_bytes(b"")
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {}})
    umask = os.umask(0)
    os.umask(umask)
    assert not stale.exists() and (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_checkpoint_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, monkeypatch):
    """Durability order of write_atomic: the temp file's bytes reach the disk before the rename, and the folder (which
    holds the rename) is fsynced after it, so after a power cut ckpt.pt is the old checkpoint or the whole new one."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "folder" if st.st_ino == os.stat(tmp_path).st_ino else f"file of {st.st_size} B"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.ones(3)}, "model_config": {"mixer": "deltanet"}})
    size = (tmp_path / "ckpt.pt").stat().st_size
    assert events == [("fsync", f"file of {size} B"), ("replace", "ckpt.pt"), ("fsync", "folder")]


def test_tta_refuses_more_sft_steps_than_prompts(tiny_ckpt, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        tta.main(["--ckpt", str(tiny_ckpt), "--task", "s_niah", "--samples", "2", "--batch-size", "2",
                  "--sft-steps", "3", "--length", str(LENGTH)])
    assert e.value.code == 2 and "cannot exceed --batch-size" in capsys.readouterr().err


def test_unwritable_output_folders_are_one_line_errors_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "deltanet", "--out", str(tmp_path / "a_file" / "run")])
    assert e.value.code == 2 and "cannot write folder" in capsys.readouterr().err
    from refine_mini.evaluate import check_plot_path, check_results_path
    with pytest.raises(ValueError, match=r"^--out .*results\.json: cannot write in .*a_file$"):  # before evaluating
        check_results_path(tmp_path / "a_file" / "results.json")
    with pytest.raises(ValueError, match=r"^--plot .*x\.png: cannot write in .*a_file$"):
        check_plot_path(tmp_path / "a_file" / "x.png", tmp_path / "results.json")


def test_rng_states_never_touch_cuda_even_where_it_is_present(monkeypatch):
    """Checkpoints hold the CPU-side RNG states only: saving CUDA's would start a CUDA context in CPU runs, and a
    resume with fewer visible GPUs than at save time crashed restoring them. An old checkpoint's entry is ignored."""
    def touched(*args, **kwargs):
        raise AssertionError("touched CUDA's RNG")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", touched)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", touched)
    state = rng_state()
    assert set(state) == {"python", "torch", "numpy"}
    expected = torch.rand(3)
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2})  # saved with 2 GPUs visible
    assert torch.equal(torch.rand(3), expected)


def test_the_step_clock_waits_for_cuda_and_not_for_the_cpu(monkeypatch):
    """tokens_per_s and step_s read `clock`: on CUDA it must synchronise first, or it times kernel launches."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    t0 = clock(torch.device("cpu"))
    assert waited == [] and clock("cuda:1") >= t0 and waited == ["cuda:1"]


def test_a_run_that_keeps_skipping_nan_gradients_stops(tmp_path, tiny_ckpt, monkeypatch, capsys):  # noqa: F811
    """clip_and_step skips a step whose gradient norm is NaN; four in a row are tolerated, the fifth stops the run
    (pre-training and the regimes alike) before anything is saved, so the checkpoint stays the last good one."""
    assert [skip_streak(s, g) for s, g in [(0, 1.0), (0, float("nan")), (3, float("inf")), (3, 2.0), (0, None)]] \
        == [0, 1, 4, 0, 0]
    with pytest.raises(FloatingPointError, match="5 optimizer steps in a row"):
        skip_streak(4, float("nan"))
    cfg = dataclasses.replace(short_run(), ckpt_every=100)
    pretrain(tiny_cfg(), dataclasses.replace(cfg, max_steps=3), RandomCorpus(), tmp_path / "pre", "cpu")
    good = load_checkpoint(tmp_path / "pre")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="5 optimizer steps in a row"):
        pretrain(tiny_cfg(), dataclasses.replace(cfg, max_steps=20), RandomCorpus(), tmp_path / "pre", "cpu",
                 resume=True)
    kept = load_checkpoint(tmp_path / "pre")
    assert kept["step"] == 3 and all(torch.equal(v, kept["model"][k]) for k, v in good["model"].items())
    lines = (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 4  # the four tolerated skips are logged (grad_norm NaN), the fifth stops the run
    out = tmp_path / "mid"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model", "deltanet", "--regime", "mid", "--init", str(tiny_ckpt), "--out", str(out),
                    "--seq-len", str(LENGTH), "--max-steps", "8", "--batch-size", "2", "--c", "2"])
    assert exit_.value.code == 2 and "5 optimizer steps in a row" in capsys.readouterr().err
    assert not (out / "ckpt.pt").exists()


def test_a_checkpoint_with_fewer_token_rows_than_the_tokenizer_is_a_one_line_error(tmp_path, capsys):
    """A model trained on a small vocabulary (as the unit tests' are) cannot embed the tokenizer's ids: every script
    that feeds it tokenized text refuses it in one line, instead of an IndexError deep in the embedding."""
    import eval_niah
    model = FastWeightLM(tiny_cfg())  # vocab_size 64
    save_run(tmp_path / "small", model, make_optimizer(model, short_run()), 1, model.cfg, short_run(), "pretrain")
    with pytest.raises(CheckpointError, match="vocabulary of 64 tokens, but the tokenizer has 8193"):
        load_checkpoint(tmp_path / "small", vocab=8193)
    assert load_checkpoint(tmp_path / "small", vocab=64)["step"] == 1  # enough rows
    small = str(tmp_path / "small")
    for main, argv in ((eval_niah.main, ["--ckpt", small, "--out", str(tmp_path / "eval.json")]),
                       (tta.main, ["--ckpt", small, "--task", "s_niah"]),
                       (train.main, ["--model", "deltanet", "--regime", "mid", "--init", small,
                                     "--out", str(tmp_path / "mid")])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "vocabulary of 64 tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "eval.json").exists() and not any((tmp_path / "mid").glob("*"))  # nothing written


def test_a_streak_of_skipped_steps_goes_on_across_a_resume(tmp_path, tiny_ckpt, monkeypatch, capsys):  # noqa: F811
    """The streak is saved with the checkpoint: three NaN steps before it and two after a resume are the five in a row
    that stop the run (pre-training and the regimes alike), as they would without the interruption."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_after(n):  # the real clip for the first n calls, then a NaN gradient norm
        def clip(params, max_norm):
            calls.append(max_norm)
            return real(params, max_norm) if len(calls) <= n else torch.tensor(float("nan"))
        return clip
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_after(3))
    pretrain(tiny_cfg(), short_run(), RandomCorpus(), tmp_path / "pre", "cpu")  # steps 4-6 skipped, saved at 6
    assert load_checkpoint(tmp_path / "pre")["skipped"] == 3
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_after(0))
    with pytest.raises(FloatingPointError, match="5 optimizer steps in a row"):
        pretrain(tiny_cfg(), dataclasses.replace(short_run(), max_steps=12), RandomCorpus(), tmp_path / "pre", "cpu",
                 resume=True)
    assert len((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()) == 6 + 1  # step 7 logged, 8 stops
    calls.clear()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_after(1))
    mid = ["--model", "deltanet", "--regime", "mid", "--init", str(tiny_ckpt), "--out", str(tmp_path / "mid"),
           "--seq-len", str(LENGTH), "--batch-size", "2", "--c", "2"]
    assert train.main(mid + ["--max-steps", "4"]) is not None and load_checkpoint(tmp_path / "mid")["skipped"] == 3
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_after(0))
    with pytest.raises(SystemExit) as exit_:
        train.main(mid + ["--max-steps", "8", "--resume"])
    assert exit_.value.code == 2 and "5 optimizer steps in a row" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "mid")["step"] == 4
    saved = load_checkpoint(tmp_path / "pre")
    for bad in (-1, "3", 2.0):
        save_checkpoint(tmp_path / "bad.pt", {**saved, "skipped": bad})
        with pytest.raises(CheckpointError, match="skipped-step count are malformed"):
            load_checkpoint(tmp_path / "bad.pt", for_resume=True)
