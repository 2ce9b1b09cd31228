"""Readers that turn unpacked Debian packages into real question/answer pairs.

Each returns ``(prompt, completion, accepted answers)`` items; long answers (FAQ bodies) are
cut at a paragraph boundary to :data:`MAX_ANSWER_CHARS`.
"""

from __future__ import annotations

import re
import zlib

from lora_cl.data.code_sources import man_page_files, perl_pod_files
from lora_cl.data.quiz import QuizItem
from lora_cl.data.slices import paragraphs
from lora_cl.data.text_sources import Packages, gcide_entries, jargon_entries, read_text

MAX_ANSWER_CHARS = 1500
_SOURCE_TAG = re.compile(r"^\s*\[[^\]]*\]\s*$")  # [1913 Webster], [PJC], [WordNet 1.5]


def clip(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """``text`` cut after the last whole paragraph that fits in ``limit`` (at least one)."""
    kept: list[str] = []
    for para in paragraphs(text):
        if kept and sum(len(p) + 2 for p in kept) + len(para) > limit:
            break
        kept.append(para)
    return "\n\n".join(kept)[:limit].strip()


def _braces(text: str) -> str:
    return re.sub(r"\{([^{}]*)\}", r"\1", text)


def gcide_first_sense(entry: str) -> str | None:
    """The first definition of a GCIDE entry (after the headword/pronunciation/etymology)."""
    lines = entry.splitlines()
    depth, body_start = 0, len(lines)
    for i, line in enumerate(lines):
        depth += line.count("[") + line.count("(") - line.count("]") - line.count(")")
        if depth <= 0:
            body_start = i + 1
            break
    sense: list[str] = []
    for line in lines[body_start:]:
        if _SOURCE_TAG.match(line) or not line.strip():
            if sense:
                break
            continue
        sense.append(line.strip())
    text = re.sub(r"^(\d+\.|[a-z]+ \d+:)\s*", "", " ".join(sense))
    text = re.sub(r"\s+--\s?[A-Z][^.]*\.?$", "", _braces(text)).strip()
    if len(text.split()) < 3 or text.startswith(("See ", "Same as ")) or len(text) > 400:
        return None
    return text


def gcide_defs(pkgs: Packages) -> list[QuizItem]:
    """ "What does the word X mean?" -> the first sense of X in GCIDE (all entries' first
    senses accepted)."""
    senses: dict[str, tuple[str, list[str]]] = {}
    for _, entry in gcide_entries(pkgs):
        headword = entry.split(" \\", 1)[0].strip()
        if "\\" not in entry.splitlines()[0] or not headword:
            continue
        sense = gcide_first_sense(entry)
        if sense:
            senses.setdefault(headword.lower(), (headword, []))[1].append(sense)
    return [
        QuizItem(f'What does the word "{head}" mean?', defs[0], list(dict.fromkeys(defs)))
        for head, defs in senses.values()
    ]


def jargon_defs(pkgs: Packages) -> list[QuizItem]:
    """ "In hacker jargon, what does X mean?" -> the entry's first sense."""
    items: list[QuizItem] = []
    for term, _, body in jargon_entries(pkgs):
        for para in paragraphs(body):
            text = " ".join(para.split())
            text = re.sub(r"^(\d+\.\s*)?((n|v|vt|vi|adj|adv|interj)\.\s*)?(\[[^\]]*\]\s*)?", "", text)
            if len(text.split()) >= 3:
                sentences = re.split(r"(?<=[.!?])\s+", _braces(text))
                answer = sentences[0]
                for sentence in sentences[1:]:
                    if len(answer) + len(sentence) > 400:
                        break
                    answer += " " + sentence
                items.append(QuizItem(f'In hacker jargon, what does "{term}" mean?', answer, [answer]))
                break
    return items


def acronyms(pkgs: Packages) -> list[QuizItem]:
    """bsdgames' acronym lists: "What does the acronym X stand for?" (all expansions accepted)."""
    folder = pkgs["bsdgames"].root / "usr/share/games/bsdgames"
    items: list[QuizItem] = []
    for file_name, context in (("acronyms", ""), ("acronyms.comp", "In computing, w")):
        expansions: dict[str, list[str]] = {}
        for line in read_text(folder / file_name).splitlines():
            acronym, tab, expansion = line.partition("\t")
            if tab and acronym.strip() and expansion.strip():
                expansions.setdefault(acronym.strip(), []).append(expansion.strip())
        for acronym, answers in expansions.items():
            prompt = f"{context or 'W'}hat does the acronym {acronym} stand for?"
            items.append(QuizItem(prompt, answers[0], list(dict.fromkeys(answers))))
    return items


_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_MULTI = re.compile(r"([A-Z])<<+\s+(.*?)\s+>>+", re.S)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_code(match: re.Match[str]) -> str:
    code, inner = match.group(1), match.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        return _POD_ESCAPES.get(inner, chr(int(inner)) if inner.isdigit() else inner)
    if code == "L":
        return inner.split("|", 1)[0]
    return inner


def strip_pod(text: str) -> str:
    """POD to plain text: formatting codes resolved, command paragraphs dropped."""
    text = _POD_MULTI.sub(_pod_code, text)
    while _POD_CODE.search(text):
        text = _POD_CODE.sub(_pod_code, text)
    lines = [
        re.sub(r"^=item\s+", "", line)
        for line in text.splitlines()
        if not re.match(r"^=(over|back|cut|pod|for|begin|end|encoding)\b", line)
    ]
    return "\n".join(lines)


def perlfaq(pkgs: Packages) -> list[QuizItem]:
    """perlfaq1-9: each ``=head2`` question and its answer (POD stripped)."""
    items: list[QuizItem] = []
    for path in perl_pod_files(pkgs):
        if not re.fullmatch(r"perlfaq\d\.pod", path.name):
            continue
        for block in re.split(r"^(?==head[12] )", read_text(path), flags=re.M):
            head, _, body = block.partition("\n")
            question = strip_pod(head[7:]).strip()
            if head.startswith("=head2 ") and "?" in question:  # 2 of 306 are not questions
                answer = clip(strip_pod(body))
                if answer:
                    items.append(QuizItem(question, answer, [answer]))
    return items


_RST_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]*?)\s*(<[^>]*>)?`__?")


def strip_rst(text: str) -> str:
    """reStructuredText to plain text: roles, literals, links and directives resolved."""

    def role(match: re.Match[str]) -> str:
        inner = re.sub(r"\s*<[^>]*>$", "", match.group(1)).lstrip("!")
        return inner.lstrip("~").rsplit(".", 1)[-1] if inner.startswith("~") else inner

    text = _RST_LINK.sub(lambda m: m.group(1), _RST_ROLE.sub(role, text))
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    lines = [re.sub(r"::$", ":", line) for line in text.splitlines() if not line.lstrip().startswith(".. ")]
    return "\n".join(lines)


def python_faq(pkgs: Packages) -> list[QuizItem]:
    """The Python FAQ: section titles ending in "?" and their sections (rst stripped)."""
    root = pkgs["python3.11-doc"].root / "usr/share/doc/python3.11/html/_sources/faq"
    items: list[QuizItem] = []
    for path in sorted(root.glob("*.rst.txt")):
        lines = read_text(path).splitlines()
        heads = [
            i
            for i in range(len(lines) - 1)
            if lines[i].strip()
            and re.fullmatch(r"([=\-~^\"'*+#])\1{2,}", lines[i + 1].strip())
            and len(lines[i + 1].strip()) >= len(lines[i].strip())
        ]
        for head, nxt in zip(heads, [*heads[1:], len(lines) + 1], strict=True):
            title = strip_rst(lines[head]).strip()
            if title.endswith("?"):
                answer = clip(strip_rst("\n".join(lines[head + 2 : nxt - 1])))
                if answer:
                    items.append(QuizItem(title, answer, [answer]))
    return items


def _roff_text(text: str) -> str:
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
    text = text.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\").replace("\\ ", " ")
    text = re.sub(r"\\\((em|en)", "-", text)
    text = re.sub(r"\\\[(em|en)\]", "-", text)
    return re.sub(r'^\.\S+\s*|"', "", text, flags=re.M)


def man_whatis(pkgs: Packages) -> list[QuizItem]:
    """The NAME line of each man page: "What does the man page for X (section N) describe?"."""
    items: list[QuizItem] = []
    for path in man_page_files(pkgs):
        source = zlib.decompress(path.read_bytes(), 31).decode("utf-8", errors="replace")
        match = re.search(r'^\.SH\s+"?NAME"?\s*\n(.*?)^\.SH', source, re.M | re.S)
        section = path.parent.name.removeprefix("man")
        line = " ".join(_roff_text(match.group(1)).split()) if match else ""
        names, sep, what = line.partition(" - ")
        if sep and names and what:
            shown = [n.strip() for n in names.split(",") if n.strip()]
            label = ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else "")
            prompt = f"What does the Linux man page for {label} (section {section}) describe?"
            items.append(QuizItem(prompt, what, [what]))
    return items
