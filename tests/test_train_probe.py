"""Outside probe of the training side: a resume to a larger --max-steps keeps the cosine's horizon (resume.py: the
LR stays on its floor), contradictory or unused flags are refused before any work, --overwrite never deletes the
checkpoint the run starts from, and a resumed mid run reports the validation taken before its first batch."""
import dataclasses
import json

import pytest

import train
from refine_mini import regimes
from refine_mini.common import load_checkpoint
from refine_mini.trainer import lr_at, pretrain
from tests.test_input_guards import fails
from tests.test_regime_contracts import ckpt_every_2, jsonl, killed_in_batch  # noqa: F401 (a fixture)
from tests.test_regimes import LENGTH, small_defaults, tiny_ckpt, tiny_model_cfg  # noqa: F401 (fixtures)
from tests.test_run_safety import fake_run_folder
from tests.test_train import Killed, KillingCorpus, RandomCorpus, short_run, tiny_cfg


def test_a_resume_to_more_steps_keeps_the_schedule_and_then_stays_on_the_floor(tmp_path):
    """--max-steps is FREE on a resume: it changes when the run ends, not the LR of the steps it shares with the
    run it continues. Killed after its step-3 checkpoint and resumed to 8 steps, the run logs the 6-step run's LRs
    for steps 1-6 and the floor (lr x min_lr_ratio) after them; it used to stretch the cosine over 8 steps."""
    cfg = short_run()
    pretrain(tiny_cfg(), cfg, RandomCorpus(), tmp_path / "full", "cpu")
    with pytest.raises(Killed):
        pretrain(tiny_cfg(), cfg, KillingCorpus(at=4), tmp_path / "longer", "cpu")
    pretrain(tiny_cfg(), dataclasses.replace(cfg, max_steps=8), RandomCorpus(), tmp_path / "longer", "cpu",
             resume=True)
    full = [line["lr"] for line in jsonl(tmp_path / "full" / "metrics.jsonl")]
    longer = [line["lr"] for line in jsonl(tmp_path / "longer" / "metrics.jsonl")]
    assert full == [lr_at(s, cfg) for s in range(6)] and longer[:6] == full
    assert longer[6:] == [cfg.lr * cfg.min_lr_ratio] * 2
    assert load_checkpoint(tmp_path / "longer")["train_config"]["decay_steps"] == 6  # kept through further resumes


def test_resume_and_overwrite_together_are_refused_and_the_run_is_untouched(tmp_path, capsys):
    files = fake_run_folder(tmp_path / "run")
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(tmp_path / "run"), "--resume", "--overwrite"])
    assert "--resume and --overwrite" in err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files


@pytest.mark.parametrize("argv, flag", [
    (["--regime", "mid", "--objective", "ntp", "--c", "4"], "--c"),
    (["--regime", "mid", "--objective", "ntp", "--reward", "binary"], "--reward"),
    (["--regime", "post", "--objective", "sft", "--lambda-rl", "0.5"], "--lambda-rl"),
    (["--regime", "post", "--objective", "nested-sft", "--k", "3"], "--k"),
    (["--regime", "mid", "--minibatches", "3"], "--minibatches"),
    (["--regime", "post", "--schedule", "single", "--minibatches", "2"], "--minibatches")])
def test_a_refine_flag_the_run_would_ignore_is_refused_before_any_work(argv, flag, tmp_path, capsys, monkeypatch):
    """The baselines never read c, k, n, selection, reward or lambda_rl, and the single schedule never reads
    --minibatches: such a flag used to be accepted and silently ignored (as --data for post is refused)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(regimes, "base_checkpoint", lambda *a: pytest.fail("pre-trained a base for an unused flag"))
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(tmp_path / "run"), *argv])
    assert f"{flag} is not used" in err and not (tmp_path / "run").exists()


def test_the_flags_a_baseline_does_read_are_accepted():
    """The step count of every baseline comes from --schedule/--minibatches (regimes.steps_per_batch)."""
    for regime, objective in (("mid", "ntp"), ("post", "sft"), ("post", "nested-sft"), ("mid", "refine")):
        args = train.build_parser().parse_args(["--model", "deltanet", "--regime", regime, "--objective", objective,
                                                "--schedule", "minibatch", "--minibatches", "2"])
        cfg = regimes.resolve_config(args)
        assert (cfg.refine["schedule"], cfg.refine["minibatches"]) == ("minibatch", 2)


@pytest.mark.parametrize("init", ["folder", "file"])
def test_overwrite_never_deletes_the_checkpoint_the_run_starts_from(init, tmp_path, tiny_ckpt, capsys):  # noqa: F811
    """--init naming the --out's own checkpoint with --overwrite used to train from it and then delete it: the run's
    recorded init then named the new run's own checkpoint, and the base was gone."""
    before = (tiny_ckpt / "ckpt.pt").read_bytes()
    argv = ["--model", "deltanet", "--regime", "mid", "--objective", "ntp", "--out", str(tiny_ckpt), "--overwrite",
            "--init", str(tiny_ckpt if init == "folder" else tiny_ckpt / "ckpt.pt"), "--seq-len", str(LENGTH),
            "--max-steps", "1"]
    assert "would delete the checkpoint the run starts from" in fails(capsys, train.main, argv)
    assert (tiny_ckpt / "ckpt.pt").read_bytes() == before and not (tiny_ckpt / "metrics.jsonl").exists()


