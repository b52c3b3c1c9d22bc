"""Corpora -> (B, T) token batches: a built-in synthetic long-document corpus, or the user's own text files.

Question answered: what does the model read in pre-/mid-training (method.md §9 "Data": a long-document corpus filtered
to ≥ T tokens), and how do we keep train, validation and evaluation apart?

Synthetic corpus. A tiny model must learn retrieval in minutes, so every document is dense with facts that are asked
for later, in exactly the surface forms of the evaluation (niah.py, qa.py; forms in textgen.py). Half the documents
are one long stream of filler prose ("noise" or "essay" style) interleaved with needles, entity passages, MV needles
(one key, several values) and questions (single, multi-query, multi-value). Each question asks for a fact stated
earlier; questions grow more frequent along the document and prefer old facts (index ~ U³), so at T = 1024 the
median needle-to-question distance is ~340 tokens (max ~950). Keys and names are unique within a document.
The other half (documents of ≥ 256 tokens) are a train-split NIAH/QA task prompt
(niah.make_example) followed by its answer and by a stream continuation. Rendered 200-token stream (seed 1):

     The grass is green. The special magic number for simple-apple is: 6942222. The sky is blue. The sun is yellow.
    Here we go. Born in Longford, James Fisher later became a farmer. Today James Fisher works at Quartz Steel.
    Question: What is the special magic number for simple-apple?
    Answer: The special magic number for simple-apple is: 6942222
     There and back again. The grass is green. The sky is blue. The sun is yellow. The special magic number for
    simple-mirror is: 3932883. The special magic number for huge-garden is: 4646298. Here we go. There and back
    again. The grass is green.
    Question: Where was James Fisher born?
    Answer: Longford
    Question: What is the special magic number for simple-mirror?
    Answer: The special magic number for simple-mirror is: 3932883
Splits are structural (textgen.py): train documents draw keys, values and entities from the train partition, val
documents from the val partition, and niah.py/qa.py evaluate on the eval partition, so no key, value or entity is
ever shared, whatever the seeds. Training documents are generated on the fly (a fresh seed per row, drawn from the
caller's torch.Generator), so training never repeats a document; validation is a fixed set of val-split documents.

User text: `textfiles.load_text_documents` reads a .txt file, a .jsonl file or a folder of them into documents (where
one ends and the next begins: textfiles.py). Documents are tokenised once, without BOS; `pack` joins them with EOT
between and cuts T-token rows, `filter_docs` keeps documents of ≥ T tokens cut to T. The train/val split is by
document: document i is in val iff a hash of (seed, i) falls below val_fraction (never an overlap; at least one of
each). Rows hold T tokens; the trainer predicts tokens[:, 1:] from tokens[:, :-1]. Their `digest` is saved with a
run, and a resumed run refuses files whose rows have changed since (resume.same_data).
Deviation: the paper mid-trains on long-document corpora (e.g. LongBench-like books); ours is synthetic by default.
"""

import hashlib
import random
import re

import torch

from refine_mini import niah
from refine_mini.textfiles import load_text_documents
from refine_mini.textgen import (JOBS, NIAH_HEADER, encode_cached, filler_sentence, format_answer, make_city,
                                 make_company, make_key, make_person, make_value, needle_sentence, niah_question,
                                 person_passage, qa_question, split_code, unique)
from refine_mini.tokenizer import decode, encode, eot_id


class _Writer:
    """Accumulates text pieces and their token count; a question right after an answer drops its leading newline."""

    def __init__(self):
        self.pieces, self.n = [], 0

    def add(self, text: str):
        if self.pieces and self.pieces[-1].endswith("\n") and text.startswith("\n"):
            text = text[1:]
        self.pieces.append(text)
        self.n += len(encode_cached(text))


