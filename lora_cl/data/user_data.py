"""Load the user's own data: a .txt file, a JSONL file, or a ``datasets`` folder.

Every record comes back in one of three shapes: ``{"text"}``, ``{"prompt", "completion"}``
(plus ``"answers"`` when given), or ``{"messages": [{"role", "content"}, ...]}``. Each
malformed input raises a one-line :class:`UserDataError` naming the file, the line, what was
expected and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_cl.data.slices import MAX_CHUNK_CHARS, chunk_text

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
ROLES = ("system", "user", "assistant", "tool")
_EXPECTED = "a JSON object with 'text', 'prompt'+'completion' or 'messages'"


class UserDataError(ValueError):
    """User data that cannot be read as training examples."""


def load_user_data(
    path_or_spec: str | Path, *, max_chunk_chars: int = MAX_CHUNK_CHARS
) -> list[dict[str, Any]]:
    """Examples from a .txt file (blank-line separated chunks of at most ``max_chunk_chars``),
    a .jsonl file, or a folder written by ``datasets.Dataset.save_to_disk``."""
    path = Path(path_or_spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"user data not found: {path}")
    if path.is_dir():
        records = _from_dataset_dir(path)
    elif path.suffix in TEXT_SUFFIXES:
        records = [{"text": c} for c in chunk_text(_read(path), max_chunk_chars)]
    elif path.suffix in JSONL_SUFFIXES:
        records = _from_lines(path, _read(path).splitlines())
    else:
        raise UserDataError(
            f"{path}: unsupported user data format {path.suffix or '(no suffix)'!r}; expected a "
            ".txt or .jsonl file, or a folder written by datasets.Dataset.save_to_disk"
        )
    if not records:
        raise UserDataError(f"{path} has no examples")
    return records


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserDataError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); re-encode it as UTF-8"
        ) from None


def _from_lines(path: Path, lines: Iterable[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    first: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserDataError(
                f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                "write one JSON object per line"
            ) from None
        record, shape = normalize_record(obj, f"{path}:{number}")
        if first is None:
            first = (number, shape)
        elif shape != first[1]:
            raise UserDataError(
                f"{path}:{number}: this line has {shape} but line {first[0]} has {first[1]}; "
                "use one format per file"
            )
        records.append(record)
    return records


def normalize_record(obj: Any, where: str) -> tuple[dict[str, Any], str]:
    """Check one example; return it in canonical shape and the shape's name."""
    if not isinstance(obj, dict):
        raise UserDataError(f"{where}: expected {_EXPECTED}, got {type(obj).__name__}")
    if "messages" in obj:
        return {"messages": _messages(obj["messages"], where)}, "'messages'"
    if "prompt" in obj and "completion" in obj:
        record = {key: _string(obj, key, where) for key in ("prompt", "completion")}
        if "answers" in obj:
            answers = obj["answers"]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise UserDataError(f"{where}: 'answers' must be a list of strings")
            record["answers"] = answers
        return record, "'prompt'+'completion'"
    if "text" in obj:
        return {"text": _string(obj, "text", where)}, "'text'"
    raise UserDataError(f"{where}: expected {_EXPECTED}, got keys {sorted(obj)}")


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise UserDataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            got = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise UserDataError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content', got {got}"
            )
        if message["role"] not in ROLES:
            raise UserDataError(
                f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}; got {message['role']!r}"
            )
        if not isinstance(message["content"], str):
            raise UserDataError(
                f"{where}: messages[{i}].content must be a string, got {type(message['content']).__name__}"
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _from_dataset_dir(path: Path) -> list[dict[str, Any]]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).is_file() for m in markers):
        raise UserDataError(
            f"{path}: a folder must be written by datasets.Dataset.save_to_disk (no "
            "dataset_info.json/state.json found); pass a .txt or .jsonl file instead"
        )
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise UserDataError(
                f"{path}: a DatasetDict without a 'train' split (splits: {sorted(data)}); "
                f"pass one split's folder, e.g. {path / sorted(data)[0]}"
            )
        data = data["train"]
    return [normalize_record(row, f"{path}[row {i}]")[0] for i, row in enumerate(data)]
