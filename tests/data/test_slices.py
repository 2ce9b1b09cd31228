"""Seeded, document-disjoint slices on synthetic documents (no apt)."""

from __future__ import annotations

import random

import pytest

from lora_cl.data.slices import chunk_text, paragraphs, split_documents, split_items


def _documents(n: int = 300, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [
        "\n\n".join(
            f"doc{d} para{p}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
            for p in range(rng.randint(1, 12))
        )
        for d in range(n)
    ]


def _doc_ids(text: str) -> set[str]:
    return {p.split(" ", 1)[0] for p in paragraphs(text)}


def test_split_is_exact_sized_seeded_and_document_disjoint() -> None:
    docs = _documents()
    a = split_documents(docs, train_chars=20_000, eval_chars=5_000, seed=0)
    b = split_documents(docs, train_chars=20_000, eval_chars=5_000, seed=0)
    c = split_documents(docs, train_chars=20_000, eval_chars=5_000, seed=1)
    assert (len(a.train), len(a.eval)) == (20_000, 5_000)
    assert (a.train, a.eval) == (b.train, b.eval)
    assert a.eval != c.eval
    train_ids, eval_ids = _doc_ids(a.train), _doc_ids(a.eval)
    assert not train_ids & eval_ids
    assert a.n_eval_documents >= 4  # each held-out document gives at most a quarter
    assert len(eval_ids) == a.n_eval_documents


def test_shared_paragraphs_never_cross_the_split() -> None:
    header = "Copyright (C) The Authors. Licensed under the same terms as the rest."
    docs = [f"{header}\n\nbody of document {i} " + "x " * 200 for i in range(200)]
    split = split_documents(docs, train_chars=8_000, eval_chars=2_000, seed=3)
    assert header in split.eval
    assert header not in split.train


def test_duplicates_are_dropped_and_too_little_data_warns() -> None:
    docs = ["same document " * 10] * 50 + ["other document " * 10]
    with pytest.warns(UserWarning, match="only .* available"):
        split = split_documents(docs, train_chars=10_000, eval_chars=100, seed=0)
    assert split.n_documents == 2
    with pytest.raises(ValueError, match="empty has no examples"):
        split_documents(["", "\n"], train_chars=1, eval_chars=1, seed=0, where="empty")


def test_chunks_are_bounded_and_keep_all_text() -> None:
    text = "\n\n".join(["short"] * 5 + ["line\n" * 300] + ["x" * 5000])
    chunks = chunk_text(text, max_chars=1000)
    assert all(0 < len(c) <= 1000 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


def test_split_items_defaults_cap_and_errors() -> None:
    items = list(range(10_000))
    train, held_out = split_items(
        items, n_train=None, n_eval=None, seed=0, default_train=2000, default_eval=200, where="t"
    )
    assert (len(train), len(held_out)) == (2000, 200)
    assert not set(train) & set(held_out)
    again = split_items(
        items, n_train=None, n_eval=None, seed=0, default_train=2000, default_eval=200, where="t"
    )
    assert again == (train, held_out)
    small_train, small_eval = split_items(
        list(range(50)),
        n_train=None,
        n_eval=None,
        seed=0,
        default_train=2000,
        default_eval=200,
        where="t",
    )
    assert (len(small_train), len(small_eval)) == (40, 10)
    with pytest.raises(ValueError, match="task x: asked for 45 train \\+ 10 held-out .* has 50"):
        split_items(
            list(range(50)), n_train=45, n_eval=10, seed=0, default_train=1, default_eval=1, where="task x"
        )
