"""Contracts of the data and checkpoint plumbing (method.md §9; data.py and common.py docstrings): disjoint splits
for the built-in and user corpora, sorted folder loading, atomic saves, RNG round trips and format checks. Each test
was written to kill a mutant that the rest of the suite let through; the mutant is named in its docstring."""
import json
import random
import re

import numpy as np
import pytest
import torch

from refine_mini import data
from refine_mini.common import CheckpointError, load_checkpoint, save_checkpoint
from refine_mini.resume import rng_state, set_rng_state
from refine_mini.textgen import is_split_key, is_split_value
from refine_mini.tokenizer import decode
from tests.test_regime_contracts import tiny_model

NEEDLE = re.compile(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.")


# ---- data.py ------------------------------------------------------------------------------------------------------

def test_split_keeps_a_training_document_whatever_the_val_fraction():
    """split_documents: both splits non-empty, disjoint and covering, even at val_fraction 1. Kills D04."""
    for docs in (["a", "b"], ["a", "b", "c", "d"]):
        train_idx, val_idx = data.split_documents(docs, 0, 1.0)
        assert train_idx and val_idx and sorted(train_idx + val_idx) == list(range(len(docs)))


def test_synthetic_validation_documents_come_from_the_val_partition():
    """data.py: val documents draw keys and values from the val partition (train, val and eval never share one).
    Kills D06."""
    corpus = data.SyntheticCorpus(256, seed=0, n_val_docs=8)
    pairs = NEEDLE.findall(" ".join(decode(row) for batch in corpus.val_batches(4) for row in batch.tolist()))
    assert pairs and all(is_split_key(k, "val") and is_split_value(v, "val") for k, v in pairs)


def test_folder_documents_come_in_sorted_path_order(tmp_path):
    """load_text_documents: a folder means every *.txt below it, sorted (recursive), whatever the creation order.
    Kills D08."""
    names = [f"{d}/{n:02d}.txt" for d in ("a", "b", "c") for n in range(8)]
    order = names[:]
    random.Random(0).shuffle(order)
    for name in order:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert data.load_text_documents(tmp_path) == sorted(names)


@pytest.mark.parametrize("mode", ["pack", "filter"])
def test_user_corpus_validation_rows_hold_only_validation_documents(tmp_path, mode):
    """TokenCorpus: val batches are cut from the val documents (split by document), never from training ones.
    Kills D10."""
    docs = [" ".join(f"alpha{i} beta{i}" for _ in range(60)) for i in range(30)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    corpus = data.make_corpus(str(tmp_path / "c.jsonl"), seq_len=64, seed=1, mode=mode, val_fraction=0.3)
    val_text = " ".join(decode(row) for batch in corpus.val_batches(2) for row in batch.tolist())
    assert all(f"alpha{i} " in val_text for i in corpus.val_idx)
    assert not any(f"alpha{i} " in val_text for i in corpus.train_idx)


# ---- common.py ----------------------------------------------------------------------------------------------------

def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    """save_checkpoint is atomic: a save that fails (here an unpicklable payload) leaves the old file whole and
    loadable, and no temp file behind. Kills C01 (writes the target in place)."""
    payload = {"model": {"w": torch.arange(4.0)}, "model_config": {"mixer": "deltanet"}, "step": 3}
    save_checkpoint(tmp_path / "ckpt.pt", payload)
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / "ckpt.pt", {**payload, "step": 4, "bad": lambda: None})
    kept = load_checkpoint(tmp_path)
    assert kept["step"] == 3 and torch.equal(kept["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """The checkpoint's RNG states restore Python's, NumPy's and torch's generators exactly (exact resume).
    Kills C05 (Python skipped), C06 (NumPy skipped)."""
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "model_config": {"mixer": "deltanet"}, "rng": rng_state()})
    draws = lambda: (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    expected = draws()
    draws()
    set_rng_state(load_checkpoint(tmp_path)["rng"])
    assert draws() == expected


def test_checkpoints_of_an_unknown_format_are_refused(tmp_path):
    """load_checkpoint: a file of another (or no) checkpoint format is a one-line CheckpointError. Kills C07."""
    model = tiny_model()
    payload = {"model": model.state_dict(), "model_config": {"mixer": "deltanet"}}
    for name, extra in (("future.pt", {"format": 999}), ("none.pt", {})):
        torch.save({**payload, **extra}, tmp_path / name)
        with pytest.raises(CheckpointError, match="not a refine_mini checkpoint"):
            load_checkpoint(tmp_path / name)
