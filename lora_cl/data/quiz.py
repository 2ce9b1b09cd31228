"""The bsdgames ``quiz`` data: its ``{optional}``/``a|b``/``[group]`` markup and its categories.

``index`` names each data file's fields (``africa:Africa{n}:cap{ital}``); data lines hold one
record, fields separated by ``:``, a trailing backslash continues a line. The canonical answer
of a field is its first alternative with optional parts kept (``{G{eorge} }Washington`` ->
``George Washington``); every spelling the markup accepts is kept as ``answers``. Accents,
written as backspace overstrikes (``Yaound['<BS>e|e<BS>'|e]``), become accented letters.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

MAX_ANSWERS = 32
_ACCENTS = {
    "'": "\u0301",
    "`": "\u0300",
    "^": "\u0302",
    "~": "\u0303",
    ",": "\u0327",
    '"': "\u0308",
    "\u00b0": "\u030a",
}
_OVERSTRIKE = re.compile("(.)\x08(.)")

# quiz category (data file) -> questions: (question field, answer field, template)
TEMPLATES: dict[str, list[tuple[int, int, str]]] = {
    "africa": [(0, 1, "What is the capital of {q}?")],
    "america": [(0, 1, "What is the capital of {q}?")],
    "asia": [(0, 1, "What is the capital of {q}?")],
    "europe": [(0, 1, "What is the capital of {q}?")],
    "areas": [(0, 1, "Which US state or region has the telephone area code {q}?")],
    "arith": [(0, 1, "What number replaces the dots in {q}?")],
    "babies": [(0, 1, "A young {q} grows up into which animal?")],
    "bard": [
        (0, 1, 'In Shakespeare, which line follows "{q}"?'),
        (0, 2, 'Which Shakespeare play contains the line "{q}"?'),
    ],
    "chinese": [(0, 1, "In the Chinese zodiac, which year follows the year of the {q}?")],
    "collectives": [(0, 1, "What is the collective noun for a group of {q}?")],
    "ed": [(0, 1, "Which ed command will {q}?")],
    "elements": [(3, 0, "What is the chemical symbol of {q}?"), (3, 1, "What is the atomic number of {q}?")],
    "flowers": [(0, 1, "In the language of flowers, what does the {q} mean?")],
    "greek": [(0, 1, 'What does the Greek verb form "{q}" mean in English?')],
    "inca": [(0, 1, "Who succeeded the Inca ruler {q}?")],
    "latin": [(0, 1, 'What does the Latin word "{q}" mean in English?')],
    "locomotive": [(0, 1, "What is the name of the {q} locomotive wheel arrangement?")],
    "midearth": [(0, 1, "In Tolkien's Middle-earth, what is the capital of {q}?")],
    "morse": [(0, 1, "What is the Morse code for {q}?")],
    "mult": [(0, 1, "What is {q}?")],
    "murders": [(0, 1, "Who or what killed {q}?")],
    "poetry": [(0, 1, 'Which line of poetry follows "{q}"?'), (0, 3, 'Who wrote the line "{q}"?')],
    "posneg": [(0, 1, 'What is the opposite of "{q}"?')],
    "pres": [
        (0, 1, "In which years was {q} President of the United States?"),
        (0, 3, "Who succeeded {q} as President of the United States?"),
    ],
    "province": [(0, 1, "What is the capital of the Canadian province of {q}?")],
    "seq-easy": [(0, 1, "What number comes next in the sequence {q}?")],
    "seq-hard": [(0, 1, "What number comes next in the sequence {q}?")],
    "sexes": [(0, 1, "What is the female counterpart of {q}?")],
    "sov": [
        (0, 2, "Who succeeded {q} on the English throne?"),
        (0, 1, "In which century did {q} come to the English throne?"),
    ],
    "state": [
        (0, 1, "What is the capital of the US state of {q}?"),
        (0, 3, "What is the state flower of {q}?"),
    ],
    "trek": [(0, 1, "In the original Star Trek, what is the {q}?")],
    "ucc": [(0, 1, "What does section {q} of the Uniform Commercial Code cover?")],
}
QUIZ_CATEGORIES: list[str] = list(TEMPLATES)
ALIASES: dict[str, tuple[str, ...]] = {
    "capitals": ("africa", "america", "asia", "europe"),
    "latin": ("latin",),
    "elements": ("elements",),
}


class QuizMarkupError(ValueError):
    """A quiz field whose ``{}``/``[]`` markup does not balance."""


# A parsed field: alternatives, each a sequence of str | ("opt", alts) | ("group", alts).
Alts = list[list[object]]


def parse(text: str, where: str = "quiz") -> Alts:
    """Parse one field's markup into alternatives."""
    alts, _ = _parse(_OVERSTRIKE.sub(_overstrike, text), 0, None, where)
    return alts


