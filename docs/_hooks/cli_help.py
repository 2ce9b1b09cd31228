"""mkdocs hook: replace ``<!-- lora-cl-help: SUBCOMMAND... -->`` with that command's ``--help`` text.

The CLI page is thus generated from ``lora_cl.cli.build_parser()`` at build time and cannot drift.
"""

from __future__ import annotations

import argparse
import os
import re

_MARKER = re.compile(r"<!--\s*lora-cl-help:?\s*([\w\- ]*?)\s*-->")


def _help(words: list[str]) -> str:
    from lora_cl.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix it so builds are identical
    parser = build_parser()
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            raise ValueError(f"docs: `lora-cl {' '.join(words)}` is not a lora-cl command")
        parser = subs[0].choices[word]
    return parser.format_help().rstrip()


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    def block(match: re.Match[str]) -> str:
        words = match.group(1).split()
        return f"```text\n$ lora-cl {' '.join(words + ['--help'])}\n{_help(words)}\n```"

    return _MARKER.sub(block, markdown)