def test_a_resumed_mid_run_reports_the_validation_before_its_first_batch(tmp_path, tiny_ckpt, ckpt_every_2,
                                                                        monkeypatch):  # noqa: F811
    """The summary's val_loss_before is the base's validation, as in the uninterrupted run; a resume used to
    validate its own starting weights again and report them as "before"."""
    args = lambda out, *extra: ["--model", "deltanet", "--regime", "mid", "--init", str(tiny_ckpt), "--out",
                                str(out), "--seq-len", str(LENGTH), "--max-steps", "3", "--lr", "0.01", *extra]
    full = train.main(args(tmp_path / "full"))
    killed_in_batch(3, lambda: train.main(args(tmp_path / "killed")), monkeypatch)
    resumed = train.main(args(tmp_path / "killed", "--resume"))
    assert resumed["val_loss_before"] == full["val_loss_before"] != full["val_loss"]
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)


@pytest.mark.parametrize("files", [{"config.json": b'{"name": "my project"}'}, {"metrics.jsonl": b'{"x": 1}\n'},
                                   {"config.json": b"not json", "metrics.jsonl": b""}])
def test_a_fresh_run_refuses_to_replace_files_no_run_wrote(files, tmp_path, capsys):
    """--out . in a project: no ckpt.pt, but a config.json or metrics.jsonl of something else, which a fresh run
    would replace; it is refused (one line, files untouched). A run's own files, left by one that stopped before its
    first checkpoint, may be replaced (that run's retry)."""
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(tmp_path), "--max-steps", "1"])
    assert "no refine_mini run wrote" in err and all((tmp_path / n).read_bytes() == d for n, d in files.items())
    (tmp_path / "config.json").write_text(json.dumps({"regime": "pretrain"}))
    train.check_no_foreign_files(tmp_path)  # a stopped run's own config: no error


def test_a_nan_in_the_base_pretraining_names_the_base_folder(tmp_path, capsys, monkeypatch):
    """A mid run without --init pre-trains runs/<model>-pretrain first; a NaN there must say so and what the base
    kept, not only what the mid run's own (still empty) folder holds."""
    monkeypatch.chdir(tmp_path)

    def nan_pretrain(args, out, device):
        raise FloatingPointError("loss is nan at step 3")
    monkeypatch.setattr(train, "run_pretrain", nan_pretrain)
    err = fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", "--out", "runs/mid"])
    assert "loss is nan at step 3 (in the base pre-training; no checkpoint was saved in runs/deltanet-pretrain" in err
    assert "runs/mid" in err


@pytest.mark.parametrize("write", ["trim_log", "pretrain config"])
def test_a_failed_write_leaves_the_old_log_and_config_whole(write, tmp_path, monkeypatch):
    """trim_log and a run's config.json are written atomically (a temp file, fsynced, then renamed): a write that
    fails (here fsync, as a full disk or a power cut would) leaves the previous file as it was, not half-written."""
    import os

    from refine_mini.resume import trim_log
    old = {"metrics.jsonl": b'{"step": 1}\n{"step": 2}\n', "config.json": b'{"regime": "pretrain"}'}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        if write == "trim_log":
            trim_log(tmp_path / "metrics.jsonl", 1)
        else:
            pretrain(tiny_cfg(), short_run(), RandomCorpus(), tmp_path, "cpu")
    kept = old if write == "trim_log" else {"config.json": old["config.json"]}  # a fresh run starts its log anew
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept


def test_a_resume_refuses_data_files_edited_since_the_run_started(tmp_path, tiny_ckpt, monkeypatch, capsys):  # noqa
    """--data's token rows are digested into the run's config (data.rows_digest). A resume on edited files would train
    on other rows than the uninterrupted run: it is a one-line error that leaves the run folder as it was, in
    pre-training and mid-training alike; on the same files the run goes on."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[(i + j) % 10] for j in range(n)) for i, n in enumerate([400, 450, 500] * 4)]
    data = tmp_path / "docs.txt"
    data.write_text("\n\n\n".join(docs))
    monkeypatch.setattr(train, "default_model_config", tiny_model_cfg)
    runs = {"pre": ["--model", "deltanet", "--out", str(tmp_path / "pre"), "--data", str(data), "--seq-len", "32",
                    "--batch-size", "2", "--device", "cpu"],
            "mid": ["--model", "deltanet", "--regime", "mid", "--objective", "ntp", "--init", str(tiny_ckpt),
                    "--out", str(tmp_path / "mid"), "--data", str(data), "--seq-len", str(LENGTH), "--device", "cpu"]}
    digests = {}
    for name, argv in runs.items():
        train.main(argv + ["--max-steps", "2"])
        digests[name] = load_checkpoint(tmp_path / name)["train_config"]["data_digest"]
    assert all(len(d) == 16 and int(d, 16) >= 0 for d in digests.values())
    data.write_text("\n\n\n".join(docs).replace("gamma", "omega", 1))  # one word of one document
    for name, argv in runs.items():
        before = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
        err = fails(capsys, train.main, argv + ["--max-steps", "3", "--resume"])
        assert f"--data {data} has changed since this run was started" in err and digests[name] in err
        assert {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} == before
    data.write_text("\n\n\n".join(docs))
    for name, argv in runs.items():
        train.main(argv + ["--max-steps", "3", "--resume"])
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt["step"] == 3 and ckpt["train_config"]["data_digest"] == digests[name]
