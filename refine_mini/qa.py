"""Synthetic multi-document QA in the RULER QA format (method.md §6 "RULER QA"), one-hop and two-hop.

Question answered: how do we make a SQuAD/HotpotQA-like long-context QA prompt of exactly `length` tokens, and score it?

Rendered one-hop prompt (make_qa_example(230, 0.5, random.Random(2)); `|` marks needle_token_pos[0] = 107):

    Answer the question based on the given passages. Only give me the answer and do not output any other words.

    The following are given passages.

    Passage 1:
    Frank Adams was born in Goldbury. Frank Adams works as a nurse at Royal Textiles.
    Passage 2:
    Clara Turner was born in Southdale. Clara Turner works as a writer at Horizon Energy.
    Passage 3:
    |Peter Hall is a nurse at Maple Tools. The home town of Peter Hall is Corhaven, where Peter Hall was born.
    Passage 4:
    Nova Games was founded by Rose Young in 1981. The company is based in Hartford. In summer the wall was warm,
    and the travellers tell stories.

    Answer the question based on the given passages. Only give me the answer and do not output any other words.

    Question: Where was Peter Hall born?
    Answer:
target " Corhaven\\n". Two-hop ("qa_2hop"): "Where was the founder of <Company> born?" needs the company passage (its
founder) and that founder's person passage; both are gold passages (needle_token_pos has two entries).

Exact length: the gold passages plus as many distractor passages (other people, other companies, all from the same
split) as fit; the tokens still missing (fewer than one passage, until the split's people run out at long lengths)
are prose filler (the last words of a sentence, then whole sentences) appended after the last passage. min_length
gives the shortest length that holds every prompt (gold passages and question at their longest). The first gold
passage sits at passage index round(depth × #distractors); the second (two-hop) at a random index.
Score (ReFINE/RULER QA): the output before its first newline, stripped; 1 if any gold answer is a case-insensitive
substring of it, else 0.
Deviations: synthetic entities and templated passages instead of SQuAD/HotpotQA paragraphs; our tokenizer; entities
(people, cities, companies) are partitioned by split (textgen.py), so eval answers never occur in training text.
The ids are the ones encode() gives for the prompt's text (a test checks every task): the filler starts at a word
(_prose_filler), since a cut "." after a passage's final "." merges into "..", and a cut inside a word re-encodes
differently.
"""

import functools
import random

from refine_mini.textgen import (COMPANY_PASSAGES, JOBS, PERSON_PASSAGES, QA_INSTRUCTION, Example, company_passage,
                                 encode_cached, make_city, make_company, make_person, max_tokens, person_passage,
                                 prose_sentence, qa_question, split_items, unique)
from refine_mini.tokenizer import decode

QA_PREFIX = QA_INSTRUCTION + "\n\nThe following are given passages.\n"
QUESTIONS = ("Where was {name} born?", "Which company does {name} work for?")  # one-hop: city / employer
QUESTION_2HOP = "Where was the founder of {company} born?"
MAX_NEW_TOKENS = 32  # ReFINE's TTT demo decodes ≤ 32 tokens for every task


def _header_text(i: int) -> str:
    return f"\nPassage {i}:\n"


def _header(i: int) -> tuple[int, ...]:
    return encode_cached(_header_text(i))


def _suffix_text(question: str) -> str:
    return "\n\n" + QA_INSTRUCTION + "\n" + qa_question(question)


