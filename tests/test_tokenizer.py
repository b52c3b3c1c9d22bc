"""The shipped BPE: file integrity, exact round trips, and the special token."""

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from refine_mini import tokenizer
from refine_mini.tokenizer import decode, eot_id, vocab_size


def test_rank_file_sha256_matches_the_documented_one():
    digest = hashlib.sha256(tokenizer.RANK_FILE.read_bytes()).hexdigest()
    assert digest == tokenizer.RANK_FILE_SHA256


def test_vocabulary_is_8192_ranks_plus_endoftext():
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == tokenizer.vocab_size() == 8193
    assert enc.encode(tokenizer.EOT, allowed_special="all") == [tokenizer.eot_id()] == [8192]


def test_known_gpt2_ids_are_unchanged():
    # GPT-2 ids of these common tokens are all < 8192, so the truncated BPE must reproduce them exactly.
    assert tokenizer.encode(" world") == [995]
    assert tokenizer.encode("\n") == [198]
    assert tokenizer.encode(" the") == [262]


def test_special_token_text_in_user_data_is_plain_text():
    ids = tokenizer.encode("a <|endoftext|> b")
    assert tokenizer.eot_id() not in ids
    assert tokenizer.decode(ids) == "a <|endoftext|> b"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_is_exact_for_any_text(text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < 8192 for i in ids)
    assert tokenizer.decode(ids) == text


def test_a_corrupted_rank_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "ranks.tiktoken"
    bad.write_bytes(tokenizer.RANK_FILE.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "RANK_FILE", bad)
    with pytest.raises(RuntimeError, match="corrupted"):
        tokenizer.load_ranks(bad)


def test_decode_refuses_ids_outside_the_vocabulary():
    """An id past the vocabulary (or negative) is a ValueError naming it, not tiktoken's KeyError/OverflowError;
    the last real id, <|endoftext|>, decodes."""
    for bad in ([vocab_size()], [-1], [3, 10 ** 6]):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 8193\)"):
            decode(bad)
    assert decode([eot_id()]) == "<|endoftext|>"
