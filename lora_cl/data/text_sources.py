"""Readers that turn unpacked Debian packages into documents (prose domains).

Each reader takes ``{package name: Package}`` and returns documents (one per chapter, entry,
fortune, license...), which :func:`lora_cl.data.slices.split_documents` splits into train and
held-out slices. The code domains live in :mod:`lora_cl.data.code_sources`.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_cl.data.debian import Package
from lora_cl.data.rdata import read_lazyload_db

Packages = dict[str, Package]
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def read_text(path: Path) -> str:
    """A text file (gzip'd when it ends in ``.gz``/``.dz``), UTF-8 with replacement."""
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def walk_files(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under ``root`` ending in ``suffixes``, sorted, not following symlinks."""
    if not root.is_dir():
        raise FileNotFoundError(f"expected directory {root} in the unpacked package")
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        for name in files:
            path = Path(folder) / name
            if name.endswith(suffixes) and not path.is_symlink() and path.is_file():
                found.append(path)
    return sorted(found)


def austen(pkgs: Packages) -> list[str]:
    """Jane Austen's six novels (janeaustenr's R lazy-load DB), one document per chapter."""
    base = pkgs["r-cran-janeaustenr"].root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    heading = re.compile(r"^(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")
    docs: list[str] = []
    for name, lines in read_lazyload_db(base).items():
        if not isinstance(lines, list):
            raise ValueError(f"{base}: variable {name!r} is not a character vector")
        current: list[str] = []
        for line in lines:
            if heading.match(line or "") and current:
                docs.append("\n".join(current).strip())
                current = []
            current.append(line or "")
        docs.append("\n".join(current).strip())
    return docs


def kjv(pkgs: Packages) -> list[str]:
    """The King James Bible via the packaged ``bible`` binary, one document per chapter."""
    return [text for _, text in kjv_chapters(pkgs)]


#: Contiguous runs of books of the King James Bible (first and last book as the ``bible`` binary
#: abbreviates them), each over 240,000 characters: eight domains of one source, one translation
#: and one style, for a stream whose domains share most of their vocabulary (the reproduction's
#: high-overlap stream).
KJV_SECTIONS: dict[str, tuple[str, str]] = {
    "kjv_genesis_exodus": ("Ge", "Exo"),
    "kjv_leviticus_deuteronomy": ("Lev", "Deu"),
    "kjv_joshua_2samuel": ("Josh", "2Sm"),
    "kjv_kings_esther": ("1Ki", "Est"),
    "kjv_job_song": ("Job", "SSol"),
    "kjv_prophets": ("Isa", "Mal"),
    "kjv_gospels_acts": ("Mat", "Acts"),
    "kjv_epistles_revelation": ("Rom", "Rev"),
}


def kjv_section(name: str) -> Callable[[Packages], list[str]]:
    """A reader of the chapters of :data:`KJV_SECTIONS` ``[name]``, from its first book to its last."""
    first, last = KJV_SECTIONS[name]

    def read(pkgs: Packages) -> list[str]:
        chapters = kjv_chapters(pkgs)
        books = list(dict.fromkeys(book for book, _ in chapters))
        if first not in books or last not in books:
            raise RuntimeError(f"kjv_section {name!r}: books {first!r}..{last!r} not in the bible's output "
                               f"(books seen: {books[:5]}...)")
        keep = set(books[books.index(first): books.index(last) + 1])
        return [text for book, text in chapters if book in keep]

    read.__name__ = f"kjv_section_{name}"
    return read


def kjv_chapters(pkgs: Packages) -> list[tuple[str, str]]:
    """(book, chapter text) for every chapter of the King James Bible, in order."""
    binary = pkgs["bible-kjv"].root / "usr/bin/bible"
    data_dir = pkgs["bible-kjv-text"].root / "usr/lib"
    # libreadline8 is unpacked beside it, so the binary runs where it is not installed.
    lib_dirs = sorted({str(p.parent) for p in pkgs["libreadline8"].root.rglob("libreadline.so*")})
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join([*lib_dirs, os.environ.get("LD_LIBRARY_PATH", "")]).strip(
            os.pathsep
        ),
    }
    result = subprocess.run(
        [str(binary), "-f", "-p", str(data_dir), "Gen1:1-Rev22:21"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"{binary} failed ({result.returncode}): {result.stderr.strip()}")
    verse = re.compile(r"^(\d?[A-Za-z]+)(\d+):\d+ (.*)$")
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in result.stdout.splitlines():
        match = verse.match(line)
        if match:
            chapters.setdefault((match.group(1), match.group(2)), []).append(match.group(3))
        elif line.strip() and chapters:
            next(reversed(chapters.values())).append(line.strip())
    return [(book, "\n".join(lines)) for (book, _), lines in chapters.items()]


def _b64(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def gcide_entries(pkgs: Packages) -> list[tuple[str, str]]:
    """(headword, entry text) of GCIDE (dictd format: .index offsets into the .dict.dz)."""
    folder = pkgs["dict-gcide"].root / "usr/share/dictd"
    data = gzip.decompress((folder / "gcide.dict.dz").read_bytes())
    spans: dict[tuple[int, int], str] = {}
    for line in (folder / "gcide.index").read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00-"):
            spans.setdefault((_b64(offset), _b64(length)), word)
    return [
        (word, data[o : o + n].decode("utf-8", errors="replace").strip())
        for (o, n), word in sorted(spans.items())
    ]


def gcide(pkgs: Packages) -> list[str]:
    """Webster 1913 / GCIDE dictionary entries."""
    return [text for _, text in gcide_entries(pkgs)]


def jargon_entries(pkgs: Packages) -> list[tuple[str, str, str]]:
    """(term, header line, body) of each ``:term:`` entry of the Jargon File 4.4.7."""
    text = read_text(pkgs["jargon-text"].root / "usr/share/doc/jargon-text/jargon.txt.gz")
    start = re.compile(r"^   :([^:]+):(.*)$")
    stop = re.compile(r"^ {2}[A-Z]\s*$|^\s+Part [IVX]+\. ")  # letter index or appendices
    entries: list[tuple[str, str, str]] = []
    current: tuple[str, str] | None = None
    body: list[str] = []
    for line in text.splitlines() + ["  Z"]:
        match = start.match(line)
        if (match or stop.match(line)) and current:
            entries.append((*current, _dedent("\n".join(body))))
            current = None
        if match:
            current, body = (match.group(1), match.group(2).strip()), []
        elif current:
            body.append(line)
    return entries


def _dedent(text: str) -> str:
    return "\n".join(
        line[3:] if line.startswith("   ") else line.strip() for line in text.strip("\n").splitlines()
    ).strip()


def jargon(pkgs: Packages) -> list[str]:
    """Jargon File lexicon entries."""
    return [f":{term}: {header}\n\n{body}".strip() for term, header, body in jargon_entries(pkgs)]


def _fortunes(folder: Path) -> list[str]:
    items: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        items.extend(f.strip("\n") for f in re.split(r"^%\n", read_text(path), flags=re.M))
    return items


def fortunes_en(pkgs: Packages) -> list[str]:
    """English fortune cookies (``fortunes``), one document per fortune."""
    return _fortunes(pkgs["fortunes"].root / "usr/share/games/fortunes")


def fortunes_de(pkgs: Packages) -> list[str]:
    """German fortune cookies (``fortunes-de``), one document per fortune."""
    return _fortunes(pkgs["fortunes-de"].root / "usr/share/games/fortunes/de")


_ENTRY_START = re.compile(r"^\S+ \([^)]+\) [^;]+; .*urgency=", re.M)


def changelog_entries(text: str) -> list[str]:
    """The version entries of a Debian changelog."""
    starts = [m.start() for m in _ENTRY_START.finditer(text)]
    return [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def debian_changelogs(pkgs: Packages) -> list[str]:
    """Entries of the packages' Debian changelogs (``changelog.gz`` for native packages)."""
    docs: list[str] = []
    for name, pkg in pkgs.items():
        folder = pkg.root / "usr/share/doc" / name
        for candidate in ("changelog.Debian.gz", "changelog.gz"):
            path = folder / candidate
            if path.is_file() and not path.is_symlink():
                entries = changelog_entries(read_text(path))
                if entries:
                    docs.extend(entries)
                    break
        else:
            raise FileNotFoundError(f"{folder}: no Debian changelog in package {name}")
    return docs


def dep5_licenses(text: str) -> Iterator[str]:
    """License texts of the stand-alone ``License:`` stanzas of a DEP-5 copyright file."""
    if not text.startswith("Format:"):
        return
    for stanza in re.split(r"\n\s*\n", text):
        match = re.search(r"^License:[^\n]*\n((?:[ \t][^\n]*\n?)+)", stanza, re.M)
        if match:
            lines = [line[1:] for line in match.group(1).splitlines()]
            body = "\n".join("" if line.strip() == "." else line for line in lines).strip()
            if len(body) >= 200:
                yield body


def licenses(pkgs: Packages) -> list[str]:
    """``/usr/share/common-licenses`` plus the DEP-5 license stanzas of the packages."""
    folder = pkgs["base-files"].root / "usr/share/common-licenses"
    docs = [read_text(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()]
    for name, pkg in pkgs.items():
        copyright_file = pkg.root / "usr/share/doc" / name / "copyright"
        if copyright_file.is_file() and not copyright_file.is_symlink():
            docs.extend(dep5_licenses(read_text(copyright_file)))
    return docs
