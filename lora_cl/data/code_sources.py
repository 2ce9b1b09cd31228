"""Readers for the documentation and code domains (one document per file or man page)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_cl.data.text_sources import Packages, read_text, walk_files

_SKIP_TESTS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "__pycache__"})


def python_docs(pkgs: Packages) -> list[str]:
    """reStructuredText sources of the Python 3.11 documentation (without whatsnew/)."""
    root = pkgs["python3.11-doc"].root / "usr/share/doc/python3.11/html/_sources"
    return [read_text(p) for p in walk_files(root, (".rst.txt",), frozenset({"whatsnew"}))]


def perl_pod_files(pkgs: Packages) -> list[Path]:
    """The core Perl POD manuals (perl-doc), without the per-release perl5*delta files."""
    root = pkgs["perl-doc"].root / "usr/share/perl/5.36.0/pod"
    return [p for p in walk_files(root, (".pod",)) if not re.match(r"perl5\d+delta", p.name)]


def perl_docs(pkgs: Packages) -> list[str]:
    """The core Perl manuals, in POD."""
    return [read_text(p) for p in perl_pod_files(pkgs)]


def _vim(pkgs: Packages) -> Path:
    return pkgs["vim-runtime"].root / "usr/share/vim/vim90"


def vim_help(pkgs: Packages) -> list[str]:
    """Vim's help files (``doc/*.txt``)."""
    return [read_text(p) for p in walk_files(_vim(pkgs) / "doc", (".txt",))]


def vim_script(pkgs: Packages) -> list[str]:
    """Vim script: ``autoload/**/*.vim`` and ``ftplugin/*.vim``."""
    files = walk_files(_vim(pkgs) / "autoload", (".vim",))
    files += [p for p in walk_files(_vim(pkgs) / "ftplugin", (".vim",)) if p.parent.name == "ftplugin"]
    return [read_text(p) for p in files]


def python_code(pkgs: Packages) -> list[str]:
    """The CPython 3.11 standard library's ``*.py`` (no tests, no idlelib)."""
    root = pkgs["libpython3.11-stdlib"].root / "usr/lib/python3.11"
    return [read_text(p) for p in walk_files(root, (".py",), _SKIP_TESTS)]


def c_headers(pkgs: Packages) -> list[str]:
    """C headers of glibc (libc6-dev) and the Linux UAPI (linux-libc-dev)."""
    files = [
        p
        for name in ("libc6-dev", "linux-libc-dev")
        for p in walk_files(pkgs[name].root / "usr/include", (".h",))
    ]
    return [read_text(p) for p in files]


def perl_code(pkgs: Packages) -> list[str]:
    """Perl 5.36 core modules (``*.pm``)."""
    return [read_text(p) for p in walk_files(pkgs["perl-modules-5.36"].root / "usr/share/perl", (".pm",))]


def man_page_files(pkgs: Packages) -> list[Path]:
    """Real (not ``.so`` redirect, not symlinked) pages of ``manpages`` and ``manpages-dev``."""
    files = [
        p
        for name in ("manpages", "manpages-dev")
        for p in walk_files(pkgs[name].root / "usr/share/man", (".gz",))
    ]
    return [p for p in files if not zlib.decompress(p.read_bytes(), 31)[:64].startswith(b".so ")]


_OVERSTRIKE = re.compile(r".\x08")
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def man_renderer() -> str:
    """``man`` or ``groff``: which renderer :func:`render_man_page` will use."""
    for tool in ("man", "groff"):
        if shutil.which(tool):
            return tool
    raise RuntimeError(
        "rendering man pages needs `man` (Debian package man-db) or `groff`; install one "
        "(sudo apt-get install man-db) or skip the man_pages domain"
    )


def render_man_page(path: Path) -> str:
    """``MANWIDTH=80 man -l path`` (or ``groff -man -Tutf8``), without overstrike/colour."""
    env = {
        **os.environ,
        "MANWIDTH": "80",
        "LC_ALL": "C.UTF-8",
        "MANPAGER": "cat",
        "PAGER": "cat",
        "MAN_KEEP_FORMATTING": "",
    }
    if man_renderer() == "man":
        cmd, stdin = ["man", "-l", str(path)], None
    else:
        cmd = ["groff", "-t", "-man", "-Tutf8", "-rLL=80n", "-rLT=80n", "-P-c"]
        stdin = zlib.decompress(path.read_bytes(), 31)
    result = subprocess.run(cmd, input=stdin, capture_output=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.decode(errors='replace')}")
    text = result.stdout.decode("utf-8", errors="replace")
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    return _SGR.sub("", text)


def man_pages(pkgs: Packages, need: int, seed: int) -> list[str]:
    """Rendered Linux man pages: a seeded sample of pages totalling at least ``need`` chars
    (rendering all ~1,100 takes over a minute)."""
    files = man_page_files(pkgs)
    random.Random(seed).shuffle(files)
    docs: list[str] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for start in range(0, len(files), 16):
            docs.extend(pool.map(render_man_page, files[start : start + 16]))
            if sum(map(len, docs)) >= need:
                break
    return docs
