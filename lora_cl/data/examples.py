"""One domain of a stream as tokenized train/held-out examples: ``load_domain("debian:kjv", tok)``.

Text domains become non-overlapping blocks of exactly ``seq_len`` tokens (labels = input ids).
Q/A tasks and chats become chat-templated prompt + completion pairs whose prompt tokens carry
label -100, so the loss is the completion's NLL. ``raw_train`` holds the same training examples
untokenized, in the shapes trl's ``SFTTrainer`` tokenizes itself.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from lora_cl.data.resolve import Source, resolve_source
from lora_cl.data.user_data import UserDataError

IGNORE_INDEX = -100


class DomainDataError(ValueError):
    """A domain's data cannot become training examples; the message names the domain and the fix."""


@dataclass
class DomainData:
    """Tokenized train/held-out examples of one domain (see :func:`load_domain`)."""

    name: str
    source: str
    kind: str  # "text" | "qa"
    train: datasets.Dataset  # input_ids, attention_mask, labels (-100 on prompt tokens)
    eval: datasets.Dataset
    eval_prompts: list[dict[str, Any]]  # qa: {"prompt_ids", "answers"}; [] for text
    raw_train: datasets.Dataset  # {"text"} or {"prompt", "completion"} for trl's SFTTrainer
    fingerprint: str  # 16 hex digits of sha256 over the train and held-out token ids


@dataclass
class _Pair:
    """One tokenized Q/A example and its untokenized form for trl."""

    prompt_ids: list[int]
    completion_ids: list[int]
    answers: list[str]
    raw: dict[str, Any]


def load_domain(
    source: str,
    tokenizer: Any,
    *,
    name: str | None = None,
    seq_len: int = 128,
    train_examples: int | None = None,
    eval_examples: int = 16,
    seed: int = 0,
    eval_source: str | None = None,
    train_chars: int | None = None,
    eval_chars: int | None = None,
) -> DomainData:
    """Tokenize ``source`` (``debian:<domain>``, ``qa:<task>`` or a user data path) for training.

    Built-ins use their fixed train/eval slices; user data is held out by ``eval_source`` or, without
    it, by a seeded split (the last max(1, n // 10) of a seeded permutation of records, or of blocks
    for text). ``train_examples`` keeps a seeded choice of that many (None: all); the held-out set is
    a seeded choice of ``eval_examples``. ``train_chars`` / ``eval_chars`` size a built-in text
    domain's slices (None: the defaults); other sources refuse them.
    """
    resolved = resolve_source(source)
    sizes = {k: v for k, v in (("train_chars", train_chars), ("eval_chars", eval_chars)) if v is not None}
    name = name or (Path(resolved.name).stem if resolved.kind == "user" else resolved.name)
    where = f"domain {name!r} ({source})"
    if eval_examples < 1:
        raise DomainDataError(f"{where}: eval_examples must be at least 1, got {eval_examples}")
    if train_examples is not None and train_examples < 1:
        raise DomainDataError(f"{where}: train_examples must be at least 1 or None, got {train_examples}")
    if seq_len < 2:
        raise DomainDataError(f"{where}: seq_len must be at least 2, got {seq_len}")
    if sizes and resolved.kind != "text":
        raise DomainDataError(f"{where}: {', '.join(sizes)} size built-in debian: text slices only; "
                              "drop them for this source")
    kind, train_raw = _load(resolved, where, **sizes)
    eval_raw = None
    if eval_source is not None:
        eval_kind, eval_raw = _load(resolve_source(eval_source), f"{where}, eval_source {eval_source}")
        if eval_kind != kind:
            raise DomainDataError(
                f"{where}: eval_source {eval_source} holds {eval_kind} examples but the domain holds "
                f"{kind} examples; pass an eval file of the same format"
            )
    elif resolved.kind != "user":
        eval_raw = resolved.load("eval", **sizes)
    build = _text_domain if kind == "text" else _qa_domain
    return build(
        name,
        source,
        tokenizer,
        train_raw,
        eval_raw,
        where=where,
        seq_len=seq_len,
        train_examples=train_examples,
        eval_examples=eval_examples,
        seed=seed,
    )


