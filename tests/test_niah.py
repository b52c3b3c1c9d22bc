"""RULER-style NIAH and QA tasks: exact prompt lengths, needle depths, scorers, determinism, split disjointness."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_mini import niah, qa
from refine_mini.textgen import NIAH_HEADER, encode_cached, is_split_key, is_split_value
from refine_mini.tokenizer import decode, encode

NIAH_TASKS = ["s_niah", "mk_niah", "mv_niah", "mq_niah"]
NEEDLE = re.compile(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.")


@pytest.mark.parametrize("task", list(niah.TASKS))
@pytest.mark.parametrize("haystack", ["noise", "essay"])
def test_prompt_length_is_exact(task, haystack):
    """Every task hits the requested token count exactly, and the prompt ends with the answer cue."""
    for length in (200, 333, 777, 1024):
        ex = niah.make_example(task, length, 0.4, random.Random(length), "eval", haystack)
        assert len(ex.prompt_ids) == ex.length == length
        assert re.search(r"\nAnswer:( The special magic numbers? for [a-z]+-[a-z]+ (is|are):)?$", decode(ex.prompt_ids))
        assert ex.task == task and ex.max_new_tokens >= 12
        assert ex.target == " " + ", ".join(ex.answers) + "\n"


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("haystack", ["noise", "essay"])
def test_s_niah_needle_at_requested_depth(depth, haystack):
    """The needle starts at needle_token_pos, within one sentence of header + depth × haystack budget."""
    length = 1000
    ex = niah.make_example("s_niah", length, depth, random.Random(7), "eval", haystack)
    pos = ex.needle_token_pos[0]
    text = decode(ex.prompt_ids[pos:])
    assert text.startswith(" The special magic number for ") and f"is: {ex.answers[0]}." in text.split("\n")[0]
    n_header = len(encode_cached(NIAH_HEADER))
    n_question = len(ex.prompt_ids) - len(encode(decode(ex.prompt_ids).rsplit("\nQuestion:", 1)[0]))
    needle_len = len(encode(f" The special magic number for {NEEDLE.search(text).group(1)} is: {ex.answers[0]}."))
    budget = length - n_header - n_question - needle_len
    assert abs(pos - (n_header + depth * budget)) <= 16  # one filler sentence is ≤ 16 tokens


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from(NIAH_TASKS), length=st.integers(160, 1500), depth=st.floats(0, 1),
       seed=st.integers(0, 10 ** 6))
def test_every_needle_decodes_at_its_position(task, length, depth, seed):
    """Each needle_token_pos starts a needle whose key is asked (or a distractor) and whose values are gold."""
    ex = niah.make_example(task, length, depth, random.Random(seed))
    assert len(ex.prompt_ids) == length
    found = []
    for pos in ex.needle_token_pos:
        m = NEEDLE.match(decode(ex.prompt_ids[pos:pos + 24]).lstrip())
        assert m is not None
        found.append(m.groups())
    question = decode(ex.prompt_ids).rsplit("Question:", 1)[1]
    values = [v for _, v in found]
    if task == "mv_niah":
        assert ex.answers == [v for _, v in sorted(zip(ex.needle_token_pos, values))]
        assert len({k for k, _ in found}) == 1
    else:
        assert ex.answers == values[:len(ex.answers)]
        assert all(k in question for k, _ in found[:len(ex.answers)])
        assert len({k for k, _ in found}) == len(found)  # distinct keys


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("task", list(niah.TASKS))
def test_prompt_tokens_match_encoding_of_text(task, split):
    """Pieces are joined at safe boundaries: prompt_ids == encode(decode(prompt_ids)), so the model sees the ids the
    corpus (which embeds prompts as text) trained it on. 60 prompts per task and split, at lengths from the task's
    minimum up, both haystacks. (A QA filler cut anywhere, as before, failed 14 of 150 eval prompts at 512 tokens.)"""
    rng, low = random.Random(7), niah.min_length(task, split)
    for i in range(60):
        length = low + (i if i < 20 else rng.randrange(700))
        ex = niah.make_example(task, length, rng.random(), rng, split, ("noise", "essay")[i % 2])
        assert encode(decode(ex.prompt_ids)) == ex.prompt_ids, (length, decode(ex.prompt_ids))


def test_no_entity_is_a_substring_of_another_of_its_split():
    """The recall and QA metrics are substring matches: a key, person, city or company inside another of the same
    split would score the wrong answer as right (the prefix "El" once put Elfield inside Belfield)."""
    from refine_mini import textgen
    for kind in ("key", "person", "city", "company"):
        for split in textgen.SPLITS:
            items = [x.lower() for x in textgen.split_items(kind, split)]
            assert not [(a, b) for a in items for b in items if a != b and a in b], (kind, split)


@pytest.mark.parametrize("hops", [1, 2])
def test_qa_gold_passages_and_depth(hops):
    """QA gold passages start at needle_token_pos; one-hop at the requested passage depth; answer is in them."""
    for depth in (0.0, 0.5, 1.0):
        ex = qa.make_qa_example(900, depth, random.Random(11), "eval", hops)
        text = decode(ex.prompt_ids)
        gold = [decode(ex.prompt_ids[p:]).split("\n")[0] for p in ex.needle_token_pos]
        assert len(gold) == hops and ex.answers[0] in " ".join(gold)
        assert text.startswith(qa.QA_PREFIX) and text.count("Only give me the answer") == 2
        n_passages = text.count("\nPassage ")
        index = int(decode(ex.prompt_ids[:ex.needle_token_pos[0]]).rsplit("Passage ", 1)[1].split(":")[0]) - 1
        n_distractors = n_passages - hops
        if hops == 1:
            assert index == round(depth * n_distractors)
        else:
            assert "founder of" in text.rsplit("Question:", 1)[1]
            assert "founded" in gold[0] and "born" in gold[1].lower()


def test_scorers_on_hand_written_outputs():
    """score_niah is RULER recall on the first line; score_qa is any-substring on the stripped first line."""
    assert niah.score_niah(" 1234567\n", ["1234567"]) == 1.0
    assert niah.score_niah("It is 1234567.", ["1234567"]) == 1.0
    assert niah.score_niah(" 123456\n1234567", ["1234567"]) == 0.0  # after the first newline: ignored
    assert niah.score_niah(" 1111111, 2222222, 9999999", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert niah.score_niah("", ["1"]) == 0.0
    assert niah.score_niah("ABC-def", ["abc-DEF"]) == 1.0
    assert qa.score_qa("  ashton  \nBelford", ["Ashton"]) == 1.0
    assert qa.score_qa("\nAshton", ["Ashton"]) == 0.0
    assert qa.score_qa("Nova Lab", ["Nova Labs"]) == 0.0
    assert qa.score_qa("It is NOVA LABS, I think", ["Foo", "Nova Labs"]) == 1.0
    assert niah.score("qa", "x", ["y"]) == 0.0 and niah.score("mv_niah", "a b", ["a", "c"]) == 0.5
    with pytest.raises(ValueError):
        niah.score_niah("x", [])
    for blank in ([""], ["1234567", " "]):  # a blank gold answer is in every line: it must not score a match
        with pytest.raises(ValueError, match="blank"):
            niah.score_niah("x", blank)


def test_determinism_for_a_seed():
    """Same (task, n, length, depths, seed, split) gives identical examples; another seed differs."""
    for task in niah.TASKS:
        a = niah.make_task_examples(task, 3, 400, depths=[0.1, 0.9], seed=5)
        b = niah.make_task_examples(task, 3, 400, depths=[0.1, 0.9], seed=5)
        c = niah.make_task_examples(task, 3, 400, depths=[0.1, 0.9], seed=6)
        assert a == b and a != c
        assert [e.depth for e in a] == [0.1, 0.9, 0.1]


def _entities(examples):
    keys, values, names = set(), set(), set()
    for ex in examples:
        text = decode(ex.prompt_ids)
        for k, v in NEEDLE.findall(text):
            keys.add(k)
            values.add(v)
        names.update(re.findall(r"\n([A-Z][a-z]+ [A-Z][a-z]+) (?:was born|is a)", text))
        names.update(ex.answers)
    return keys, values, names


def test_train_and_eval_splits_are_disjoint():
    """Keys, values, people, cities and companies of train examples never occur in eval examples (and obey the rule)."""
    sets = {}
    for split in ("train", "eval"):
        exs = [e for t in niah.TASKS for e in niah.make_task_examples(t, 15, 700, seed=0, split=split)]
        sets[split] = _entities(exs)
        assert all(is_split_key(k, split) for k in sets[split][0])
        assert all(is_split_value(v, split) for v in sets[split][1])
    for a, b in zip(sets["train"], sets["eval"]):
        assert a and b and not (a & b)


def test_errors_are_value_errors():
    """Unknown task/split/haystack, bad depth and too-short lengths raise ValueError with a message."""
    with pytest.raises(ValueError, match="unknown task"):
        niah.make_example("nope", 500, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="unknown split"):
        niah.make_example("s_niah", 500, 0.5, random.Random(0), split="test")
    with pytest.raises(ValueError, match="haystack"):
        niah.make_example("s_niah", 500, 0.5, random.Random(0), haystack="poem")
    with pytest.raises(ValueError, match="depth"):
        niah.make_example("s_niah", 500, 1.5, random.Random(0))
    for task in niah.TASKS:
        with pytest.raises(ValueError, match="too short"):
            niah.make_example(task, 40, 0.5, random.Random(0))


def test_long_prompts_are_fast():
    """8K-token prompts of every task build quickly (eval sweeps make hundreds)."""
    import time
    t0 = time.perf_counter()
    for task in niah.TASKS:
        ex = niah.make_example(task, 8192, 0.5, random.Random(0), haystack="essay")
        assert len(ex.prompt_ids) == 8192
    assert time.perf_counter() - t0 < 5.0


def test_word_lists_have_no_duplicates_and_docstring_render_holds():
    """Unique words make the (i + j) % 3 split rule well defined; the module docstring's rendered example is real."""
    from refine_mini import textgen
    for words in (textgen.ADJECTIVES, textgen.NOUNS, textgen.FIRST_NAMES, textgen.LAST_NAMES, textgen.CITY_PREFIXES,
                  textgen.CITY_SUFFIXES, textgen.COMPANY_ROOTS, textgen.COMPANY_KINDS):
        assert len(set(words)) == len(words)
    ex = niah.make_example("s_niah", 96, 0.5, random.Random(0))
    assert ex.needle_token_pos == [39] and ex.answers == ["1509413"] and "short-forest" in niah.__doc__
    ex = qa.make_qa_example(230, 0.5, random.Random(2))
    assert ex.needle_token_pos == [107] and ex.answers == ["Corhaven"] and "Corhaven" in qa.__doc__


def test_niah_recall_counts_each_gold_value_once():
    """RULER recall is the fraction of the gold values found in the output: a repeated value is found once, so
    recall never exceeds 1 and a repeated value cannot stand in for a missing one."""
    assert niah.score_niah(" 1234567, 1234567", ["1234567"]) == 1.0
    assert niah.score_niah(" 1111111 1111111 1111111 1111111", ["1111111", "2222222", "3333333", "4444444"]) == 0.25
