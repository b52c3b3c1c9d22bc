"""Bad inputs found by the second probe of the scripts from outside: a results --out over a run's config.json (in
test_input_guards.py), folders left by a failed evaluation, --threads past what torch takes, names too long for the
file system, a metrics log with foreign lines, a --data that is a symlink loop or a FIFO, a batch too large to
build, and --plot paths the picture cannot be saved at. Each must end in one line and exit 2 before any work,
leaving what was written as it was."""
import os

import pytest

import eval_niah
import train
import tta
from refine_mini.resume import trim_log
from tests.test_input_guards import fails, files, pretrained  # noqa: F401 (a fixture)
from tests.test_regimes import LENGTH, run_cli, small_defaults, tiny_ckpt  # noqa: F401 (fixtures)

LONG = "a" * 300  # past the 255 bytes a file name may have (ENAMETOOLONG)


def no_evaluation(*_, **__):
    pytest.fail("evaluated although an input was bad")


def test_a_failed_evaluation_leaves_no_folder_and_a_good_one_makes_it(tiny_ckpt, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    quick = ["--ckpt", str(tiny_ckpt), "--tasks", "s_niah", "--samples", "1", "--depths", "0.5"]
    assert "too short" in fails(capsys, eval_niah.main, [*quick, "--lengths", "50", "--out",
                                                         str(tmp_path / "new" / "a" / "r.json")])
    monkeypatch.setattr(eval_niah, "evaluate_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert "interrupted" in fails(capsys, eval_niah.main, [*quick, "--lengths", str(LENGTH), "--out",
                                                           str(tmp_path / "new" / "r.json")], code=130)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    eval_niah.main([*quick, "--lengths", str(LENGTH), "--out", str(tmp_path / "new" / "a" / "r.json")])
    assert (tmp_path / "new" / "a" / "r.json").is_file()


def test_threads_past_what_torch_takes_are_one_line(tiny_ckpt, capsys):  # noqa: F811
    for value in (str(2 ** 31), "0"):
        assert "--threads must be in [1, " in fails(capsys, eval_niah.main, ["--ckpt", str(tiny_ckpt), "--threads",
                                                                            value])


def test_names_too_long_for_the_file_system_are_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    assert "File name too long" in fails(capsys, train.main, ["--model", "deltanet", "--out", f"runs/{LONG}"])
    assert "File name too long" in fails(capsys, eval_niah.main, ["--ckpt", str(tiny_ckpt), "--out", f"{LONG}.json"])
    monkeypatch.setattr(eval_niah, "evaluate_run", no_evaluation)  # in a folder still to be made: refused up front
    assert "File name too long" in fails(capsys, eval_niah.main, ["--ckpt", str(tiny_ckpt), "--out",
                                                                 f"new/{LONG}.json"])
    assert "File name too long" in fails(capsys, eval_niah.main, ["--ckpt", LONG])
    assert "File name too long" in fails(capsys, tta.main, ["--ckpt", LONG, "--task", "s_niah"])
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # tiny_ckpt's own folder, nothing more


def test_a_metrics_log_with_foreign_lines_stops_the_resume_and_is_left_as_it_was(tiny_ckpt, small_defaults,  # noqa
                                                                                  tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # the last line cut short by a kill: dropped
    trim_log(log, 1)
    assert log.read_text() == '{"step": 1}\n'
    for foreign in ("5", "[1]", "null", '{"step": "x"}', '{"step": true}'):
        log.write_text(f'{{"step": 1}}\n{foreign}\n{{"step": 2}}\n')
        with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics line"):
            trim_log(log, 1)
        assert log.read_text() == f'{{"step": 1}}\n{foreign}\n{{"step": 2}}\n'
    log.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(ValueError, match="not a metrics log"):
        trim_log(log, 1)
    run_cli(tmp_path, "mid", "ntp", tiny_ckpt)  # a real run; its log gets a foreign line before the resume
    out = tmp_path / "mid-ntp"
    foreign = len((out / "metrics.jsonl").read_text().splitlines()) + 1  # the line number "5" gets
    with open(out / "metrics.jsonl", "a") as f:
        f.write("5\n{}\n")
    before = files(out)
    err = fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", "--out", str(out), "--resume",
                                     "--max-steps", "3"])
    assert f"metrics.jsonl:{foreign}: not a metrics line" in err and files(out) == before  # config.json untouched too


