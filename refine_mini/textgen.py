"""Text generators shared by the corpus (data.py) and the RULER-style tasks (niah.py, qa.py).

Question answered: where do keys, values, entities, filler prose and the exact surface forms come from, and how do
we guarantee that evaluation never sees a key, value or entity that pre-training saw?

Surface forms (method.md §6, RULER NIAH / RULER QA; the pre-training corpus uses exactly these strings):
    needle    " The special magic number for quiet-river is: 4821937."
    S/MK      "\\nQuestion: What is the special magic number for quiet-river?\\nAnswer: The special magic number for
               quiet-river is:"                                                          -> " 4821937\\n"
    MV        "\\nQuestion: What are all the special magic numbers for quiet-river?\\nAnswer: The special magic
               numbers for quiet-river are:"                                             -> " 4821937, 1200449\\n"
    MQ        "\\nQuestion: What are the special magic numbers for quiet-river, old-ship and dry-key?\\nAnswer:"
                                                                                         -> " v1, v2, v3\\n"
Deviation from RULER: RULER's question reads "What is the special magic number for X mentioned in the provided text?"
and its answer prefix "The special magic number for X mentioned in the provided text is"; ours are shorter, and the
S/MK/MV prefix restates the needle word for word (niah_question). MQ and QA end on a bare "Answer:".

Split disjointness is structural, not seed luck. Each split has a code (train 0, val 1, eval 2) and every generated
item satisfies a rule that ties it to exactly one code:
    key      "<adj>-<noun>"          (i_adj + i_noun) % 3 == code
    value    7-digit number n        n % 3 == code
    person   "<First> <Last>"        (i_first + i_last) % 3 == code
    city     "<Prefix><suffix>"      (i_prefix + i_suffix) % 3 == code
    company  "<Root> <Kind>"         (i_root + i_kind) % 3 == code
Every word still appears in every split (only the combinations are partitioned), so the eval tokens are all trained.
Word lists hold no duplicates, so each combination has exactly one index pair, and no item is a substring of another
item of its kind and split, so the substring metrics (RULER's) never credit a wrong entity (tests check both; a
prefix "El" once made "Elfield" a substring of "Belfield", and "Cal" took its place: the same token counts).
"""

import functools
import random
from dataclasses import dataclass

from refine_mini.tokenizer import encode

SPLITS = {"train": 0, "val": 1, "eval": 2}

ADJECTIVES = ("quiet bright dark cold warm old young small large green blue red white black happy proud quick slow "
              "wild soft loud sharp deep tall short sweet fresh early late rich poor simple strong weak heavy dry "
              "clean empty full hidden lost hot round flat thin thick fair kind huge tiny golden silver brave "
              "calm").split()
NOUNS = ("river window table stone tree bird bridge island cloud storm star city village road field house door book "
         "letter song dream fire water winter summer market school church ship train car king dog cat fish bear "
         "friend key ring box mountain forest garden horse apple tower ocean valley flower moon lake wolf lion "
         "mirror clock coin bottle candle lamp shadow").split()
FIRST_NAMES = ("James Mary John Peter David Paul Mark Robert Thomas Daniel Frank Rose Adam George Louis Martin Anna "
               "Laura Sarah Emma Alice Helen Grace Clara Henry Julia Simon Lucy Victor Nina Oscar Maria Eva Kate "
               "Ruth Jane").split()
LAST_NAMES = ("Smith Brown Miller Wilson Taylor Hall Young King Green Hill Bell Wood Ford Stone West Moore Clark "
              "Wright Baker Adams Carter Turner Parker Evans Collins Morris Reed Cook Murphy Bailey Cooper Ward Gray "
              "Fisher Hunt Mason").split()
CITY_PREFIXES = "Ash Bel Cor Dun Cal Fair Iron North Pen Red South Fox Gold High Long Glen Hart Mill Oak Elm".split()
CITY_SUFFIXES = "ton field mouth port stead worth haven ford bury wick dale ham ville".split()
COMPANY_ROOTS = ("Apex Blue Cedar Delta Echo Falcon Granite Harbor Indigo Jade Maple Nova Orbit Pioneer Quartz "
                 "Summit Tidal Unity Vertex Willow Zenith Amber Beacon Crown Eagle Fern Global Horizon Ivory "
                 "Lotus Metro Noble Oasis Pine Royal Star").split()
COMPANY_KINDS = "Labs Foods Motors Systems Books Energy Games Tools Bank Media Textiles Airlines Farms Steel".split()
JOBS = ("baker teacher doctor farmer pilot writer painter engineer nurse lawyer driver singer chef builder "
        "tailor sailor").split()

# RULER's "noise" haystack: these five sentences repeated (RULER niah.py, type_haystack="noise").
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n")
QA_INSTRUCTION = ("Answer the question based on the given passages. "
                  "Only give me the answer and do not output any other words.")

