"""Seeded, document-disjoint train/held-out slices, and the cache folders they live in.

A data set is built once into ``cache_dir()/data/<kind>/<name>-<key>/`` (an atomic rename:
a folder there is always complete, with its ``meta.json``); ``key`` hashes everything the
content depends on (sizes, seed, pinned package versions, :data:`FORMAT_VERSION`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cl.paths import atomic_dir, cache_dir

FORMAT_VERSION = 1  # bump when a builder's output changes for the same inputs
MAX_CHUNK_CHARS = 2000
_MIN_PARAGRAPH = 30  # shorter paragraphs ("}", "end") may repeat across the split
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def paragraphs(text: str) -> list[str]:
    """``text`` split at blank lines, without leading/trailing blank lines."""
    return [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def chunk_text(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars``, preferring paragraph, then line,
    boundaries."""
    pieces: list[str] = []
    for para in paragraphs(text):
        while len(para) > max_chars:
            cut = para.rfind("\n", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if para:
            pieces.append(para)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _join_to(chunks: Iterable[str], limit: int) -> str:
    """Join ``chunks`` with blank lines, cut to exactly ``limit`` characters when long enough."""
    out: list[str] = []
    used = 0
    for chunk in chunks:
        used += len(chunk) + (2 if out else 0)
        out.append(chunk)
        if used >= limit:
            break
    return "\n\n".join(out)[:limit]


@dataclass(frozen=True)
class TextSplit:
    """A train slice and a held-out slice drawn from disjoint documents."""

    train: str
    eval: str
    n_documents: int
    n_eval_documents: int


def split_documents(
    documents: Sequence[str],
    *,
    train_chars: int,
    eval_chars: int,
    seed: int,
    max_chunk_chars: int = MAX_CHUNK_CHARS,
    where: str = "documents",
) -> TextSplit:
    """Shuffle documents (seeded), hold out whole documents, fill train from the others.

    Held-out documents are taken in shuffled order, each contributing about a quarter of
    ``eval_chars`` at most (so the held-out slice spans several documents), and never reach
    train. Train is the seeded shuffle of the chunks of the remaining documents (taken in
    shuffled order up to a pool of 4x ``train_chars``). Both slices are cut to exactly the
    asked size when the source is large enough (a warning says when it is not). Paragraphs of
    30+ chars are de-duplicated, and a train paragraph equal to a held-out one is dropped, so
    shared boilerplate (license headers) cannot leak across the split.
    """
    unique = list(dict.fromkeys(d.strip("\n") for d in documents if d.strip()))
    if not unique:
        raise ValueError(f"{where} has no examples")
    rng = random.Random(seed)
    order = list(range(len(unique)))
    rng.shuffle(order)
    cap = max(1, eval_chars // 4)
    seen: set[str] = set()
    eval_chunks: list[str] = []
    eval_used, n_eval_docs, i = 0, 0, 0
    while eval_used < eval_chars and i < len(order) - 1:  # leave at least one for train
        doc, taken = _fresh(unique[order[i]], seen), 0
        i += 1
        for chunk in chunk_text(doc, max_chunk_chars):
            if taken >= cap or eval_used >= eval_chars:
                break
            eval_chunks.append(chunk)
            taken += len(chunk) + 2
            eval_used += len(chunk) + 2
        n_eval_docs += 1 if taken else 0
    train_chunks: list[str] = []
    pool = 0
    for index in order[i:]:  # a pool of 4x the train size keeps huge sources cheap
        if pool >= 4 * train_chars:
            break
        chunks = chunk_text(_fresh(unique[index], seen), max_chunk_chars)
        train_chunks.extend(chunks)
        pool += sum(len(c) for c in chunks)
    rng.shuffle(train_chunks)
    split = TextSplit(
        _join_to(train_chunks, train_chars),
        _join_to(eval_chunks, eval_chars),
        len(unique),
        n_eval_docs,
    )
    if len(split.train) < train_chars or len(split.eval) < eval_chars:
        warnings.warn(
            f"{where}: only {len(split.train):,} train / {len(split.eval):,} held-out chars "
            f"available (asked for {train_chars:,} / {eval_chars:,})",
            stacklevel=2,
        )
    return split


def _fresh(document: str, seen: set[str]) -> str:
    """``document`` without paragraphs already used elsewhere (registers the new ones)."""
    kept: list[str] = []
    for para in paragraphs(document):
        key = para.strip()
        if len(key) >= _MIN_PARAGRAPH:
            if key in seen:
                continue
            seen.add(key)
        kept.append(para)
    return "\n\n".join(kept)


def split_items(
    items: Sequence[Any],
    *,
    n_train: int | None,
    n_eval: int | None,
    seed: int,
    default_train: int,
    default_eval: int,
    where: str,
) -> tuple[list[Any], list[Any]]:
    """Seeded train/held-out split of ``items``; defaults cap large sets.

    Default held-out size: ``min(default_eval, 20 %)``; default train: the rest, at most
    ``default_train``. Explicit sizes that the items cannot fill raise ``ValueError``.
    """
    if not items:
        raise ValueError(f"{where} has no examples")
    n = len(items)
    n_eval = min(default_eval, max(1, n // 5)) if n_eval is None else n_eval
    n_train = min(default_train, n - n_eval) if n_train is None else n_train
    if n_eval < 0 or n_train < 0 or n_train + n_eval > n:
        raise ValueError(f"{where}: asked for {n_train} train + {n_eval} held-out examples, but it has {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [items[k] for k in order[n_eval : n_eval + n_train]], [items[k] for k in order[:n_eval]]


def dataset_dir(kind: str, name: str, key: dict[str, Any]) -> Path:
    """``cache_dir()/data/<kind>/<name>-<hash of key>``."""
    blob = json.dumps({"format": FORMAT_VERSION, "name": name, **key}, sort_keys=True)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / "data" / kind / f"{name.replace(':', '_')}-{digest}"


def cached_build(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Return ``out/meta.json`` if present, else run ``build(tmp_dir)`` (which writes the
    data files and returns the meta) and rename the folder into place."""
    meta_file = out / "meta.json"
    if not meta_file.is_file():
        with atomic_dir(out) as tmp:
            meta = build(tmp)
            (tmp / "meta.json").write_text(
                json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta["path"] = str(out)
    return meta
