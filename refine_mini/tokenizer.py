"""Tokenizer: a small GPT-2 byte-pair encoding, built offline with tiktoken.

Question answered: how do we turn text into token ids without touching the network?

We ship the first 8192 ranks of the GPT-2 BPE (`assets/gpt2_8192.tiktoken`, see `assets/README.md` for where it
came from and its licence). GPT-2 ranks are listed in merge order, so the first N ranks form a valid, smaller BPE:
any merge it needs was learnt earlier and is therefore present. Text still round-trips exactly, because the 256
single-byte tokens are among the first ranks. `<|endoftext|>` gets the next id, 8192, so the vocabulary is 8193.

Deviation from the paper: the paper's models use 32000-token SentencePiece vocabularies; a tiny model trained on
CPU for minutes does better with a smaller vocabulary, and GPT-2's is the one we can ship.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken
import torch

RANK_FILE = Path(__file__).parent / "assets" / "gpt2_8192.tiktoken"
RANK_FILE_SHA256 = "a4bb5b7e2423eb7ae1348d7a8a1d0782035fd703205445b87bd63b891b1da5a2"
N_RANKS = 8192
EOT = "<|endoftext|>"
# r50k/GPT-2 pre-tokenisation pattern: contractions, letters, digits, other symbols, whitespace.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path: Path = RANK_FILE) -> dict[bytes, int]:
    """Read a tiktoken rank file ("<base64 token> <rank>" per line) into {token bytes: rank}."""
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != RANK_FILE_SHA256 and path == RANK_FILE:
        raise RuntimeError(f"tokenizer rank file {path} is corrupted (sha256 mismatch); reinstall refine_mini")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The project's tokenizer (cached: building the BPE tables takes ~50 ms)."""
    ranks = load_ranks()
    assert len(ranks) == N_RANKS and max(ranks.values()) == N_RANKS - 1
    return tiktoken.Encoding(
        name="gpt2_8192",
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: N_RANKS},
    )


def vocab_size() -> int:
    return N_RANKS + 1  # 8192 BPE ranks + <|endoftext|>


def eot_id() -> int:
    return N_RANKS


def encode(text: str) -> list[int]:
    """Text -> ids. Special-token text in user data is encoded as plain text, never as a control token."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    """Ids -> text. Invalid UTF-8 byte sequences (a rollout cut mid-character) become U+FFFD. An id outside
    [0, vocab_size()) is a ValueError (tiktoken raises KeyError or OverflowError)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size()]
    if bad:
        raise ValueError(f"token ids must be in [0, {vocab_size()}), got {bad[:5]}")
    return get_tokenizer().decode(ids, errors="replace")


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless `ids` (any shape) are int64/int32 token ids in [0, vocab_size): bool ids would make bool NTP
    targets, and an id past the embedding fails inside it (on CUDA: a device-side assert that ends the process).
    One host sync (aminmax); an empty tensor passes (the caller's shape check names that)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32 ids, got {ids.dtype}")
    if ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(ids))
        if not 0 <= lo <= hi < vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got ids in [{lo}, {hi}]")
