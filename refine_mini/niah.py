"""RULER needle-in-a-haystack tasks (method.md §6 "RULER NIAH"): S-, MK-, MV- and MQ-NIAH, prompt layout and recall.

Question answered: how do we build a NIAH prompt of exactly `length` tokens with the needle at depth d, and score it?

Rendered S-NIAH prompt (make_example("s_niah", 96, 0.5, random.Random(0)); `|` marks needle_token_pos[0] = 39):

    Some special magic numbers are hidden within the following text. Make sure to memorize them. I will quiz you
    about the numbers afterwards.
     is blue. The sun is yellow.| The special magic number for short-forest is: 1509413. Here we go. There and back
    again.
    Question: What is the special magic number for short-forest?
    Answer: The special magic number for short-forest is:
greedy decoding should then emit " 1509413\\n" (Example.target).

Layout and exact length: prompt = header + haystack + question, each piece tokenised on its own (every piece starts
with a space or newline, so the concatenation equals what encode() gives for the whole text). The haystack budget is
length − |header| − |question| − |needles|. It is filled with whole filler sentences while they fit; the r tokens
still missing are the last r tokens of one more sentence, placed FIRST (the haystack reads as if cut out of a longer
text, mid-sentence). A needle goes to the sentence boundary nearest depth × (filler tokens), never before that
fragment, so its token position is within one sentence of header + depth × budget. The shortest length is
min_length(task): the header, needles and question at their longest over every key and value the split can
draw (textgen.max_tokens), so one up-front check covers every prompt a run will draw.
Tasks (RULER defaults num_needle_k/v/q = 4): s_niah 1 needle; mk_niah 4 keys, 1 asked; mv_niah 1 key with 4 values,
all asked; mq_niah 4 keys, all asked. The first needle sits at the requested depth, the others at uniform random
depths. Haystacks: "noise" (RULER's five repeated sentences) and "essay" (our generated prose instead of Paul Graham
essays). Metric (RULER string_match_all): recall is the fraction of gold values that occur in the output,
case-insensitively.
Deviations: the output is cut at its first newline (lm-eval matches the whole of a 128-token generation, so a model
that goes on to list other values gets credit for them; ours must answer on the answer line, never more lenient: the
seed-0 base at 512 and 1024 tokens, 40 prompts a cell, scores the same on S-NIAH and 0-2.5 points lower on
MK/MV/MQ); the prompt itself is exactly `length` tokens (RULER: prompt + 128 generated tokens <= length); the asked
key sits at the requested depth (RULER draws every needle's depth and asks a random key); our tokenizer, our shorter
question/answer cue (see textgen.py), the needle "The special magic number for {key} is: {value}." (RULER: "One of
the special magic numbers for {key} is: {value}."), keys "adj-noun" from our word lists, and keys/values partitioned
by split (train/val/eval never share one; textgen.py explains the rule). RULER's MK/MV/MQ variants use essay
haystacks; eval_niah.py's default grid runs every task on "noise" (`--haystack essay` or `--full` adds essays).
"""

import functools
import random
from dataclasses import dataclass

from refine_mini import qa
from refine_mini.textgen import (NIAH_HEADER, Example, encode_cached, filler_sentence, format_answer, longest_value,
                                 make_key, make_value, max_tokens, needle_sentence, niah_question, split_code,
                                 split_items, unique)


@dataclass(frozen=True)
class NiahSpec:
    n_keys: int  # distinct keys planted
    n_values: int  # values per key (> 1 only for MV)
    n_queries: int  # keys asked
    max_new_tokens: int


NIAH_SPECS = {
    "s_niah": NiahSpec(1, 1, 1, 12),
    "mk_niah": NiahSpec(4, 1, 1, 12),
    "mv_niah": NiahSpec(1, 4, 1, 40),
    "mq_niah": NiahSpec(4, 1, 4, 40),
}


