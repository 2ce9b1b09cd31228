"""User data: every accepted format, and a one-line, fixable error for each malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cl.data import UserDataError, load_user_data


def _jsonl(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_file_is_split_into_bounded_chunks_at_blank_lines(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 30 for i in range(40)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    records = load_user_data(path, max_chunk_chars=500)
    assert all(set(r) == {"text"} and len(r["text"]) <= 500 for r in records)
    assert len(records) > 10
    joined = "\n\n".join(r["text"] for r in records)
    assert joined == "\n\n".join(paragraphs)  # nothing lost, nothing reordered


def test_jsonl_text_prompt_completion_and_messages(tmp_path: Path) -> None:
    text = _jsonl(tmp_path / "t.jsonl", {"text": "a"}, "", {"text": "b", "id": 7})
    assert load_user_data(text) == [{"text": "a"}, {"text": "b"}]
    qa = _jsonl(tmp_path / "qa.jsonl", {"prompt": "2+2?", "completion": "4", "answers": ["4"]})
    assert load_user_data(qa) == [{"prompt": "2+2?", "completion": "4", "answers": ["4"]}]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert load_user_data(_jsonl(tmp_path / "c.jsonl", {"messages": chat})) == [{"messages": chat}]


def test_dataset_folder_from_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}]).save_to_disk(str(folder))
    assert load_user_data(folder) == [{"prompt": "p", "completion": "c"}]
    bad = tmp_path / "bad_ds"
    datasets.Dataset.from_list([{"txt": "x"}]).save_to_disk(str(bad))
    with pytest.raises(UserDataError, match=r"\[row 0\]: expected .* got keys \['txt'\]"):
        load_user_data(bad)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"txt": "x"},
            r"x\.jsonl:2: expected a JSON object with 'text', 'prompt'\+'completion' "
            r"or 'messages', got keys \['txt'\]",
        ),
        ({"prompt": "only"}, r"x\.jsonl:2: expected .* got keys \['prompt'\]"),
        ('{"text": "unterminated', r"x\.jsonl:2: invalid JSON \(.*\); write one JSON object"),
        ("[1, 2]", r"x\.jsonl:2: expected a JSON object .* got list"),
        ({"text": 3}, r"x\.jsonl:2: 'text' must be a string, got int"),
        ({"messages": []}, r"x\.jsonl:2: 'messages' must be a non-empty list"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            r"x\.jsonl:2: messages\[0\]\.role must be one of system, user, assistant, tool; "
            r"got 'bot'",
        ),
        (
            {"messages": [{"role": "user"}]},
            r"x\.jsonl:2: messages\[0\] must be an object with 'role' and 'content', got \['role'\]",
        ),
        (
            {"prompt": "p", "completion": "c"},
            r"x\.jsonl:2: this line has 'prompt'\+'completion' but line 1 has 'text'; "
            r"use one format per file",
        ),
    ],
)
def test_malformed_jsonl_names_file_line_expectation_and_fix(
    tmp_path: Path, line: object, message: str
) -> None:
    path = _jsonl(tmp_path / "x.jsonl", {"text": "fine"}, line)
    with pytest.raises(UserDataError, match=message) as err:
        load_user_data(path)
    assert "\n" not in str(err.value)


def test_missing_empty_unsupported_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_user_data(tmp_path / "nope.jsonl")
    for name in ("empty.jsonl", "empty.txt"):
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(ValueError, match=f"{name} has no examples"):
            load_user_data(tmp_path / name)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserDataError, match=r"x\.csv: unsupported .* expected a \.txt or \.jsonl"):
        load_user_data(tmp_path / "x.csv")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserDataError, match="not UTF-8 .* re-encode it as UTF-8"):
        load_user_data(tmp_path / "latin1.txt")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(UserDataError, match="save_to_disk"):
        load_user_data(tmp_path / "plain_dir")
