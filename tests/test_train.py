"""Pre-training plumbing: checkpoints, exact resume, the NaN guard, overfitting, and the CLI's bad-input exits."""

import dataclasses
import json
import struct

import pytest
import torch

import train
from refine_mini.common import CheckpointError, load_checkpoint, save_checkpoint
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.tokenizer import encode
from refine_mini.trainer import (TrainConfig, answer_mask, answer_weighted_loss, lr_at, model_from_checkpoint,
                                 ntp_loss, pretrain, token_nll, validation_metrics)


class RandomCorpus:
    """Uniform random tokens: the batch is a pure function of the generator, like the real corpus."""

    def __init__(self, vocab=64, seq_len=24):
        self.vocab, self.seq_len = vocab, seq_len

    def batch(self, batch_size, generator):
        return torch.randint(0, self.vocab, (batch_size, self.seq_len), generator=generator)

    def val_batches(self, batch_size):
        return [self.batch(batch_size, torch.Generator().manual_seed(123))]


def tiny_cfg(mixer="deltanet"):
    return ModelConfig(mixer=mixer, vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_heads_fast=2,
                       chunk_size=8, lact_chunk=8, window=8)


def short_run(**kw):
    return TrainConfig(max_steps=6, batch_size=2, seq_len=24, lr=1e-2, warmup_steps=2, eval_every=3,
                       eval_batches=1, ckpt_every=3, **kw)


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_checkpoint_round_trip_restores_identical_logits(tmp_path, mixer):
    model = FastWeightLM(tiny_cfg(mixer))
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config":
                                           dataclasses.asdict(model.cfg), "step": 0})
    ckpt = load_checkpoint(tmp_path, expect_mixer=mixer)
    restored = model_from_checkpoint(ckpt, "cpu")
    tokens = torch.randint(0, 64, (2, 17))
    assert torch.equal(model(tokens)[0], restored(tokens)[0])


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "garbage.pt")
    model = FastWeightLM(tiny_cfg("deltanet"))
    save_checkpoint(tmp_path / "ok.pt", {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg)})
    with pytest.raises(CheckpointError, match="holds a deltanet model"):
        load_checkpoint(tmp_path / "ok.pt", expect_mixer="lact")
    truncated = (tmp_path / "ok.pt").read_bytes()[:200]
    (tmp_path / "truncated.pt").write_bytes(truncated)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_a_flipped_bit_in_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """torch.load does not check the zip's CRC-32s: a checkpoint with one flipped bit in a weight used to load, with
    that weight silently changed. load_checkpoint checks them first (a config-only mmap load leaves it to the full
    load), and the scripts turn the error into one line and status 2."""
    import eval_niah
    from tests.test_input_guards import fails
    model = FastWeightLM(tiny_cfg("deltanet"))
    with torch.no_grad():
        model.embed.weight[3, 5] = 1234.5
    save_checkpoint(tmp_path / "ok.pt", {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg)})
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    at = data.find(struct.pack("<f", 1234.5))
    data[at] ^= 1  # 1234.5 -> 1234.500122...
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    assert torch.load(tmp_path / "flipped.pt", weights_only=True)["model"]["embed.weight"][3, 5] != 1234.5
    with pytest.raises(CheckpointError, match=r"flipped.pt is corrupted: its record .* fails its CRC-32 check"):
        load_checkpoint(tmp_path / "flipped.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["model"]["embed.weight"][3, 5] == 1234.5
    assert "model_config" in load_checkpoint(tmp_path / "flipped.pt", mmap=True)  # configs only: not checked
    err = fails(capsys, eval_niah.main, ["--ckpt", str(tmp_path / "flipped.pt"), "--out", str(tmp_path / "e.json")])
    assert "fails its CRC-32 check" in err and not (tmp_path / "e.json").exists()


class Killed(Exception):
    pass


class KillingCorpus(RandomCorpus):
    """Dies when asked for the training batch of step `at` (0-based), like a run killed mid-training."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def batch(self, batch_size, generator):
        if self.calls == self.at:
            raise Killed
        self.calls += 1
        return super().batch(batch_size, generator)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = short_run()
    pretrain(tiny_cfg(), cfg, RandomCorpus(), tmp_path / "full", "cpu")
    with pytest.raises(Killed):  # killed during step 5, after the step-3 checkpoint
        pretrain(tiny_cfg(), cfg, KillingCorpus(at=4), tmp_path / "killed", "cpu")
    assert load_checkpoint(tmp_path / "killed")["step"] == 3
    pretrain(tiny_cfg(), cfg, RandomCorpus(), tmp_path / "killed", "cpu", resume=True)
    full, resumed = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert resumed["step"] == full["step"] == 6
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = short_run()
    pretrain(tiny_cfg(), dataclasses.replace(cfg, max_steps=3), RandomCorpus(), tmp_path, "cpu")
    good = load_checkpoint(tmp_path)["model"]
    original_encode = FastWeightLM.encode

    def poisoned(self, tokens, state=None):
        hidden, state = original_encode(self, tokens, state)
        return hidden * float("nan"), state

    FastWeightLM.encode = poisoned
    try:
        with pytest.raises(FloatingPointError, match="non-finite loss"):
            pretrain(tiny_cfg(), cfg, RandomCorpus(), tmp_path, "cpu", resume=True)
    finally:
        FastWeightLM.encode = original_encode
    kept = load_checkpoint(tmp_path)
    assert kept["step"] == 3 and all(torch.equal(v, kept["model"][k]) for k, v in good.items())


@pytest.mark.parametrize("mixer", ["deltanet", "lact"])
def test_a_tiny_model_overfits_a_fixed_batch(mixer):
    torch.manual_seed(0)
    model = FastWeightLM(tiny_cfg(mixer))
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = ntp_loss(model(tokens)[0], tokens)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0  # ~ln(64) at init
    assert loss.item() < 0.3


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


@pytest.mark.parametrize("argv, message", [
    (["--model", "mamba"], "unknown model"),
    (["--model", "deltanet", "--regime", "pre"], "unknown regime"),
    (["--model", "deltanet", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["--model", "deltanet", "--answer-weight", "0"], "--answer-weight must be > 0 and finite in float32"),
    (["--model", "deltanet", "--lr", "inf"], "--lr must be > 0 and below 1.7e+37"),
    (["--model", "deltanet", "--regime", "mid", "--lambda-rl", "-1"], "--lambda-rl must be >= 0 and finite in float32"),
    (["--model", "deltanet", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--model", "deltanet", "--device", "mps"], "unknown --device 'mps'"),
    (["--model", "deltanet", "--init", "x.pt"], "--init is a mid/post flag"),
    (["--model", "deltanet", "--regime", "mid", "--answer-weight", "5"], "--answer-weight is a pretrain flag"),
    (["--model", "deltanet", "--resume"], "holds no checkpoint (ckpt.pt) to resume"),
])
def test_cli_rejects_bad_arguments_with_status_2(argv, message, capsys, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a bad argument reached pre-training")
    monkeypatch.chdir(tmp_path)  # a flag let through by a bug must not pre-train a base into the checkout's runs/,
    monkeypatch.setattr(train, "pretrain", no_training)  # nor train for minutes: the test fails at once instead
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ntp_loss_is_shifted_cross_entropy():
    """ntp_loss (ignore_index on the last position) equals the plain mean of -log p(x_{t+1} | x_<=t)."""
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 9, 11, generator=g), torch.randint(0, 11, (3, 9), generator=g)
    logp = torch.log_softmax(logits[:, :-1].double(), -1)  # (3, 8, 11)
    expected = -logp.gather(2, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(ntp_loss(logits, tokens).double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("argv, steps", [(["--model", "deltanet"], 400), (["--model", "lact"], 250),
                                         (["--model", "lact", "--max-steps", "7"], 7)])
def test_pretrain_cli_uses_each_models_default_steps_unless_max_steps_is_given(argv, steps, tmp_path, monkeypatch):
    seen = {}

    def fake_pretrain(model_cfg, cfg, corpus, out, device, resume=False):
        seen.update(mixer=model_cfg.mixer, steps=cfg.max_steps)
        return {}

    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    train.main(argv + ["--out", str(tmp_path / "run")])
    assert seen == {"mixer": argv[1], "steps": steps}


def _pieces(*parts):
    """Token ids of text pieces (each starts with a space or newline, so they concatenate as one encode would) and
    the mask of the pieces marked True."""
    ids, mask = [], []
    for text, inside in parts:
        piece = encode(text)
        ids += piece
        mask += [inside] * len(piece)
    return torch.tensor([ids]), torch.tensor([mask])


class FixedPredictor(torch.nn.Module):
    """Puts probability p on the true next token at every position (V = 4, the rest spread evenly). Its "hidden
    states" are those log-probabilities and its head is the identity (D = V = 4)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def encode(self, tokens):
        probs = torch.full((*tokens.shape, 4), (1 - self.p) / 3)  # (B, T, V)
        probs[:, :-1].scatter_(-1, tokens[:, 1:, None], self.p)
        return probs.log(), None

    def head(self, hidden):
        return hidden


def test_validation_is_the_ntp_loss_and_a_sampled_token_accuracy():
    """val_loss = -log p exactly; the accuracy samples at temperature 1, so it is ≈ p (not 1, as argmax would give)."""
    batches = [torch.randint(0, 4, (8, 1001), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    m = validation_metrics(FixedPredictor(0.6), batches, torch.Generator().manual_seed(0))
    assert m["val_loss"] == pytest.approx(-torch.tensor(0.6).log().item(), rel=1e-5)
    assert abs(m["val_sampled_acc"] - 0.6) < 0.015  # 16,000 draws: 4 standard deviations
    again = validation_metrics(FixedPredictor(0.6), batches, torch.Generator().manual_seed(0))
    assert again == m  # seeded: the same generator seed gives the same value


def test_answer_mask_marks_each_answer_through_its_newline():
    tokens, expected = _pieces(("The sky is blue.\nQuestion: What is the number?\nAnswer:", False),
                               (" 4821937\n", True), (" The grass is green. Answer is not a cue:", False),
                               ("\nAnswer:", False), (" Longford\n", True), (" The end.\nAnswer:", False))
    assert torch.equal(answer_mask(tokens), expected)                                  # the last cue has no answer yet
    assert torch.equal(answer_mask(tokens.repeat(3, 1)), expected.repeat(3, 1))        # row by row
    assert not answer_mask(tokens[:, :3]).any()                                        # shorter than the cue


def test_answer_weighted_loss_weighs_answer_targets():
    tokens, inside = _pieces(("\nQuestion: Where?\nAnswer:", False), (" Longford\n", True), (" The sky.", False))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, tokens.shape[1], 8193, generator=g)
    nll = token_nll(logits, tokens)
    torch.testing.assert_close(answer_weighted_loss(nll, tokens, 1.0), ntp_loss(logits, tokens))
    w = torch.where(inside[0, 1:], 20.0, 1.0)  # the weight of position t is that of its target t+1
    expected = (nll[0, :-1] * w).sum() / w.sum()
    torch.testing.assert_close(answer_weighted_loss(nll, tokens, 20.0), expected)
    assert answer_weighted_loss(nll, tokens, 20.0) != ntp_loss(logits, tokens)


class AnswerCorpus(RandomCorpus):
    """Rows of one question and its answer: the pre-training loss weighs the answer, the logged ntp_loss does not."""

    def batch(self, batch_size, generator):
        tokens, _ = _pieces(("\nQuestion: Where was James Fisher born?\nAnswer:", False), (" Longford\n", True))
        return tokens.repeat(batch_size, 1)


@pytest.mark.parametrize("weight", [1.0, 20.0])
def test_pretrain_logs_the_answer_weighted_loss_and_the_plain_ntp_loss(weight, tmp_path):
    cfg = dataclasses.replace(short_run(answer_weight=weight), max_steps=2)
    pretrain(dataclasses.replace(tiny_cfg(), vocab_size=8193), cfg, AnswerCorpus(), tmp_path, "cpu")
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    if weight == 1.0:
        assert first["loss"] == first["ntp_loss"]
    else:
        assert abs(first["loss"] - first["ntp_loss"]) > 1e-3
