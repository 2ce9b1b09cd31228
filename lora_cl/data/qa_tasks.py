"""Real question/answer tasks for continual instruction tuning, built from pinned Debian packages.

``build_qa_task("capitals")`` writes ``cache_dir()/data/qa/capitals-<key>/{train.jsonl,
eval.jsonl,meta.json}`` once; each line is ``{"prompt", "completion", "answers"}`` (the
canonical answer and every accepted spelling). Large tasks are sampled (seeded) to at most
2,000 train / 200 held-out pairs unless sizes are given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lora_cl.data import qa_sources as src
from lora_cl.data.debian import fetch_packages, pinned
from lora_cl.data.quiz import ALIASES, QUIZ_CATEGORIES, QuizItem, quiz_items
from lora_cl.data.resolve import check_split, lookup
from lora_cl.data.slices import cached_build, dataset_dir, sha256_text, split_items
from lora_cl.data.text_sources import Packages

DEFAULT_TRAIN, DEFAULT_EVAL = 2000, 200


def _quiz(categories: tuple[str, ...], pkgs: Packages) -> list[QuizItem]:
    folder = pkgs["bsdgames"].root / "usr/share/games/bsdgames/quiz"
    return [item for category in categories for item in quiz_items(folder, category)]


@dataclass(frozen=True)
class QATask:
    """A task: the packages it needs and the reader that turns them into Q/A items."""

    name: str
    packages: tuple[str, ...]
    reader: Callable[[Packages], list[QuizItem]]


_TASKS = [
    QATask("perlfaq", ("perl-doc",), src.perlfaq),
    QATask("python_faq", ("python3.11-doc",), src.python_faq),
    QATask("gcide_defs", ("dict-gcide",), src.gcide_defs),
    QATask("jargon_defs", ("jargon-text",), src.jargon_defs),
    QATask("acronyms", ("bsdgames",), src.acronyms),
    QATask("man_whatis", ("manpages", "manpages-dev"), src.man_whatis),
    *(QATask(alias, ("bsdgames",), partial(_quiz, files)) for alias, files in ALIASES.items()),
    *(QATask(f"quiz:{c}", ("bsdgames",), partial(_quiz, (c,))) for c in QUIZ_CATEGORIES),
]
TASKS: dict[str, QATask] = {t.name: t for t in _TASKS}
QA_TASKS: list[str] = list(TASKS)
DEFAULT_QA_STREAM_8: list[str] = [
    "capitals",
    "latin",
    "elements",
    "acronyms",
    "jargon_defs",
    "gcide_defs",
    "perlfaq",
    "python_faq",
]


def get_task(name: str) -> QATask:
    """The Q/A task called ``name``; unknown names raise with a did-you-mean suggestion."""
    return lookup("Q/A task", name, TASKS)


def _merge(items: list[QuizItem]) -> list[dict[str, Any]]:
    """One record per prompt (first completion canonical, every accepted answer kept)."""
    merged: dict[str, dict[str, Any]] = {}
    for item in items:
        record = merged.setdefault(
            item.prompt, {"prompt": item.prompt, "completion": item.completion, "answers": []}
        )
        for answer in [item.completion, *item.answers]:
            if answer not in record["answers"]:
                record["answers"].append(answer)
    return list(merged.values())


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def build_qa_task(
    name: str, *, n_train: int | None = None, n_eval: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Build (or find in the cache) a task's seeded train/held-out split; returns meta.json
    (plus ``path``). Defaults: held-out ``min(200, 20 %)``, train the rest up to 2,000."""
    task = get_task(name)
    key = {"n_train": n_train, "n_eval": n_eval, "seed": seed, "packages": pinned(task.packages)}
    out = dataset_dir("qa", name, key)

    def build(tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        pkgs = fetch_packages(task.packages)
        records = _merge(task.reader(pkgs))
        train, held_out = split_items(
            records,
            n_train=n_train,
            n_eval=n_eval,
            seed=seed,
            default_train=DEFAULT_TRAIN,
            default_eval=DEFAULT_EVAL,
            where=f"Q/A task {name!r}",
        )
        splits: dict[str, Any] = {}
        for split_name, part in (("train", train), ("eval", held_out)):
            text = _jsonl(part)
            (tmp / f"{split_name}.jsonl").write_text(text, encoding="utf-8")
            splits[split_name] = {
                "file": f"{split_name}.jsonl",
                "examples": len(part),
                "sha256": sha256_text(text),
            }
        return {
            "kind": "qa",
            "name": name,
            "seed": seed,
            "requested": {"n_train": n_train, "n_eval": n_eval},
            "packages": {n: p.record() for n, p in pkgs.items()},
            "available": len(records),
            "splits": splits,
            "build_seconds": round(time.perf_counter() - start, 2),
        }

    return cached_build(out, build)


def load_qa_task(name: str, split: str, **build_kwargs: Any) -> list[dict[str, Any]]:
    """The ``split`` ("train" or "eval") records of task ``name`` (built on first use)."""
    check_split(split)
    meta = build_qa_task(name, **build_kwargs)
    path = Path(meta["path"]) / meta["splits"][split]["file"]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
