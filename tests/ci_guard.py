"""Pytest plugin: under CI (``CI`` set to 1/true/yes) a skip for a missing dependency fails.

A test skipped by ``pytest.importorskip`` ("could not import ...") or with a reason starting
"missing dependency" is an error in CI, at collection (module-level skips) and at run time, so a
broken install cannot pass as a green run with fewer tests. Locally such skips stay skips.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

MARKERS = ("could not import", "missing dependency")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_missing(report: Any) -> None:
    if not (report.skipped and in_ci()):
        return
    reason = _reason(report)
    if any(m in reason.lower() for m in MARKERS):
        report.outcome = "failed"
        report.longrepr = (f"CI=true: {reason.removeprefix('Skipped: ')} -- a test may not skip for a "
                           "missing dependency in CI; `make install` installs every extra")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    _fail_missing(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: Any) -> Any:
    outcome = yield
    _fail_missing(outcome.get_result())
