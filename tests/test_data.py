"""Corpora: synthetic documents (facts asked later, split rule), user-file loading, packing/filtering, splits."""

import json
import random
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_mini import data, niah
from refine_mini.textgen import is_split_key, is_split_value
from refine_mini.tokenizer import decode, encode, eot_id

NEEDLE = re.compile(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.")
SINGLE_Q = re.compile(r"Question: What is the special magic number for ([a-z]+-[a-z]+)\?\n"
                      r"Answer: The special magic number for \1 is: (\d{7})\n")
BORN_Q = re.compile(r"Question: Where was ([A-Z][a-z]+ [A-Z][a-z]+) born\?\nAnswer: ([A-Za-z]+)\n")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n_tokens=st.integers(64, 1500))
def test_synthetic_questions_are_about_earlier_facts(seed, n_tokens):
    """Every answered question in a document refers to a fact stated earlier in it, with the same answer."""
    text = data.synthetic_document(random.Random(seed), n_tokens)
    assert len(encode(text)) >= n_tokens - 2
    for m in SINGLE_Q.finditer(text):
        key, value = m.groups()
        assert f"for {key} is: {value}." in text[:m.start()]
        # a key asked singly is planted once (keys unique per document); each question restates it once more
        assert text.count(f"for {key} is: ") == 1 + text.count(f"?\nAnswer: The special magic number for {key} is:")
    for m in BORN_Q.finditer(text):
        name, city = m.groups()
        before = text[:m.start()]
        assert name in before and city in before


def test_synthetic_document_is_deterministic_and_fast():
    """Same rng seed -> same document; an 8K-token document takes well under a second."""
    assert data.synthetic_document(random.Random(1), 800) == data.synthetic_document(random.Random(1), 800)
    assert data.synthetic_document(random.Random(1), 800) != data.synthetic_document(random.Random(2), 800)
    t0 = time.perf_counter()
    for s in range(4):
        text = data.synthetic_document(random.Random(s), 8192)
        assert len(encode(text)) >= 8190
    assert (time.perf_counter() - t0) / 4 < 0.5


def test_synthetic_corpus_contains_the_eval_surface_forms():
    """Across documents: needles, single/multi-value/multi-query questions and QA passages all occur."""
    text = "".join(data.synthetic_document(random.Random(s), 1024) for s in range(30))
    for pattern in ("The special magic number for", "What is the special magic number for",
                    "What are all the special magic numbers for", "What are the special magic numbers for",
                    "Where was", "Which company does", "Passage 1:", "Some special magic numbers are hidden"):
        assert pattern in text, pattern
    assert len(SINGLE_Q.findall(text)) > 30


def test_corpus_splits_never_share_keys_or_values_with_eval():
    """Train corpus, val corpus and eval tasks use disjoint keys/values (structural rule, checked on a sample)."""
    sets = {}
    for split in ("train", "val"):
        text = "".join(data.synthetic_document(random.Random(s), 1024, split) for s in range(40))
        pairs = NEEDLE.findall(text)
        assert pairs and all(is_split_key(k, split) and is_split_value(v, split) for k, v in pairs)
        sets[split] = {k for k, _ in pairs} | {v for _, v in pairs}
    evals = [e for t in niah.TASKS for e in niah.make_task_examples(t, 10, 600, seed=0)]
    sets["eval"] = {x for e in evals for pair in NEEDLE.findall(decode(e.prompt_ids)) for x in pair}
    sets["eval"] |= {a for e in evals for a in e.answers}
    assert not (sets["train"] & sets["eval"]) and not (sets["val"] & sets["eval"])
    assert not (sets["train"] & sets["val"])