def _stream_document(rng: random.Random, n_tokens: int, split: str, header: bool = True, used=()) -> str:
    """Filler interleaved with needles, entity passages and questions; keys and names are unique in a document
    (once a very long document has used up its split's keys or names, filler takes their place)."""
    w, style, used = _Writer(), rng.choice(["noise", "essay"]), set(used)

    def fresh(make):  # a key or name this document has not used yet; None once the split's pool is spent
        try:
            x = unique(rng, make, split, 1, used)[0]
        except ValueError:
            return None
        used.add(x)
        return x

    if header and rng.random() < 0.5:
        w.add(NIAH_HEADER)
    facts = []  # unasked facts, oldest first: (question text, answers, key or None)
    mv_key, mv_values, i = None, [], 0
    while w.n < n_tokens:
        r = rng.random()
        if facts and rng.random() < 0.4 * w.n / n_tokens:  # a question, more often late in the document
            singles = [f for f in facts if f[2] is not None]
            if r < 0.15 and len(singles) >= 2:  # multi-query
                asked = rng.sample(singles, min(len(singles), rng.randint(2, 4)))
                for f in asked:
                    facts.remove(f)
                w.add(niah_question([f[2] for f in asked]))
                w.add(format_answer([f[1][0] for f in asked]))
            else:  # about an earlier fact, biased towards old ones
                q, answers, _ = facts.pop(int(len(facts) * rng.random() ** 3))
                if answers is mv_values:  # an asked multi-value key gets no further values
                    mv_key = None
                w.add(q)
                w.add(format_answer(answers))
        elif r < 0.3 and (k := fresh(make_key)):  # needle
            v = make_value(rng, split)
            w.add(needle_sentence(k, v))
            facts.append((niah_question([k]), [v], k))
        elif r < 0.37 and ((mv_key is not None and len(mv_values) < 4) or (key := fresh(make_key))):  # MV needle:
            if mv_key is None or len(mv_values) >= 4:  # a value of the open key, or a new key (values spread out)
                mv_key, mv_values = key, []
                facts.append((niah_question([mv_key], multi_value=True), mv_values, None))
            mv_values.append(make_value(rng, split))
            w.add(needle_sentence(mv_key, mv_values[-1]))
        elif r < 0.44 and (name := fresh(make_person)):  # entity passage: two askable facts
            city, company = make_city(rng, split), make_company(rng, split)
            w.add(" " + person_passage(rng, name, city, rng.choice(JOBS), company))
            facts.append((qa_question(f"Where was {name} born?"), [city], None))
            facts.append((qa_question(f"Which company does {name} work for?"), [company], None))
        else:  # filler prose
            for _ in range(rng.randint(1, 3)):
                w.add(filler_sentence(rng, style, i))
                i += 1
    return "".join(w.pieces)


def _task_document(rng: random.Random, n_tokens: int, split: str) -> str:
    task = rng.choice(["s_niah", "s_niah", "mk_niah", "mv_niah", "mq_niah", "qa", "qa_2hop"])
    ex = niah.make_example(task, n_tokens - 48, rng.random(), rng, split, rng.choice(["noise", "essay"]))
    text = decode(ex.prompt_ids) + ex.target
    for key, value in re.findall(r"special magic number for ([a-z]+-[a-z]+) is: (\d+)", text):
        if task == "mk_niah" and value not in ex.answers:  # also ask the other keys
            text += niah_question([key])[1:] + format_answer([value])
    missing = n_tokens - len(encode(text))
    if missing <= 0:
        return text
    used = set(re.findall(r"[a-z]+-[a-z]+|[A-Z][a-z]+ [A-Z][a-z]+", text))  # keys and names already in use
    return text + _stream_document(rng, missing, split, header=False, used=used)


def synthetic_document(rng: random.Random, n_tokens: int, split: str = "train") -> str:
    """One synthetic document of about n_tokens tokens (at least n_tokens, barring rare BPE merges at piece joins)."""
    split_code(split)
    if n_tokens >= 256 and rng.random() < 0.5:
        return _task_document(rng, n_tokens, split)
    return _stream_document(rng, n_tokens, split)


def synthetic_ids(seed: str, n_tokens: int, split: str) -> list[int]:
    """Exactly n_tokens ids from synthetic documents seeded by `seed` (EOT between documents if one is short)."""
    rng, ids = random.Random(seed), []
    while len(ids) < n_tokens:
        ids += ([eot_id()] if ids else []) + encode(synthetic_document(rng, n_tokens - len(ids) + 8, split))
    return ids[:n_tokens]


# ---- user documents (read by textfiles.py) ---------------------------------------------------------------------


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2 ** 64 < val_fraction