def fill_haystack(rng: random.Random, haystack: str, n_tokens: int) -> tuple[list[tuple[int, ...]], bool]:
    """Filler units totalling exactly n_tokens: [tail fragment of one sentence (if needed)] + whole sentences.
    Returns (units, whether units[0] is a fragment)."""
    i0 = rng.randrange(5)
    units, total, i = [], 0, i0
    while True:
        ids = encode_cached(filler_sentence(rng, haystack, i))
        i += 1
        if total + len(ids) > n_tokens:
            break
        units.append(ids)
        total += len(ids)
    r, tail, j = n_tokens - total, [], i0 - 1
    while len(tail) < r:  # the r missing tokens: tail of the sentence(s) that would precede the first one
        tail = list(encode_cached(filler_sentence(rng, haystack, j))) + tail
        j -= 1
    if r:
        units.insert(0, tuple(tail[len(tail) - r:]))
    return units, r > 0


def assemble(prefix: list[int], needles: list[tuple[int, ...]], depths: list[float], suffix: list[int], length: int,
             rng: random.Random, haystack: str) -> tuple[list[int], list[int]]:
    """prefix + haystack with needles at depths + suffix, exactly `length` tokens -> (ids, needle start positions).
    ValueError for a length too short to hold prefix, needles and suffix, or a depth outside [0, 1] (naming "depth")."""
    budget = length - len(prefix) - len(suffix) - sum(len(n) for n in needles)
    if budget < 0:
        raise ValueError(f"length {length} is too short for this task: needs at least {length - budget} tokens")
    units, fragment = fill_haystack(rng, haystack, budget)
    first_ok = int(fragment)  # no needle before the tail fragment
    offsets = [0]
    for u in units:
        offsets.append(offsets[-1] + len(u))  # offsets[k] = filler tokens before unit k
    slots = []  # (boundary k, needle j): needle j goes right before unit k
    for j, d in enumerate(depths):
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {d}")
        k = min(range(first_ok, len(units) + 1), key=lambda k: abs(offsets[k] - d * budget))
        slots.append((k, j))
    slots.sort()
    ids, pos, s = list(prefix), [0] * len(needles), 0
    for k in range(len(units) + 1):
        while s < len(slots) and slots[s][0] == k:
            pos[slots[s][1]] = len(ids)
            ids.extend(needles[slots[s][1]])
            s += 1
        if k < len(units):
            ids.extend(units[k])
    ids.extend(suffix)
    assert len(ids) == length, (len(ids), length)
    return ids, pos


def make_niah_example(task: str, length: int, depth: float, rng: random.Random, split: str = "eval",
                      haystack: str = "noise") -> Example:
    """One S/MK/MV/MQ-NIAH instance drawn from rng, with keys and values from `split`'s partition."""
    spec = NIAH_SPECS[task]
    keys = unique(rng, make_key, split, spec.n_keys)
    values = unique(rng, make_value, split, spec.n_keys * spec.n_values)
    pairs = [(keys[0], v) for v in values] if spec.n_values > 1 else list(zip(keys, values))
    depths = [depth] + [rng.random() for _ in pairs[1:]]
    question = niah_question(keys[:spec.n_queries], multi_value=spec.n_values > 1)
    needles = [encode_cached(needle_sentence(k, v)) for k, v in pairs]
    ids, pos = assemble(list(encode_cached(NIAH_HEADER)), needles, depths, list(encode_cached(question)), length,
                        rng, haystack)
    if spec.n_values > 1:  # MV: all values, in the order they appear in the text
        answers = [v for _, v in sorted(zip(pos, values))]
    else:
        answers = values[:spec.n_queries]
    return Example(ids, answers, task, length, depth, pos, spec.max_new_tokens, format_answer(answers))


def score_niah(output: str, answers: list[str]) -> float:
    """RULER recall: fraction of gold answers found (case-insensitive substring) in the output's first line (the
    cut is our deviation, see the module docstring). ValueError for an empty list of answers or a blank answer."""
    if not answers or not all(a.strip() for a in answers):  # a blank answer is in every line: it would score 1
        raise ValueError(f"score_niah needs gold answers that are not blank: {answers!r:.80}")
    line = output.split("\n", 1)[0].lower()
    return sum(a.lower() in line for a in answers) / len(answers)


