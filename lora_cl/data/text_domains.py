"""The 16 real text domains for continual language modelling, built from pinned Debian packages.

``build_text_domain("kjv")`` writes ``cache_dir()/data/text/kjv-<key>/{train.txt,eval.txt,
meta.json}`` once (held-out documents never reach train); later calls read the cache and
never run apt. ``load_text_domain("kjv", "train")`` returns the text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cl.data import code_sources as code
from lora_cl.data import text_sources as prose
from lora_cl.data.debian import fetch_packages, pinned
from lora_cl.data.resolve import check_split, lookup
from lora_cl.data.slices import cached_build, dataset_dir, sha256_text, split_documents

# Changelogs of small, varied packages (the kernel's and dpkg's 0.7-3.7 MB ones would swamp
# the domain).
CHANGELOG_PACKAGES = (
    "apt",
    "bsdgames",
    "coreutils",
    "dict-gcide",
    "gzip",
    "jargon-text",
    "libc6-dev",
    "make",
    "manpages",
    "nano",
    "perl-doc",
    "python3.11-doc",
    "vim-runtime",
)
LICENSE_PACKAGES = (
    "base-files",
    "apt",
    "bash",
    "coreutils",
    "diffutils",
    "findutils",
    "linux-libc-dev",
    "manpages",
    "perl-doc",
    "sed",
    "vim-runtime",
)


@dataclass(frozen=True)
class TextDomain:
    """A domain: the packages it needs and the reader that turns them into documents."""

    name: str
    packages: tuple[str, ...]
    reader: Callable[..., list[str]]
    sampled: bool = False  # reader(pkgs, need, seed) renders only what the slices need

    def documents(self, pkgs: prose.Packages, need: int, seed: int) -> list[str]:
        return self.reader(pkgs, need, seed) if self.sampled else self.reader(pkgs)


_DOMAINS = (
    TextDomain("austen", ("r-cran-janeaustenr",), prose.austen),
    TextDomain("kjv", ("bible-kjv", "bible-kjv-text", "libreadline8"), prose.kjv),
    TextDomain("gcide", ("dict-gcide",), prose.gcide),
    TextDomain("jargon", ("jargon-text",), prose.jargon),
    TextDomain("fortunes_en", ("fortunes",), prose.fortunes_en),
    TextDomain("fortunes_de", ("fortunes-de",), prose.fortunes_de),
    TextDomain("python_docs", ("python3.11-doc",), code.python_docs),
    TextDomain("perl_docs", ("perl-doc",), code.perl_docs),
    TextDomain("vim_help", ("vim-runtime",), code.vim_help),
    TextDomain("vim_script", ("vim-runtime",), code.vim_script),
    TextDomain("man_pages", ("manpages", "manpages-dev"), code.man_pages, sampled=True),
    TextDomain("debian_changelogs", CHANGELOG_PACKAGES, prose.debian_changelogs),
    TextDomain("licenses", LICENSE_PACKAGES, prose.licenses),
    TextDomain("python_code", ("libpython3.11-stdlib",), code.python_code),
    TextDomain("c_headers", ("libc6-dev", "linux-libc-dev"), code.c_headers),
    TextDomain("perl_code", ("perl-modules-5.36",), code.perl_code),
)
#: The 16 text domains of the library (``lora-cl data``, the 16-domain stream).
TEXT_DOMAINS: list[str] = [d.name for d in _DOMAINS]
#: Eight sections of the King James Bible (:data:`~lora_cl.data.text_sources.KJV_SECTIONS`): one
#: source and style, for a stream of highly overlapping domains.
KJV_SECTION_DOMAINS: list[str] = list(prose.KJV_SECTIONS)
DOMAINS: dict[str, TextDomain] = {d.name: d for d in _DOMAINS} | {
    name: TextDomain(name, ("bible-kjv", "bible-kjv-text", "libreadline8"), prose.kjv_section(name))
    for name in KJV_SECTION_DOMAINS
}
DEFAULT_STREAM_8: list[str] = [
    "austen",
    "kjv",
    "gcide",
    "fortunes_de",
    "python_docs",
    "python_code",
    "debian_changelogs",
    "licenses",
]

#: The long stream (time-scale-matched regime of the reproduction): four domains with enough text
#: for hundreds of steps per domain without repeating it much, alternating prose and code so that
#: domain 3 (Bible) follows prose and domain 4 (Python docs) follows code. Its slices are
#: LONG_TRAIN_CHARS / LONG_EVAL_CHARS characters (the default slices are 200,000 / 40,000).
LONG_STREAM_4: list[str] = ["austen", "python_code", "kjv", "python_docs"]
LONG_TRAIN_CHARS = 1_200_000
LONG_EVAL_CHARS = 60_000


def get_domain(name: str) -> TextDomain:
    """The text domain called ``name``; unknown names raise with a did-you-mean suggestion."""
    return lookup("text domain", name, DOMAINS)


def _check_sizes(train_chars: int, eval_chars: int) -> None:
    if train_chars < 1 or eval_chars < 1:
        raise ValueError(f"train_chars and eval_chars must be positive, got {train_chars} and {eval_chars}")


def build_text_domain(
    name: str, *, train_chars: int = 200_000, eval_chars: int = 40_000, seed: int = 0
) -> dict[str, Any]:
    """Build (or find in the cache) the train/held-out slices of one domain; returns meta.json
    (plus ``path``, the folder holding ``train.txt`` and ``eval.txt``)."""
    domain = get_domain(name)
    _check_sizes(train_chars, eval_chars)
    key = {
        "train_chars": train_chars,
        "eval_chars": eval_chars,
        "seed": seed,
        "packages": pinned(domain.packages),
    }
    out = dataset_dir("text", name, key)

    def build(tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        pkgs = fetch_packages(domain.packages)
        need = 2 * (train_chars + eval_chars)
        docs = domain.documents(pkgs, need, seed)
        split = split_documents(
            docs, train_chars=train_chars, eval_chars=eval_chars, seed=seed, where=f"text domain {name!r}"
        )
        for split_name, text in (("train", split.train), ("eval", split.eval)):
            (tmp / f"{split_name}.txt").write_text(text, encoding="utf-8")
        meta: dict[str, Any] = {
            "kind": "text",
            "name": name,
            "seed": seed,
            "requested": {"train_chars": train_chars, "eval_chars": eval_chars},
            "packages": {n: p.record() for n, p in pkgs.items()},
            "documents": split.n_documents,
            "eval_documents": split.n_eval_documents,
            "splits": {
                s: {"file": f"{s}.txt", "chars": len(t), "sha256": sha256_text(t)}
                for s, t in (("train", split.train), ("eval", split.eval))
            },
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        if name == "man_pages":
            meta["renderer"] = code.man_renderer()
        return meta

    return cached_build(out, build)


def load_text_domain(name: str, split: str, **build_kwargs: int) -> str:
    """The ``split`` ("train" or "eval") text of domain ``name`` (built on first use)."""
    check_split(split)
    meta = build_text_domain(name, **build_kwargs)
    return (Path(meta["path"]) / meta["splits"][split]["file"]).read_text(encoding="utf-8")
