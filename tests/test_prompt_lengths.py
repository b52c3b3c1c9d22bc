"""niah.min_length: the fewest tokens that hold every prompt a task can draw, and the checks built on it.

A prompt's fixed part (header, needles, gold passages, question) depends on which keys, values and entities are
drawn. The scripts check a requested length against min_length before any work starts, so a length that passes
must fit every prompt, and min_length must be reached by some prompt (else it refuses lengths that would work).
"""

import random
import re

import pytest

from refine_mini import niah
from refine_mini.evaluate import check_grid
from refine_mini.textgen import (NIAH_HEADER, VALUE_MAX_TOKENS, longest_value, max_tokens, needle_sentence,
                                 niah_question, split_items)
from refine_mini.tokenizer import encode


def drawn_need(task: str, seed: int, split: str) -> int:
    """The fixed-part length of one drawn prompt, read from the generator's own per-example check (length 1)."""
    with pytest.raises(ValueError) as err:
        niah.TASKS[task](1, 0.5, random.Random(seed), split, "noise")
    return int(re.search(r"needs at least (\d+) tokens", str(err.value)).group(1))


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("task", list(niah.TASKS))
def test_every_drawn_prompt_fits_min_length(task, split):
    """300 drawn prompts: none needs more than min_length, and each builds at exactly min_length."""
    need = niah.min_length(task, split)
    needs = [drawn_need(task, seed, split) for seed in range(300)]
    assert max(needs) <= need
    assert max(needs) >= need - 15  # 300 draws come within 0-13 tokens of the longest entities drawn together
    for ex in niah.make_task_examples(task, 20, need, None, seed=1, split=split):
        assert len(ex.prompt_ids) == need
    with pytest.raises(ValueError, match=f"too short for task {task}: its {split}-split prompts need at least {need} "):
        niah.make_example(task, need - 1, 0.5, random.Random(0), split)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_s_niah_min_length_is_the_exact_maximum(split):
    """By brute force, without max_tokens' additivity: every key with the longest value, the text encoded whole."""
    value = longest_value(split)
    exact = max(len(encode(NIAH_HEADER)) + len(encode(needle_sentence(k, value))) + len(encode(niah_question([k])))
                for k in split_items("key", split))
    assert niah.min_length("s_niah", split) == exact


def test_max_tokens_equals_joint_brute_force():
    """max_tokens against every joint choice of two slots on a template with shared and repeated slots."""
    pieces = ["{a} met {b} in {a}.", "\nQuestion: Where is {b}?"]
    slots = {"a": ["Ash", "Belfield", "Corhaven", "El"], "b": ["Peter Hall", "Anna Murphy", "Jo", "Maria Collins"]}
    brute = max(sum(len(encode(p.replace("{a}", a).replace("{b}", b))) for p in pieces)
                for a in slots["a"] for b in slots["b"])
    assert max_tokens(pieces, slots) == brute


def test_values_take_at_most_value_max_tokens():
    """20,000 random 7-digit values of each split: at most VALUE_MAX_TOKENS tokens, and some take exactly that
    (tests/test_slow.py enumerates all nine million)."""
    rng = random.Random(0)
    for code, split in enumerate(["train", "val", "eval"]):
        counts = [len(encode(f" {3 * rng.randrange(333_334, 3_333_333) + code}")) for _ in range(20_000)]
        assert max(counts) == VALUE_MAX_TOKENS
        assert len(encode(" " + longest_value(split))) == VALUE_MAX_TOKENS


def test_check_grid_refuses_exactly_below_min_length():
    """eval_niah's up-front check: the shortest length is compared with min_length, nothing else."""
    need = niah.min_length("qa_2hop")
    check_grid(["s_niah", "qa_2hop"], [need, 512], [0.5], 1)
    with pytest.raises(ValueError, match=f"length {need - 1} is too short for task qa_2hop: .* at least {need} "):
        check_grid(["s_niah", "qa_2hop"], [512, need - 1], [0.5], 1)
