"""Real data for continual finetuning: Debian text domains, Debian Q/A tasks, user data.

>>> from lora_cl.data import load_text_domain, load_qa_task, resolve_source
>>> load_text_domain("kjv", "eval")[:40]            # doctest: +SKIP
>>> load_qa_task("capitals", "train")[0]             # doctest: +SKIP
{'prompt': 'What is the capital of ...?', 'completion': '...', 'answers': [...]}
>>> resolve_source("qa:latin").load("eval")          # doctest: +SKIP
"""

from __future__ import annotations

from lora_cl.data.debian import PINNED_VERSIONS, DebianFetchError, fetch_package
from lora_cl.data.qa_tasks import DEFAULT_QA_STREAM_8, QA_TASKS, build_qa_task, load_qa_task
from lora_cl.data.resolve import Source, UnknownNameError, resolve_source
from lora_cl.data.text_domains import (
    DEFAULT_STREAM_8,
    KJV_SECTION_DOMAINS,
    TEXT_DOMAINS,
    build_text_domain,
    load_text_domain,
)
from lora_cl.data.user_data import UserDataError, load_user_data

__all__ = [
    "DEFAULT_QA_STREAM_8",
    "DEFAULT_STREAM_8",
    "KJV_SECTION_DOMAINS",
    "PINNED_VERSIONS",
    "QA_TASKS",
    "TEXT_DOMAINS",
    "DebianFetchError",
    "Source",
    "UnknownNameError",
    "UserDataError",
    "build_qa_task",
    "build_text_domain",
    "fetch_package",
    "load_qa_task",
    "load_text_domain",
    "load_user_data",
    "resolve_source",
]