def split_documents(docs: list[str], seed: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, val indices): a deterministic split by document; both non-empty (needs ≥ 2 documents)."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents for a train/validation split, got {len(docs)} (separate "
                         f"documents by two blank lines or <|endoftext|>, or give a .jsonl or a folder)")
    val = [i for i in range(len(docs)) if is_val_document(i, seed, val_fraction)]
    if not val:
        val = [len(docs) - 1]
    if len(val) == len(docs):
        val = val[1:]
    in_val = set(val)
    train = [i for i in range(len(docs)) if i not in in_val]
    return train, val


def pack(token_docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Join documents with EOT between them and cut into rows: (N, T) long (the remainder is dropped)."""
    flat = []
    for d in token_docs:
        flat += d + [eot_id()]
    n = len(flat) // seq_len
    return torch.tensor(flat[:n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)


def rows_digest(*rows: torch.Tensor) -> str:
    """A short SHA-256 of token-row tensors (shapes and values): what a run trained on, compared on resume."""
    h = hashlib.sha256()
    for r in rows:
        h.update(repr(tuple(r.shape)).encode() + r.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def filter_docs(token_docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Documents of at least T tokens, truncated to T: (N, T) long."""
    rows = [d[:seq_len] for d in token_docs if len(d) >= seq_len]
    return torch.tensor(rows, dtype=torch.long).view(len(rows), seq_len)  # (N, T)


class Corpus:
    """A source of (B, T) LongTensor batches; `batch` draws with the caller's torch.Generator."""

    seq_len: int
    digest: str | None = None  # rows_digest of the user's rows; the built-in corpus is generated, so it has none

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def val_batches(self, batch_size: int) -> list[torch.Tensor]:
        raise NotImplementedError


class SyntheticCorpus(Corpus):
    def __init__(self, seq_len: int, seed: int = 0, n_val_docs: int = 32):
        self.seq_len, self.seed, self.n_val_docs = seq_len, seed, n_val_docs

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2 ** 62, (batch_size,), generator=generator).tolist()
        rows = [synthetic_ids(f"train|{self.seed}|{s}", self.seq_len, "train") for s in seeds]
        return torch.tensor(rows, dtype=torch.long)  # (B, T)

    def val_batches(self, batch_size: int) -> list[torch.Tensor]:
        rows = torch.tensor([synthetic_ids(f"val|{self.seed}|{j}", self.seq_len, "val")
                             for j in range(self.n_val_docs)], dtype=torch.long)  # (N, T)
        return list(rows.split(batch_size))


class TokenCorpus(Corpus):
    """User documents, tokenised once; rows from `pack` or `filter_docs`, split by document."""

    def __init__(self, docs: list[str], seq_len: int, seed: int = 0, mode: str = "pack", val_fraction: float = 0.1,
                 name: str = "corpus"):
        if mode not in ("pack", "filter"):
            raise ValueError(f"unknown mode {mode!r}; expected 'pack' or 'filter'")
        self.seq_len, self.name = seq_len, name
        self.train_idx, self.val_idx = split_documents(docs, seed, val_fraction)
        rows_of = pack if mode == "pack" else filter_docs
        self.train_rows = rows_of([encode(docs[i]) for i in self.train_idx], seq_len)  # (N, T)
        self.val_rows = rows_of([encode(docs[i]) for i in self.val_idx], seq_len)  # (M, T)
        if len(self.train_rows) == 0:
            raise ValueError(f"{name}: no training sequence of {seq_len} tokens (mode {mode!r}); corpus too small")
        self.digest = rows_digest(self.train_rows, self.val_rows)

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self.train_rows), (batch_size,), generator=generator)  # (B,)
        return self.train_rows[idx]  # (B, T)

    def val_batches(self, batch_size: int) -> list[torch.Tensor]:
        """[] when no validation document gives a full row (the callers then run without validation)."""
        return list(self.val_rows.split(batch_size)) if len(self.val_rows) else []  # split() of (0, T): [(0, T)]


def make_corpus(data_path: str | None, seq_len: int, seed: int = 0, mode: str = "pack",
                val_fraction: float = 0.1) -> Corpus:
    """The synthetic corpus when data_path is None (mode and val_fraction unused: val is its own split), else the
    user's documents (load_text_documents)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if data_path is None:
        return SyntheticCorpus(seq_len, seed)
    return TokenCorpus(load_text_documents(data_path), seq_len, seed, mode, val_fraction, name=str(data_path))
