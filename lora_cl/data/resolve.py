"""``resolve_source("debian:kjv" | "qa:capitals" | "path/to/data.jsonl")``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown domain or task name; the message suggests the closest known names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def unknown_name_error(what: str, name: str, known: Sequence[str]) -> UnknownNameError:
    """The error for an unknown ``name`` among ``known``, with a did-you-mean suggestion."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {what} {name!r}.{hint} Known: {', '.join(known)}")


def lookup(what: str, name: str, registry: Mapping[str, T]) -> T:
    """``registry[name]``; an unknown name raises :class:`UnknownNameError`."""
    if name not in registry:
        raise unknown_name_error(what, name, list(registry))
    return registry[name]


def check_split(split: str) -> None:
    """Data sets have a "train" and an "eval" (held-out) split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


@dataclass(frozen=True)
class Source:
    """A resolved data source: a Debian text domain, a Q/A task, or user data."""

    kind: Literal["text", "qa", "user"]
    name: str

    def load(self, split: str = "train", **kwargs: Any) -> Any:
        """Text (``str``) for a text domain, ``list[dict]`` for Q/A tasks and user data."""
        if self.kind == "text":
            from lora_cl.data.text_domains import load_text_domain

            return load_text_domain(self.name, split, **kwargs)
        if self.kind == "qa":
            from lora_cl.data.qa_tasks import load_qa_task

            return load_qa_task(self.name, split, **kwargs)
        from lora_cl.data.user_data import load_user_data

        return load_user_data(self.name)


def resolve_source(spec: str) -> Source:
    """``debian:<domain>`` -> text domain, ``qa:<task>`` -> Q/A task, else a user data path.

    Unknown domain or task names raise ``KeyError`` with a did-you-mean suggestion; a path is
    only checked when loaded.
    """
    from lora_cl.data.qa_tasks import get_task
    from lora_cl.data.text_domains import get_domain

    prefix, _, name = spec.partition(":")
    if prefix == "debian" and name:
        return Source("text", get_domain(name).name)
    if prefix == "qa" and name:
        return Source("qa", get_task(name).name)
    return Source("user", spec)
