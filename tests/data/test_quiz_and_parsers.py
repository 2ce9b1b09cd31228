"""The bsdgames quiz markup and the Q/A text parsers, on small hand-written inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_cl.data.qa_sources import clip, gcide_first_sense, strip_pod, strip_rst
from lora_cl.data.quiz import QuizMarkupError, canonical, expand, parse, quiz_items, read_records


@pytest.mark.parametrize(
    ("markup", "canon", "answers"),
    [
        ("{G{eorge} }Washington", "George Washington", ["George Washington", "G Washington", "Washington"]),
        ("Alabama|Ala|AL", "Alabama", ["Alabama", "Ala", "AL"]),
        ("{I }[injure|thwart]", "I injure", ["I injure", "I thwart", "injure", "thwart"]),
        ("1801-{{18}0}9", "1801-1809", ["1801-1809", "1801-09", "1801-9"]),
        ("forget{-| }me{-| }not", "forget-me-not", None),
        ("Yaound['\be|e\b'|e]", "Yaoundé", ["Yaoundé", "Yaounde"]),
        ("S[~\ba|a\b~|a]o Tom['\be|e\b'|e]", "São Tomé", ["São Tomé", "São Tome", "Sao Tomé", "Sao Tome"]),
        ("To be{,} or not to be{\\:}", "To be, or not to be:", None),
    ],
)
def test_canonical_is_first_alternative_with_optional_parts(
    markup: str, canon: str, answers: list[str] | None
) -> None:
    alts = parse(markup)
    assert canonical(alts) == canon
    got = expand(alts)
    assert got[0] == canon
    if answers is not None:
        assert got == answers
    else:
        assert "forget me not" in got or "To be or not to be" in got


@pytest.mark.parametrize("markup", ["{open", "close}", "[a|b"])
def test_unbalanced_markup_raises(markup: str) -> None:
    with pytest.raises(QuizMarkupError, match="quiz/x:3"):
        parse(markup, "quiz/x:3")


def test_quiz_items_use_index_fields_and_continuations(tmp_path: Path) -> None:
    (tmp_path / "index").write_text(
        "/usr/share/games/bsdgames/quiz/elements:symbol:number:weight:element\n"
        "/usr/share/games/bsdgames/quiz/poetry:poem{-}line:next:poem:author\n"
    )
    (tmp_path / "elements").write_text("H:1:1.008:Hydrogen\nHe:2:4.003:Hel{ium}\n")
    (tmp_path / "poetry").write_text("Line one:\\\nLine two:{The }Poem:Some One\n::x:y\n")
    assert read_records(tmp_path / "poetry")[0] == ["Line one", "Line two", "{The }Poem", "Some One"]
    elements = quiz_items(tmp_path, "elements")
    assert [(i.prompt, i.completion) for i in elements] == [
        ("What is the chemical symbol of Hydrogen?", "H"),
        ("What is the atomic number of Hydrogen?", "1"),
        ("What is the chemical symbol of Helium?", "He"),
        ("What is the atomic number of Helium?", "2"),
    ]
    poetry = quiz_items(tmp_path, "poetry")  # the record with empty fields is skipped
    assert [(i.prompt, i.completion) for i in poetry] == [
        ('Which line of poetry follows "Line one"?', "Line two"),
        ('Who wrote the line "Line one"?', "Some One"),
    ]
    with pytest.raises(KeyError, match="no quiz category 'latin'"):
        quiz_items(tmp_path, "latin")


def test_gcide_first_sense() -> None:
    entry = (
        'Abandon \\A*ban"don\\, n. [F. abandon. fr. abandonner. See\n'
        "   {Abandon}, v.]\n"
        "   1. Abandonment; {relinquishment} of a right. --Shak.\n"
        "      [1913 Webster]\n\n"
        "   2. Second sense.\n"
    )
    assert gcide_first_sense(entry) == "Abandonment; relinquishment of a right."
    assert gcide_first_sense('Setewale \\Set"e*wale\\, n.\n   See {Cetewale}. [Obs.]\n') is None


def test_pod_rst_and_clip() -> None:
    pod = "Use C<reverse()> in L<perlfunc/reverse>; C<< $a->[0] >> and E<lt>fooE<gt>.\n=over 4\n"
    assert strip_pod(pod) == "Use reverse() in perlfunc/reverse; $a->[0] and <foo>."
    rst = "Call :func:`~os.path.join` or ``x`` (see `docs <https://x.org>`_)::\n.. note::\n"
    assert strip_rst(rst) == "Call join or x (see docs):"
    text = "\n\n".join(["a" * 600, "b" * 600, "c" * 600])
    assert clip(text) == "a" * 600 + "\n\n" + "b" * 600
    assert clip("z" * 5000) == "z" * 1500