def test_synthetic_corpus_batches():
    """Batches are (B, T) long, deterministic in the generator, never repeat rows; val batches are fixed."""
    corpus = data.make_corpus(None, seq_len=256, seed=3)
    a = corpus.batch(4, torch.Generator().manual_seed(0))
    b = corpus.batch(4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    c, d = corpus.batch(4, g), corpus.batch(4, g)
    assert a.shape == (4, 256) and a.dtype == torch.long and torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(c, d)
    assert int(a.max()) <= eot_id() and int(a.min()) >= 0
    v1, v2 = corpus.val_batches(8), corpus.val_batches(8)
    assert len(v1) == 4 and all(torch.equal(x, y) for x, y in zip(v1, v2)) and v1[0].shape == (8, 256)
    train_rows = {tuple(r) for r in torch.cat([corpus.batch(8, g) for _ in range(4)]).tolist()}
    assert not train_rows & {tuple(r) for r in torch.cat(v1).tolist()}


# ---- user files ---------------------------------------------------------------------------------------------------

def _doc(i: int, words: int = 60) -> str:
    return " ".join(f"alpha{i} beta{i}" for _ in range(words))


def test_pack_and_filter_shapes():
    """pack: EOT after every document, rows of T, remainder dropped; filter: only documents ≥ T, truncated."""
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    rows = data.pack(docs, 4)
    e = eot_id()
    assert rows.tolist() == [[1, 2, 3, e], [4, 5, e, 6], [7, 8, 9, 10]]  # 13 tokens -> 3 rows, the final EOT dropped
    rows = data.filter_docs(docs, 3)
    assert rows.shape == (2, 3) and rows.tolist() == [[1, 2, 3], [6, 7, 8]]
    assert data.filter_docs(docs, 50).shape == (0, 50)


@pytest.mark.parametrize("mode", ["pack", "filter"])
def test_no_validation_document_in_training(tmp_path, mode):
    """Documents go to train or val, never both; no val document's tokens appear in any training row."""
    docs = [_doc(i) for i in range(30)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    corpus = data.make_corpus(str(tmp_path / "c.jsonl"), seq_len=64, seed=1, mode=mode, val_fraction=0.3)
    assert set(corpus.train_idx).isdisjoint(corpus.val_idx)
    assert sorted(corpus.train_idx + corpus.val_idx) == list(range(30)) and corpus.val_idx
    train_text = " ".join(decode(r) for r in corpus.train_rows.tolist())
    assert all(f"alpha{i} " not in train_text for i in corpus.val_idx)
    assert all(f"alpha{i} " in train_text for i in corpus.train_idx)
    assert corpus.train_rows.shape[1] == 64 and corpus.val_batches(2)[0].shape[1] == 64
    b = corpus.batch(5, torch.Generator().manual_seed(0))
    assert b.shape == (5, 64) and torch.equal(b, corpus.batch(5, torch.Generator().manual_seed(0)))
    again = data.make_corpus(str(tmp_path / "c.jsonl"), seq_len=64, seed=1, mode=mode, val_fraction=0.3)
    assert again.val_idx == corpus.val_idx


def test_split_and_corpus_errors(tmp_path):
    """One document cannot be split; a corpus with no full-length training row is an error; bad mode too."""
    with pytest.raises(ValueError, match="at least 2 documents"):
        data.split_documents(["a"], 0, 0.1)
    train, val = data.split_documents(["a", "b"], 0, 0.0)
    assert train == [0] and val == [1]
    p = tmp_path / "small.txt"
    p.write_text("tiny one\n\n\ntiny two")
    with pytest.raises(ValueError, match="too small"):
        data.make_corpus(str(p), seq_len=512)
    with pytest.raises(ValueError, match="mode"):
        data.make_corpus(str(p), seq_len=4, mode="shuffle")


def test_a_document_longer_than_its_splits_pools_uses_each_key_once_then_filler():
    """150K tokens need more needles than the val split has keys (1080): every key is used, none for two facts (a
    multi-value key holds at most 4 values), and the rest is filler, not the old 'cannot draw' crash."""
    from refine_mini.textgen import split_items
    doc = data._stream_document(random.Random(2), 150_000, "val")
    assert len(encode(doc)) >= 150_000
    per_key = {}
    for key, _ in NEEDLE.findall(doc):
        per_key[key] = per_key.get(key, 0) + 1
    assert sorted(per_key) == sorted(split_items("key", "val")) and max(per_key.values()) <= 4
    assert all(is_split_key(key, "val") for key in per_key)
