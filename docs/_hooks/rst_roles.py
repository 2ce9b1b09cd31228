"""griffe extension for the API pages: docstrings written for people, made safe for Markdown.

Sphinx roles (:class:`~lora_cl.X`) become inline code `X`, and index math like R[T][i] outside
code spans is escaped so Markdown does not read it as a reference link.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|term):`(~?)([^`]+)`")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def _escape_index_math(text: str) -> str:
    out, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        out += [text[last:span.start()].replace("][", "]\\["), span.group(0)]
        last = span.end()
    out.append(text[last:].replace("][", "]\\["))
    return "".join(out)


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class RstRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles into inline code."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _escape_index_math(_ROLE.sub(_code, obj.docstring.value))