# Prose filler ("essay" haystack): small regular vocabulary, templates, no keys/values/entities in it.
_P_ADJ = "old quiet small long bright cold warm green dark wide".split()
_P_NOUN = "river hill road house garden field tree town bridge market forest wall".split()
_P_VERB = "runs past|stands near|leads to|lies beside|looks over|turns toward".split("|")
_P_TIME = "In the morning|At night|In winter|In summer|Every day|Later|Long ago|Today".split("|")
_P_PEOPLE = "the children|the farmers|the workers|the travellers|the old men|the women|the students".split("|")
_P_ACT = "walk slowly|sing songs|tell stories|rest for a while|talk about the weather|carry bread|read books".split("|")


@dataclass
class Example:
    """One task instance. `prompt_ids` has exactly `length` tokens and ends with the answer cue ("Answer:", for
    S/MK/MV followed by the restated needle, "... is:" / "... are:");
    `target` is the gold continuation (" v1, v2\n"), used for answer-SFT in post-training."""
    prompt_ids: list[int]
    answers: list[str]  # gold strings; NIAH recall counts each, QA needs any one
    task: str
    length: int
    depth: float  # requested depth of the (first) needle / gold passage, 0 = start, 1 = end of the context
    needle_token_pos: list[int]  # index in prompt_ids of the first token of each needle / gold passage body
    max_new_tokens: int
    target: str


@functools.lru_cache(maxsize=65536)
def encode_cached(text: str) -> tuple[int, ...]:
    """encode() for the short, often repeated sentences of generated text."""
    return tuple(encode(text))


def split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def _pair(rng: random.Random, a: list, b: list, code: int) -> tuple[str, str]:
    """A pair (a[i], b[j]) with (i + j) % 3 == code: i uniform, j uniform among the matching residues."""
    i = rng.randrange(len(a))
    js = range((code - i) % 3, len(b), 3)
    return a[i], b[rng.choice(js)]


def make_key(rng: random.Random, split: str) -> str:
    adj, noun = _pair(rng, ADJECTIVES, NOUNS, split_code(split))
    return f"{adj}-{noun}"


def make_value(rng: random.Random, split: str) -> str:
    """A 7-digit number n (1000000..9999999) with n % 3 == split code."""
    return str(3 * rng.randrange(333_334, 3_333_333) + split_code(split))  # 1000002 .. 9999998


def make_person(rng: random.Random, split: str) -> str:
    return " ".join(_pair(rng, FIRST_NAMES, LAST_NAMES, split_code(split)))


def make_city(rng: random.Random, split: str) -> str:
    return "".join(_pair(rng, CITY_PREFIXES, CITY_SUFFIXES, split_code(split)))


def make_company(rng: random.Random, split: str) -> str:
    return " ".join(_pair(rng, COMPANY_ROOTS, COMPANY_KINDS, split_code(split)))


def unique(rng: random.Random, make, split: str, n: int, avoid=()) -> list[str]:
    """n distinct items from generator `make`, none in `avoid` (the pools are large enough for n ≤ 100)."""
    out, seen = [], set(avoid)
    for _ in range(200 * n + 100):
        if len(out) == n:
            return out
        x = make(rng, split)
        if x not in seen:
            seen.add(x)
            out.append(x)
    raise ValueError(f"cannot draw {n} distinct items for split {split!r}")


def is_split_key(key: str, split: str) -> bool:
    adj, noun = key.split("-")
    return (ADJECTIVES.index(adj) + NOUNS.index(noun)) % 3 == split_code(split)


def is_split_value(value: str, split: str) -> bool:
    return len(value) == 7 and int(value) % 3 == split_code(split)


_PARTS = {"key": (ADJECTIVES, NOUNS, "-"), "person": (FIRST_NAMES, LAST_NAMES, " "),
          "city": (CITY_PREFIXES, CITY_SUFFIXES, ""), "company": (COMPANY_ROOTS, COMPANY_KINDS, " ")}
VALUE_MAX_TOKENS = 5  # most tokens " n" takes over the 7-digit values n of any split (a slow test enumerates all)


def split_items(kind: str, split: str) -> list[str]:
    """Every key, person, city or company that `split` can draw (make_key & co.), in index order."""
    a, b, sep = _PARTS[kind]
    code = split_code(split)
    return [x + sep + y for i, x in enumerate(a) for j, y in enumerate(b) if (i + j) % 3 == code]


def longest_value(split: str) -> str:
    """The first value of `split` whose " value" takes VALUE_MAX_TOKENS tokens (the most any value takes)."""
    code = split_code(split)
    for n in range(333_334, 3_333_333):  # a few hundred steps at most: a quarter of all values take 5 tokens
        value = str(3 * n + code)
        if len(encode(" " + value)) == VALUE_MAX_TOKENS:
            return value
    raise AssertionError(f"no value of split {split!r} takes {VALUE_MAX_TOKENS} tokens")


