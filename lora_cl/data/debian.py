"""Fetch pinned Debian packages without root: ``apt-get download PKG=VERSION`` + ``dpkg -x``.

Each package is unpacked once into ``cache_dir()/debian/<name>_<pinned version>/`` (an
atomic rename, so a tree there is always complete) with a ``.lora-cl-package.json`` that
records the version actually used and the .deb's sha256. A pinned version that has left the
archive (a superseded security update) falls back to the archive's candidate with a warning
naming both versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from lora_cl.paths import atomic_dir, cache_dir

# Versions of Debian 12 (bookworm) as of this package's release (`apt-cache policy`): the
# archive's candidate where the installed copy had already left the archive.
PINNED_VERSIONS: dict[str, str] = {
    "apt": "2.6.2",
    "base-files": "12.4+deb12u15",
    "bash": "5.2.15-2+b13",
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
    "bsdgames": "2.17-29+b1",
    "coreutils": "9.1-1",
    "dict-gcide": "0.48.5+nmu2",
    "diffutils": "1:3.8-4",
    "findutils": "4.9.0-4",
    "fortunes": "1:1.99.1-7.3",
    "fortunes-de": "0.35-1",
    "gzip": "1.12-1",
    "jargon-text": "4.4.7-4.1",
    "libc6-dev": "2.36-9+deb12u14",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "libreadline8": "8.2-1.3",
    "linux-libc-dev": "6.1.192-2",
    "make": "4.3-4.1",
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "nano": "7.2-1+deb12u1",
    "perl-doc": "5.36.0-7+deb12u4",
    "perl-modules-5.36": "5.36.0-7+deb12u4",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "r-cran-janeaustenr": "1.0.0-1",
    "sed": "4.9-1+deb12u1",
    "vim-runtime": "2:9.0.1378-2+deb12u2",
}
_META = ".lora-cl-package.json"
_updated_lists = False  # `apt-get update` runs at most once per process


class DebianFetchError(RuntimeError):
    """A Debian package could not be fetched; the message names the fix."""


@dataclass(frozen=True)
class Package:
    """An unpacked .deb: ``root`` is the ``dpkg -x`` tree (``root / "usr/share/..."``)."""

    name: str
    version: str
    pinned: str
    root: Path
    sha256: str

    def record(self) -> dict[str, str]:
        """The provenance stored in a data set's meta.json."""
        return {"version": self.version, "pinned": self.pinned, "deb_sha256": self.sha256}


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def require_tools() -> None:
    """Fail with the fix when this is not a Debian-like system."""
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise DebianFetchError(
            f"{' and '.join(missing)} not found: lora-cl builds its real data sets from Debian "
            "packages, which needs a Debian/Ubuntu system. Build the cache there and point "
            "LORA_CL_CACHE at a copy of it, or use your own data (a .txt/.jsonl file)."
        )


def _tree_dir(name: str, pinned: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9.+~-]", "_", f"{name}_{pinned}")
    return cache_dir() / "debian" / safe


def _download(name: str, version: str | None, dest: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["apt-get", "download", "-q"]
    if _is_root():  # as root, apt's _apt sandbox user cannot write into our cache dir
        cmd += ["-o", "APT::Sandbox::User=root"]
    return _run([*cmd, f"{name}={version}" if version else name], cwd=dest)


def _apt_update() -> None:
    global _updated_lists
    result = _run(["apt-get", "update", "-q"])
    _updated_lists = True
    if result.returncode != 0:
        raise DebianFetchError(f"apt-get update failed: {_last_line(result.stderr)}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("E:")] or [
        line for line in text.strip().splitlines() if line
    ]
    return lines[-1] if lines else "no error message"


def _fetch_deb(name: str, pinned: str | None, dest: Path) -> Path:
    """Download ``name=pinned`` (or the candidate, with a warning) into ``dest``."""
    result = _download(name, pinned, dest)
    if result.returncode != 0 and _is_root() and not _updated_lists:
        _apt_update()  # the lists may be missing or stale: refresh once, then retry
        result = _download(name, pinned, dest)
    if result.returncode != 0 and pinned and "was not found" in result.stderr:
        fallback = _download(name, None, dest)  # the pin left the archive: use the candidate
        if fallback.returncode == 0:
            result = fallback
    if result.returncode == 0:
        debs = sorted(dest.glob("*.deb"))
        if len(debs) != 1:
            raise DebianFetchError(f"apt-get download {name} left {len(debs)} .deb files")
        return debs[0]
    spec = f"{name}={pinned}" if pinned else name
    if not _is_root():
        raise DebianFetchError(
            f"apt-get download {spec} failed ({_last_line(result.stderr)}): the package lists "
            "are probably missing or stale. Run `sudo apt-get update` once, or point "
            "LORA_CL_CACHE at a prebuilt cache."
        )
    raise DebianFetchError(
        f"apt-get download {spec} failed: {_last_line(result.stderr)}. lora-cl's data pins "
        "Debian 12 (bookworm) packages; check /etc/apt/sources.list, or point LORA_CL_CACHE "
        "at a prebuilt cache."
    )


def _deb_version(deb: Path) -> str:
    result = _run(["dpkg-deb", "-f", str(deb), "Version"])
    if result.returncode != 0:
        raise DebianFetchError(f"dpkg-deb -f {deb} failed: {_last_line(result.stderr)}")
    return result.stdout.strip()


def fetch_package(name: str, version: str | None = None) -> Package:
    """Unpack ``name`` at ``version`` (default: its pin) into the cache; cached after once."""
    pinned = version or PINNED_VERSIONS.get(name)
    tree = _tree_dir(name, pinned or "candidate")
    meta_file = tree / _META
    if not meta_file.is_file():
        require_tools()
        with atomic_dir(tree) as tmp:
            download_dir = tmp / ".download"
            download_dir.mkdir()
            deb = _fetch_deb(name, pinned, download_dir)
            actual = _deb_version(deb)
            if pinned and actual != pinned:
                warnings.warn(
                    f"Debian package {name}: pinned version {pinned} is not in the archive any "
                    f"more; using {actual} instead (recorded in the data set's meta.json)",
                    stacklevel=2,
                )
            unpack = _run(["dpkg", "-x", str(deb), str(tmp)])
            if unpack.returncode != 0:
                raise DebianFetchError(f"dpkg -x {deb.name} failed: {_last_line(unpack.stderr)}")
            digest = hashlib.sha256(deb.read_bytes()).hexdigest()
            shutil.rmtree(download_dir)
            record = {"name": name, "version": actual, "pinned": pinned or "", "sha256": digest}
            (tmp / _META).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    record = json.loads(meta_file.read_text(encoding="utf-8"))
    return Package(name, record["version"], record["pinned"], tree, record["sha256"])


def fetch_packages(names: list[str] | tuple[str, ...]) -> dict[str, Package]:
    """:func:`fetch_package` for each name, in order."""
    return {name: fetch_package(name) for name in names}


def pinned(names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The pins of ``names`` (what a cached data set's key depends on); no apt involved."""
    return {name: PINNED_VERSIONS.get(name, "candidate") for name in names}
