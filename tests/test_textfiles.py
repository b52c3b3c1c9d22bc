"""User text files -> documents (textfiles.py): separators, .jsonl lines, folders, encodings, and the errors."""
import json

import pytest

from refine_mini.data import TokenCorpus
from refine_mini.textfiles import load_text_documents


def test_load_txt_file_splits_on_separators(tmp_path):
    """A .txt file splits on <|endoftext|> and on two or more blank lines; empty pieces are dropped."""
    p = tmp_path / "c.txt"
    p.write_text("one\n\ntwo still one<|endoftext|>three\n\n\n\nfour\n\n\n")
    assert load_text_documents(p) == ["one\n\ntwo still one", "three", "four"]


def test_load_folder_recursive_sorted(tmp_path):
    """A folder means every .txt and .jsonl file under it (any case of the suffix), sorted by path; other files and
    hidden ones (a name starting with ".", e.g. .ipynb_checkpoints copies) are ignored."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.JSONL").write_text(json.dumps({"text": "third"}) + "\n")
    (tmp_path / "d.TXT").write_text("fourth")
    (tmp_path / "z.md").write_text("ignored")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("a copy")
    (tmp_path / "b" / ".hidden.txt").write_text("hidden")
    assert load_text_documents(tmp_path) == ["first", "second", "third", "fourth"]


def test_load_jsonl(tmp_path):
    """A .jsonl file gives one document per line's "text" field; blank lines are skipped."""
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world", "id": 2}) + "\n")
    assert load_text_documents(p) == ["hello", "world"]


def test_bad_corpora_raise_value_errors(tmp_path):
    """Empty corpus, missing path, bad JSON, missing "text", wrong suffix and non-UTF-8 name the file (and line)."""
    (tmp_path / "empty.txt").write_text("\n\n\n  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "ok"}\n{"body": "x"}\n')
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "c.csv").write_text("a,b")
    (tmp_path / "nothing").mkdir()
    cases = {"empty.txt": "empty corpus", "bad.jsonl": "bad.jsonl:2: bad JSON", "notext.jsonl": "notext.jsonl:2:.*text",
             "bin.txt": "UTF-8", "c.csv": "expected", "missing.txt": "no such file",
             "nothing": "no .txt or .jsonl files"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_text_documents(tmp_path / name)


def test_blank_lines_holding_spaces_separate_documents(tmp_path):
    """A blank line may hold spaces or tabs (an editor's indentation): two of them still end a document, one does
    not."""
    p = tmp_path / "c.txt"
    p.write_text("a\n \n\t\nb\n  \nstill b\n\n \n\nc")
    assert load_text_documents(p) == ["a", "b\n  \nstill b", "c"]


def test_byte_order_marks_are_dropped(tmp_path):
    """A UTF-8 byte-order mark (Windows editors write one) is not text: not the first document's first token in a
    .txt file, not a JSON error in a .jsonl file."""
    (tmp_path / "c.txt").write_bytes("\ufeffhello<|endoftext|>world".encode())
    (tmp_path / "c.jsonl").write_bytes(("\ufeff" + json.dumps({"text": "hello"}) + "\n").encode())
    assert load_text_documents(tmp_path / "c.txt") == ["hello", "world"]
    assert load_text_documents(tmp_path / "c.jsonl") == ["hello"]


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw; str.splitlines() would break the line
    there and the JSON inside it. They stay in the text, and later lines keep their numbers in errors."""
    p = tmp_path / "c.jsonl"
    texts = ["one\u2028two", "three\u2029four", "five\x85six"]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    p.write_text("\n".join(lines) + "\n{bad\n", encoding="utf-8")
    with pytest.raises(ValueError, match="c.jsonl:4: bad JSON"):
        load_text_documents(p)
    p.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    assert load_text_documents(p) == texts


def test_a_validation_split_without_a_full_row_gives_no_batches():
    """Validation documents too short for one row: val_batches is [] (the trainers then run without validation),
    not a list holding one (0, T) batch that a validation pass would divide by."""
    docs = ["word " * 400] + [f"t{i}" for i in range(30)]
    corpus = TokenCorpus(docs, 64, seed=0, mode="pack")
    assert len(corpus.val_rows) == 0 and corpus.val_batches(4) == []
    assert len(corpus.train_rows) > 0