def max_tokens(pieces: list[str], slots: dict[str, list[str]]) -> int:
    """The most tokens `pieces` (each encoded on its own, counts summed) can take when each "{slot}" in them is
    replaced by any one of its candidates.

    Counted at every slot's first candidate, plus each slot's largest gain over its first. That is the maximum over
    all joint choices because a slot's token count does not depend on the other slots: GPT-2's pre-tokeniser cuts
    the text before every space-led word and around punctuation, BPE never merges across a cut, and every slot in
    the task templates starts a word and ends before a space or punctuation (tests check it on drawn prompts)."""
    def count(choice: dict, only: str | None = None) -> int:
        total = 0
        for piece in pieces:
            if only is None or "{" + only + "}" in piece:
                for name, value in choice.items():
                    piece = piece.replace("{" + name + "}", value)
                total += len(encode(piece))
        return total
    base = {name: cands[0] for name, cands in slots.items()}
    return count(base) + sum(max(count({**base, name: c}, name) for c in cands) - count(base, name)
                             for name, cands in slots.items())


# ---- surface forms --------------------------------------------------------------------------------------------

def needle_sentence(key: str, value: str) -> str:
    return f" The special magic number for {key} is: {value}."


def join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def niah_question(keys: list[str], multi_value: bool = False) -> str:
    """The query block; the model's answer follows it as ' v1, v2\\n'.

    Like RULER, the prompt ends with an answer prefix that restates the needle ("... The special magic number for
    {key} mentioned in the provided text is"); ours restates it word for word ("The special magic number for {key}
    is:"), so that a single-key lookup is an exact copy of what followed that phrase in the haystack -- the
    associative recall a fast-weight memory is built for, and learnable by a tiny model in minutes.
    """
    if multi_value:
        q = f"What are all the special magic numbers for {keys[0]}?\nAnswer: The special magic numbers for {keys[0]} are:"
    elif len(keys) == 1:
        q = f"What is the special magic number for {keys[0]}?\nAnswer: The special magic number for {keys[0]} is:"
    else:
        q = f"What are the special magic numbers for {join_keys(keys)}?\nAnswer:"
    return f"\nQuestion: {q}"


def format_answer(values: list[str]) -> str:
    return " " + ", ".join(values) + "\n"


PERSON_PASSAGES = (  # facts about one person, in three phrasings (every task accepts any of them)
    "{name} was born in {city}. {name} works as a {job} at {company}.",
    "Born in {city}, {name} later became a {job}. Today {name} works at {company}.",
    "{name} is a {job} at {company}. The home town of {name} is {city}, where {name} was born.",
)
COMPANY_PASSAGES = (
    "{company} was founded by {founder} in {year}. The company is based in {city}.",
    "In {year}, {founder} founded {company}, a company based in {city}.",
)


def person_passage(rng: random.Random, name: str, city: str, job: str, company: str) -> str:
    return PERSON_PASSAGES[rng.randrange(3)].format(name=name, city=city, job=job, company=company)


def company_passage(rng: random.Random, company: str, founder: str, city: str, year: int) -> str:
    return COMPANY_PASSAGES[rng.randrange(2)].format(company=company, founder=founder, city=city, year=year)


def qa_question(question: str) -> str:
    return f"\nQuestion: {question}\nAnswer:"


def noise_sentence(i: int) -> str:
    return " " + NOISE_SENTENCES[i % len(NOISE_SENTENCES)]


def prose_sentence(rng: random.Random) -> str:
    """One sentence of the built-in 'essay' filler: regular, small vocabulary, never a key/value/entity."""
    a, n, n2 = rng.choice(_P_ADJ), rng.choice(_P_NOUN), rng.choice(_P_NOUN)
    v = rng.randrange(4)
    if v == 0:
        return f" The {a} {n} {rng.choice(_P_VERB)} the {n2}."
    if v == 1:
        return f" {rng.choice(_P_TIME)}, {rng.choice(_P_PEOPLE)} {rng.choice(_P_ACT)} by the {n}."
    if v == 2:
        return f" There is a {a} {n} near the {rng.choice(_P_ADJ)} {n2}."
    return f" {rng.choice(_P_TIME)} the {n} was {a}, and {rng.choice(_P_PEOPLE)} {rng.choice(_P_ACT)}."


def filler_sentence(rng: random.Random, haystack: str, i: int) -> str:
    """Sentence i of a haystack: 'noise' (RULER's repeated five sentences) or 'essay' (prose_sentence)."""
    if haystack == "noise":
        return noise_sentence(i)
    if haystack == "essay":
        return prose_sentence(rng)
    raise ValueError(f"unknown haystack {haystack!r}; expected 'noise' or 'essay'")
