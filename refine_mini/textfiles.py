"""The user's own text files -> a list of documents (data.py tokenises, splits and batches them).

Question answered: what may `--data` point at, and where does one document end and the next begin?

- A `.txt` file is split into documents on "<|endoftext|>" and on two or more blank lines (a blank line may hold
  spaces or tabs); each document is stripped of surrounding whitespace.
- A `.jsonl` file holds one JSON object per line with a string "text" field (blank lines are skipped). Lines end at
  "\\n" only: U+2028, U+2029 and U+0085, which `json.dumps(ensure_ascii=False)` writes raw, stay inside the string.
- A folder means every `.txt` and `.jsonl` file below it (recursive, sorted by path), skipping hidden files and
  folders (names starting with "."; e.g. `.ipynb_checkpoints`, which would repeat documents).
Suffixes match in any case (`.TXT`). Files are read as UTF-8, a leading byte-order mark dropped; newlines of any
convention (\\r\\n, \\r) read as "\\n". Empty documents are dropped; an empty corpus is a ValueError, as is any file
that cannot be read or parsed (named by file, and line for .jsonl).
"""
import json
import re
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")
_SEPARATOR = re.compile(r"<\|endoftext\|>|\n(?:[^\S\n]*\n){2,}")  # EOT, or two or more (whitespace-only) blank lines


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # utf-8, minus a leading byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({e.__class__.__name__})") from None


def _read_txt(path: Path) -> list[str]:
    return [d.strip() for d in _SEPARATOR.split(_read(path))]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read(path).split("\n"), 1):  # not splitlines(): it also breaks at U+2028 etc.
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, a 4301-digit int, nesting deeper than the stack
            raise ValueError(f"{path}:{lineno}: bad JSON line ({getattr(e, 'msg', type(e).__name__)})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string \"text\" field")
        docs.append(obj["text"].strip())
    return docs


def _read_file(path: Path) -> list[str]:
    return _read_txt(path) if path.suffix.lower() == ".txt" else _read_jsonl(path)


def _folder_files(folder: Path) -> list[Path]:
    """The .txt and .jsonl files below `folder`, sorted, none inside a hidden file or folder."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_text_documents(path) -> list[str]:
    """Documents from a .txt file, a .jsonl file or a folder of them (module docstring); empty ones dropped."""
    path = Path(path)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise ValueError(f"{path}: folder has no .txt or .jsonl files (hidden ones are skipped)")
        docs = [d for f in files for d in _read_file(f)]
    elif not path.is_file():  # missing, or a FIFO or device (reading it would block, or never end)
        raise ValueError(f"{path}: " + ("not a regular file" if path.exists() else "no such file or folder"))
    elif path.suffix.lower() in SUFFIXES:
        docs = _read_file(path)
    else:
        raise ValueError(f"{path}: expected a .txt file, a .jsonl file or a folder of them")
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{path}: empty corpus (no non-empty documents)")
    return docs