def _parse(text: str, pos: int, close: str | None, where: str) -> tuple[Alts, int]:
    alts: Alts = [[]]
    literal = ""
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            literal += text[pos + 1]
            pos += 2
            continue
        if char in "{[|" or char == close:
            if literal:
                alts[-1].append(literal)
                literal = ""
            if char == close:
                return alts, pos + 1
            if char == "|":
                alts.append([])
            else:
                inner, pos = _parse(text, pos + 1, "}" if char == "{" else "]", where)
                alts[-1].append(("opt" if char == "{" else "group", inner))
                continue
        elif char in "}]":
            raise QuizMarkupError(f"{where}: unbalanced {char!r} in {text!r}")
        else:
            literal += char
        pos += 1
    if close:
        raise QuizMarkupError(f"{where}: missing {close!r} in {text!r}")
    if literal:
        alts[-1].append(literal)
    return alts, pos


def _overstrike(match: re.Match[str]) -> str:
    """``'<BS>e`` / ``e<BS>'`` (how quiz files spell accents) -> ``é``; other overstrikes
    keep the letter."""
    a, b = match.group(1), match.group(2)
    mark, letter = (a, b) if a in _ACCENTS else (b, a)
    if mark in _ACCENTS and letter.isalpha():
        return unicodedata.normalize("NFC", letter + _ACCENTS[mark])
    return b


def canonical(alts: Alts) -> str:
    """The first alternative, with optional parts kept."""
    return "".join(p if isinstance(p, str) else canonical(p[1]) for p in alts[0])  # type: ignore[index]


def expand(alts: Alts) -> list[str]:
    """Every spelling the markup accepts (canonical first, at most :data:`MAX_ANSWERS`)."""
    spellings = [canonical(alts), *_expand(alts)]
    return list(dict.fromkeys(" ".join(s.split()) for s in spellings))[:MAX_ANSWERS]


def _expand(alts: Alts) -> list[str]:
    out: dict[str, None] = {}
    for alt in alts:
        options: list[list[str]] = []
        for part in alt:
            if isinstance(part, str):
                options.append([part])
            else:
                kind, inner = part  # type: ignore[misc]
                options.append(_expand(inner) + ([""] if kind == "opt" else []))
        for combo in itertools.islice(itertools.product(*options), 4 * MAX_ANSWERS):
            out.setdefault("".join(combo), None)
    return list(out)


def read_records(path: Path) -> list[list[str]]:
    """Data lines of a quiz file (continuations joined), split into fields."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending += raw[:-1]
            continue
        lines.append(pending + raw)
        pending = ""
    return [_split_fields(line) for line in lines if line.strip()]


def _split_fields(line: str) -> list[str]:
    fields, current, pos = [], "", 0
    while pos < len(line):
        if line[pos] == "\\" and pos + 1 < len(line):
            current += line[pos : pos + 2]
            pos += 2
            continue
        if line[pos] == ":":
            fields.append(current)
            current = ""
        else:
            current += line[pos]
        pos += 1
    return [*fields, current]


@dataclass(frozen=True)
class QuizItem:
    prompt: str
    completion: str
    answers: list[str]


def quiz_items(folder: Path, category: str) -> list[QuizItem]:
    """The questions of one quiz category (its data file named in ``index``)."""
    index = {Path(r[0]).name: r[1:] for r in read_records(folder / "index")}
    if category not in index or category not in TEMPLATES:
        raise KeyError(f"{folder / 'index'}: no quiz category {category!r}")
    items: list[QuizItem] = []
    for number, record in enumerate(read_records(folder / category), 1):
        where = f"{folder / category}:{number}"
        for q_field, a_field, template in TEMPLATES[category]:
            if max(q_field, a_field) >= len(record):
                continue
            question, answer = parse(record[q_field], where), parse(record[a_field], where)
            q_text, a_text = canonical(question).strip(), canonical(answer).strip()
            if q_text and a_text:  # quiz itself skips records with an empty side
                items.append(QuizItem(template.format(q=q_text), a_text, expand(answer)))
    return items
