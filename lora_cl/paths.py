"""Where lora-cl keeps its caches, and writes that never leave a half-written file behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "LORA_CL_CACHE"
_TMP_PREFIX = ".tmp-"


def cache_dir() -> Path:
    """The cache root: ``$LORA_CL_CACHE`` if set, else ``~/.cache/lora-cl`` (created on demand)."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "lora-cl"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; ``os.replace`` it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was, so a reader
    sees either the old file or the complete new one, never a partial write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(_mode(0o666))  # mkstemp makes 0600; give the file the usual permissions
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'd temp file, then ``os.replace``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, stale_after_s: float = 3600.0) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; rename it to ``path`` on success.

    Create-once semantics, for caches: a directory at ``path`` is always complete. If another
    writer renamed its own directory onto ``path`` first, ours is discarded (both are builds of
    the same thing). On an exception the temporary directory is removed. Leftovers of killed
    writers (older than ``stale_after_s``) are swept before a new build starts.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target, stale_after_s)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        tmp.chmod(_mode(0o777))  # mkdtemp makes 0700; a shared cache must stay readable
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mode(full: int) -> int:
    """``full`` permission bits minus the process umask (what ``open``/``mkdir`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def _sweep_stale(target: Path, stale_after_s: float) -> None:
    """Remove temporary siblings of ``target`` left by writers that died long ago."""
    now = time.time()
    for old in target.parent.glob(f"{_TMP_PREFIX}{target.name}.*"):
        try:
            if now - old.stat().st_mtime > stale_after_s:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
        except FileNotFoundError:
            pass  # swept by someone else meanwhile