def _niah(task):
    return lambda length, depth, rng, split, haystack: make_niah_example(task, length, depth, rng, split, haystack)


def _qa(hops):
    return lambda length, depth, rng, split, haystack: qa.make_qa_example(length, depth, rng, split, hops)


TASKS = {
    "s_niah": _niah("s_niah"),
    "mk_niah": _niah("mk_niah"),
    "mv_niah": _niah("mv_niah"),
    "mq_niah": _niah("mq_niah"),
    "qa": _qa(1),
    "qa_2hop": _qa(2),
}
SCORERS = {name: (qa.score_qa if name.startswith("qa") else score_niah) for name in TASKS}


@functools.lru_cache(maxsize=None)
def min_length(task: str, split: str = "eval") -> int:
    """The fewest tokens that hold every `task` prompt of `split`, whatever keys, values or entities are drawn: the
    header, needles and question (NIAH) or the gold passages and question (QA) at their longest, no haystack."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if task.startswith("qa"):
        return qa.min_length(1 if task == "qa" else 2, split)
    spec = NIAH_SPECS[task]
    keys = [f"k{i}" for i in range(spec.n_keys)]
    values = [f"v{i}" for i in range(spec.n_keys * spec.n_values)]
    pairs = [(keys[0], v) for v in values] if spec.n_values > 1 else list(zip(keys, values))
    pieces = [NIAH_HEADER, *(needle_sentence("{" + k + "}", "{" + v + "}") for k, v in pairs),
              niah_question(["{" + k + "}" for k in keys[:spec.n_queries]], multi_value=spec.n_values > 1)]
    slots = {k: split_items("key", split) for k in keys} | {v: [longest_value(split)] for v in values}
    return max_tokens(pieces, slots)


def check_length(task: str, length: int, split: str = "eval", name: str = "length") -> None:
    """Raise ValueError (one line, naming the length `name`) unless every `task` prompt of `split` fits in `length`
    tokens."""
    need = min_length(task, split)
    if length < need:
        raise ValueError(f"{name} {length} is too short for task {task}: its {split}-split prompts need at least "
                         f"{need} tokens")


# Prompts are built up front, in memory: 14-46 bytes and 4-13 µs a token (S-NIAH / QA, measured). 2**26 tokens is
# ~1-3 GB and 4-15 minutes of building; a larger request (a mistyped --samples) is refused before it starts.
MAX_PROMPT_TOKENS = 2 ** 26


def check_prompt_budget(prompts: int, length: int, what: str) -> None:
    """Raise ValueError (one line) when `prompts` prompts of `length` tokens exceed MAX_PROMPT_TOKENS."""
    if prompts * length > MAX_PROMPT_TOKENS:
        raise ValueError(f"{what} ask for {prompts:,} prompts of {length:,} tokens, built in memory up front; at most "
                         f"{MAX_PROMPT_TOKENS:,} tokens at a time (refine_mini/niah.py)")


def make_example(task: str, length: int, depth: float, rng: random.Random, split: str = "eval",
                 haystack: str = "noise") -> Example:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    split_code(split)  # validates the split name
    check_length(task, length, split)
    return TASKS[task](length, depth, rng, split, haystack)


def make_task_examples(task: str, n: int, length: int, depths=None, seed: int = 0, split: str = "eval",
                       haystack: str = "noise") -> list[Example]:
    """n examples; example i uses depths[i % len(depths)] (a float is one depth; None draws uniform depths).

    Example i depends only on (task, split, seed, length, i): a string seed feeds random.Random, which hashes it
    deterministically, so any prefix of the list is reproducible on its own."""
    if isinstance(depths, (int, float)):
        depths = [float(depths)]
    out = []
    for i in range(n):
        rng = random.Random(f"{task}|{split}|{seed}|{length}|{haystack}|{i}")
        d = rng.random() if not depths else depths[i % len(depths)]
        out.append(make_example(task, length, d, rng, split, haystack))
    return out


def score(task: str, output: str, answers: list[str]) -> float:
    """The task's metric: NIAH recall or QA any-substring accuracy."""
    if task not in SCORERS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return SCORERS[task](output, answers)