def pad_collate(
    tokenizer: Any, pad_to_multiple_of: int | None = None
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collator right-padding input_ids (pad id), attention_mask (0) and labels (-100)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            fill = width - len(ids)
            mask = [1] * len(ids) if f.get("attention_mask") is None else list(f["attention_mask"])
            labels = ids if f.get("labels") is None else list(f["labels"])
            batch["input_ids"].append(ids + [pad_id] * fill)
            batch["attention_mask"].append(mask + [0] * fill)
            batch["labels"].append(labels + [IGNORE_INDEX] * fill)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    return collate


def _load(source: Source, where: str, **sizes: int) -> tuple[str, Any]:
    """("text" | "qa", the train data: a str, or a list of records) of a resolved source."""
    if source.kind == "text":
        text = source.load("train", **sizes)
        if not text.strip():
            raise _empty(where)
        return "text", text
    if source.kind == "qa":
        records = source.load("train")
        if not records:
            raise _empty(where)
        return "qa", records
    path = Path(source.name).expanduser()
    if path.is_file() and not path.read_bytes().strip():
        raise _empty(where)
    try:
        records = source.load()
    except UserDataError as err:
        raise DomainDataError(f"{where}: {err}") from err
    shapes = {"text" if "text" in r else "qa" for r in records}
    if len(shapes) > 1:
        raise DomainDataError(
            f"{where}: mixes text records with prompt/completion or chat records; use one format per source"
        )
    return shapes.pop(), records


def _empty(where: str) -> DomainDataError:
    return DomainDataError(f"{where} has no examples: add examples to it or drop it from the stream")


def _text_domain(
    name: str,
    source: str,
    tokenizer: Any,
    train_raw: Any,
    eval_raw: Any,
    *,
    where: str,
    seq_len: int,
    train_examples: int | None,
    eval_examples: int,
    seed: int,
) -> DomainData:
    train_blocks = _blocks(_text_ids(tokenizer, train_raw), seq_len, where)
    if eval_raw is None:
        train_blocks, eval_blocks = _split(train_blocks, seed, where, "blocks")
    else:
        eval_blocks = _blocks(_text_ids(tokenizer, eval_raw), seq_len, f"held-out text of {where}")
    train_blocks = _choose(train_blocks, train_examples, f"{seed}:train")
    eval_blocks = _choose(eval_blocks, eval_examples, f"{seed}:eval")
    texts = [tokenizer.decode(b, clean_up_tokenization_spaces=False) for b in train_blocks]
    return _domain(
        name,
        source,
        "text",
        train_blocks,
        eval_blocks,
        [],
        datasets.Dataset.from_dict({"text": texts}),
        [list(b) for b in train_blocks],
        [list(b) for b in eval_blocks],
    )


def _qa_domain(
    name: str,
    source: str,
    tokenizer: Any,
    train_raw: Any,
    eval_raw: Any,
    *,
    where: str,
    seq_len: int,
    train_examples: int | None,
    eval_examples: int,
    seed: int,
) -> DomainData:
    if eval_raw is None:
        train_raw, eval_raw = _split(list(train_raw), seed, where, "examples")
    train_records = _choose(list(train_raw), train_examples, f"{seed}:train")
    eval_records = _choose(list(eval_raw), eval_examples, f"{seed}:eval")
    train = [_encode_pair(tokenizer, r, where) for r in train_records]
    held = [_encode_pair(tokenizer, r, where) for r in eval_records]
    fitted = [_fit(p, seq_len) for p in train]
    fitted_eval = [_fit(p, seq_len) for p in held]
    prompts = [{"prompt_ids": p.prompt_ids[-seq_len:], "answers": p.answers} for p in held]
    raw = datasets.Dataset.from_list([p.raw for p in train])
    return _domain(
        name,
        source,
        "qa",
        [ids for ids, _ in fitted],
        [ids for ids, _ in fitted_eval],
        prompts,
        raw,
        [labels for _, labels in fitted],
        [labels for _, labels in fitted_eval],
    )


def _domain(
    name: str,
    source: str,
    kind: str,
    train_ids: list[list[int]],
    eval_ids: list[list[int]],
    eval_prompts: list[dict[str, Any]],
    raw_train: datasets.Dataset,
    train_labels: list[list[int]],
    eval_labels: list[list[int]],
) -> DomainData:
    digest = hashlib.sha256(
        json.dumps([kind, train_ids, train_labels, eval_ids, eval_labels]).encode()
    ).hexdigest()[:16]
    return DomainData(
        name=name,
        source=source,
        kind=kind,
        train=_dataset(train_ids, train_labels),
        eval=_dataset(eval_ids, eval_labels),
        eval_prompts=eval_prompts,
        raw_train=raw_train,
        fingerprint=digest,
    )


def _dataset(ids: list[list[int]], labels: list[list[int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels}
    )


def _text_ids(tokenizer: Any, raw: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a text, or of user text records joined by eos (no other special tokens)."""
    texts = [raw] if isinstance(raw, str) else [r["text"] for r in raw]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    ids: list[int] = []
    for i, part in enumerate(encoded):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(part)
    return ids


def _blocks(ids: list[int], seq_len: int, where: str) -> list[list[int]]:
    if len(ids) < seq_len:
        raise DomainDataError(
            f"{where} has {len(ids)} tokens, fewer than seq_len={seq_len}: lower data.seq_len or add text"
        )
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def _split(items: list[Any], seed: int, where: str, what: str) -> tuple[list[Any], list[Any]]:
    """(train, held-out): the held-out part is the last max(1, n // 10) of a seeded permutation."""
    if len(items) < 2:
        raise DomainDataError(
            f"{where} has {len(items)} {what}; holding some out for evaluation needs at least 2: "
            "add data or pass eval_source (a separate held-out file)"
        )
    order = list(range(len(items)))
    random.Random(f"{seed}:split").shuffle(order)
    n_eval = max(1, len(items) // 10)
    held = set(order[-n_eval:])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _choose(items: list[Any], k: int | None, seed: str) -> list[Any]:
    """A seeded choice of ``k`` items in their original order (a smaller k picks a subset)."""
    if k is None or k >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:k])]


def _encode_pair(tokenizer: Any, record: Mapping[str, Any], where: str) -> _Pair:
    if "messages" in record:
        messages = list(record["messages"])
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DomainDataError(
                f"{where}: a chat example must end with an assistant turn after at least one other "
                f"turn (it is the completion to learn); got roles {[m['role'] for m in messages]}"
            )
        if not tokenizer.chat_template:
            raise DomainDataError(
                f"{where}: chat examples need a tokenizer with a chat template; "
                "use a chat model or write prompt/completion records"
            )
        prompt, completion = messages[:-1], messages[-1]["content"]
        answers = [completion]
    else:
        prompt, completion = [{"role": "user", "content": record["prompt"]}], record["completion"]
        answers = list(record.get("answers") or [completion])
    if not tokenizer.chat_template:  # a base model: a plain "Question/Answer" frame
        prompt_text = f"Question: {record['prompt']}\nAnswer:"
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        completion_ids = tokenizer(" " + completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        return _Pair(
            prompt_ids, completion_ids, answers, {"prompt": prompt_text, "completion": " " + completion}
        )
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids += _end_of_turn(tokenizer, prompt, completion)
    raw = {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}
    return _Pair(prompt_ids, completion_ids, answers, raw)


def _ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` gives a list or (transformers 5) a BatchEncoding."""
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def _end_of_turn(tokenizer: Any, prompt: Sequence[dict[str, str]], completion: str) -> list[int]:
    """The tokens the chat template puts after an assistant turn (e.g. ``<|im_end|>\\n``), or eos."""
    head = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=False
    )
    if full.startswith(head + completion) and full[len(head) + len(completion) :]:
        return tokenizer(full[len(head) + len(completion) :], add_special_tokens=False)["input_ids"]
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _fit(pair: _Pair, seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of at most ``seq_len`` tokens: the prompt is cut on the left to make room,
    keeping at least min(its length, seq_len // 2) tokens; a longer completion is cut on the right."""
    prompt, completion = pair.prompt_ids, pair.completion_ids
    if len(prompt) + len(completion) > seq_len:
        keep = max(seq_len - len(completion), min(len(prompt), seq_len // 2))
        prompt, completion = prompt[len(prompt) - keep :], completion[: seq_len - keep]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