def test_a_data_path_that_is_a_symlink_loop_or_a_fifo_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("loop.txt", "loop.txt")
    assert "--data loop.txt:" in fails(capsys, train.main, ["--model", "deltanet", "--data", "loop.txt"])
    os.mkfifo("pipe.txt")  # reading it would block until a writer comes
    assert "pipe.txt: not a regular file" in fails(capsys, train.main, ["--model", "deltanet", "--data", "pipe.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.txt", "pipe.txt"]


@pytest.mark.parametrize("argv, tokens", [(["--seq-len", "1000000000"], "8 x 1,000,000,000"),
                                          (["--batch-size", "1000000"], "1,000,000 x 512"),
                                          (["--regime", "mid", "--seq-len", "1048577"], "4 x 1,048,577"),
                                          (["--regime", "post", "--batch-size", "8193"], "8,193 x 512")])
def test_a_batch_too_large_to_build_is_refused_before_anything_is_written(argv, tokens, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, train.main, ["--model", "deltanet", *argv])
    assert f"--batch-size x --seq-len = {tokens} tokens a batch; at most 4,194,304" in err
    assert list(tmp_path.iterdir()) == []


def test_plot_paths_the_picture_cannot_be_saved_at_are_refused_before_evaluating(tiny_ckpt, tmp_path, capsys,  # noqa
                                                                                  monkeypatch):
    monkeypatch.setattr(eval_niah, "evaluate_run", no_evaluation)
    monkeypatch.setattr(eval_niah, "require_matplotlib", lambda: None)  # as if installed
    (tmp_path / "a_file").write_text("")
    (tmp_path / "pics.png").mkdir()
    out = tmp_path / "r.json"
    for plot, message in ((tmp_path / "x.foo", "give a file name ending in .png"),
                          (tmp_path / "r.png", "is the results file (--out)"),
                          (tmp_path / "pics.png", "is a folder"),
                          (tmp_path / "a_file" / "x.png", "cannot write in")):
        argv = ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "r.png" if "results" in message else out),
                "--plot", str(plot)]
        assert message in fails(capsys, eval_niah.main, argv)
    assert not out.exists()


def test_the_plot_folder_is_made_when_the_picture_is_saved(tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    saved = []
    monkeypatch.setattr(eval_niah, "require_matplotlib", lambda: None)  # as if installed
    monkeypatch.setattr(eval_niah, "save_png", lambda path, *a: saved.append(os.path.isdir(os.path.dirname(path))))
    eval_niah.main(["--ckpt", str(tiny_ckpt), "--tasks", "s_niah", "--samples", "1", "--depths", "0.5", "--lengths",
                    str(LENGTH), "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "new" / "x.png")])
    assert saved == [True]


def test_a_metrics_log_that_cannot_be_opened_leaves_config_json(tiny_ckpt, small_defaults, tmp_path, capsys):  # noqa
    run_cli(tmp_path, "mid", "ntp", tiny_ckpt)
    out = tmp_path / "mid-ntp"
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()  # not a file: the log cannot be opened for appending
    before = (out / "config.json").read_bytes()
    err = fails(capsys, train.main, ["--model", "deltanet", "--regime", "mid", "--out", str(out), "--resume",
                                     "--max-steps", "3"])
    assert "Is a directory" in err and (out / "config.json").read_bytes() == before


def test_a_pretraining_log_that_cannot_be_opened_leaves_config_json(pretrained, capsys):  # noqa: F811
    (pretrained / "metrics.jsonl").unlink()
    (pretrained / "metrics.jsonl").mkdir()
    before = (pretrained / "config.json").read_bytes()
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(pretrained), "--resume", "--max-steps", "3"])
    assert "Is a directory" in err and (pretrained / "config.json").read_bytes() == before


def test_an_out_that_is_a_file_is_refused_and_left_as_it_was(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    err = fails(capsys, train.main, ["--model", "deltanet", "--out", str(tmp_path / "notes.txt")])
    assert "notes.txt: is a file; give a folder" in err and (tmp_path / "notes.txt").read_text() == "mine"


def test_data_given_to_post_training_is_refused_not_ignored(tmp_path, capsys, monkeypatch):
    """Post-training trains on generated task prompts: a --data there was silently ignored."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("some text")
    err = fails(capsys, train.main, ["--model", "deltanet", "--regime", "post", "--data", "c.txt"])
    assert "--data is a pretrain/mid flag" in err and sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