class _World:
    """Entities of one example; every name and company is drawn at most once (people may share a city)."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.names, self.companies = rng, split, set(), set()

    def person(self) -> str | None:
        try:
            name = unique(self.rng, make_person, self.split, 1, avoid=self.names)[0]
        except ValueError:  # pool exhausted (very long prompts): the caller stops adding passages
            return None
        self.names.add(name)
        return name

    def company(self) -> str | None:
        try:
            company = unique(self.rng, make_company, self.split, 1, avoid=self.companies)[0]
        except ValueError:
            return None
        self.companies.add(company)
        return company

    def person_text(self, name: str, city: str) -> tuple[str, str]:
        """(passage, employer) for one person."""
        employer = make_company(self.rng, self.split)
        return person_passage(self.rng, name, city, self.rng.choice(JOBS), employer), employer

    def company_text(self, company: str, founder: str, city: str) -> str:
        return company_passage(self.rng, company, founder, city, self.rng.randrange(1850, 2020))

    def distractor(self) -> str | None:
        if self.rng.random() < 1 / 3:
            company, founder = self.company(), self.person()
            if company and founder:
                return self.company_text(company, founder, make_city(self.rng, self.split))
        name = self.person()
        return self.person_text(name, make_city(self.rng, self.split))[0] if name else None


def make_qa_example(length: int, depth: float, rng: random.Random, split: str = "eval", hops: int = 1) -> Example:
    """A multi-document QA instance of exactly `length` tokens (hops 1 = "qa", 2 = "qa_2hop")."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    w = _World(rng, split)
    name, city = w.person(), make_city(rng, split)
    if hops == 1:
        text, employer = w.person_text(name, city)
        gold = [text]
        q = rng.randrange(2)
        question, answer = QUESTIONS[q].format(name=name), (city, employer)[q]
    elif hops == 2:
        company = w.company()
        gold = [w.company_text(company, name, make_city(rng, split)), w.person_text(name, city)[0]]
        question, answer = QUESTION_2HOP.format(company=company), city
    else:
        raise ValueError(f"hops must be 1 or 2, got {hops}")
    prefix = encode_cached(QA_PREFIX)
    suffix = encode_cached(_suffix_text(question))
    bodies = [encode_cached(g) for g in gold]
    used = len(prefix) + len(suffix) + sum(len(_header(i + 1)) + len(b) for i, b in enumerate(bodies))
    if used > length:
        raise ValueError(f"length {length} is too short for this task: needs at least {used} tokens")
    distractors = []
    while True:
        text = w.distractor()
        if text is None:
            break
        body = encode_cached(text)
        extra = len(_header(len(bodies) + len(distractors) + 1)) + len(body)
        if used + extra > length:
            break
        distractors.append(body)
        used += extra
    order = list(distractors)  # insert gold passages: the first at the requested depth, the second anywhere
    gold_idx = [round(depth * len(distractors))]
    order.insert(gold_idx[0], bodies[0])
    if len(bodies) == 2:
        j = rng.randint(0, len(order))
        order.insert(j, bodies[1])
        gold_idx = [g + (g >= j) for g in gold_idx] + [j]
    ids, starts = list(prefix), []
    for i, body in enumerate(order):
        ids.extend(_header(i + 1))
        starts.append(len(ids))
        ids.extend(body)
    ids.extend(_prose_filler(rng, length - used))
    ids.extend(suffix)
    assert len(ids) == length, (len(ids), length)
    task = "qa" if hops == 1 else "qa_2hop"
    return Example(ids, [answer], task, length, depth, [starts[g] for g in gold_idx], MAX_NEW_TOKENS, f" {answer}\n")


@functools.lru_cache(maxsize=None)
def min_length(hops: int, split: str = "eval") -> int:
    """The fewest tokens that hold every prompt make_qa_example can draw from `split`: prefix, gold passage(s) with
    their headers, and the question block, for the longest entities and the longest phrasing (textgen.max_tokens)."""
    cities, companies = split_items("city", split), split_items("company", split)
    slots = {"name": split_items("person", split), "city": cities, "job": list(JOBS), "employer": companies}
    people = [t.format(name="{name}", city="{city}", job="{job}", company="{employer}") for t in PERSON_PASSAGES]
    if hops == 1:
        variants = [([p], q) for p in people for q in QUESTIONS]
    else:  # gold = [company passage (its founder is the person), person passage]; the question names the company
        slots |= {"company": companies, "city2": cities, "year": [str(y) for y in range(1850, 2020)]}
        firms = [t.format(company="{company}", founder="{name}", city="{city2}", year="{year}")
                 for t in COMPANY_PASSAGES]
        variants = [([c, p], QUESTION_2HOP) for c in firms for p in people]
    return max(max_tokens([QA_PREFIX, *(x for i, b in enumerate(bodies) for x in (_header_text(i + 1), b)),
                           _suffix_text(q)], slots) for bodies, q in variants)


def _prose_filler(rng: random.Random, n: int) -> list[int]:
    """Exactly n tokens of prose whose ids are the ones encode() gives for the text in place: the last n tokens of a
    stream of sentences (a sentence's tail, then whole sentences), drawing one more sentence while they do not start
    at a word (a token with a leading space). One token cannot both start at a word and end a sentence (on its
    "."), so n = 1 is one word: the first of a fresh sentence."""
    if n == 1:
        return [encode_cached(prose_sentence(rng))[0]]
    stream: list[int] = []
    while n:
        while len(stream) < n:
            stream.extend(encode_cached(prose_sentence(rng)))
        if _starts_word(stream[-n]):
            return stream[-n:]
        stream.extend(encode_cached(prose_sentence(rng)))
    return []


@functools.lru_cache(maxsize=None)
def _starts_word(token: int) -> bool:
    """The token begins with a space: GPT-2's pre-tokeniser starts a new piece there, whatever precedes it."""
    return decode([token]).startswith(" ")


def score_qa(output: str, answers: list[str]) -> float:
    """1.0 if any gold answer is a case-insensitive substring of the stripped first line of the output, else 0.0."""
    if not answers:
        raise ValueError("score_qa needs at least one gold answer")
    line = output.split("\n", 1)[0].strip().lower()
    return float(any(a.strip().lower() in line for a in answers if a.strip()))
