"""A small pure-Python reader for R lazy-load databases (``Rdata.rdx`` + ``Rdata.rdb``).

Only what R data packages such as janeaustenr need: XDR serialization (versions 2 and 3) of
character, integer, logical and double vectors, lists, pairlists and symbols. Anything else
(environments, closures, ALTREP, bytecode) raises :class:`RDataError` naming the R type.

Layout: the ``.rdx`` file is a gzip'd serialized named list ``variables`` (name -> c(offset,
length) into the ``.rdb``), ``references`` and ``compressed``. Each ``.rdb`` blob is a 4-byte
big-endian uncompressed length, then either zlib data directly (``compressed`` TRUE/1) or one
type byte (``'Z'`` zlib, ``'2'`` bzip2, ``'X'`` xz, ``'0'`` stored) and the data (2 or 3).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

_NA_INT = -(2**31)
_UTF8, _LATIN1, _ASCII = 1 << 3, 1 << 2, 1 << 6
_TYPE_NAMES = {
    3: "closure",
    4: "environment",
    5: "promise",
    6: "language",
    7: "special",
    8: "builtin",
    17: "...",
    21: "bytecode",
    22: "external pointer",
    23: "weak reference",
    24: "raw",
    25: "S4",
    238: "ALTREP",
    241: "base environment",
    242: "empty environment",
    247: "persistent reference",
    253: "global environment",
}


class RDataError(ValueError):
    """The R data is malformed or uses a feature this reader does not implement."""


class _Reader:
    """Reads one XDR serialization stream: ``X\\n``, header, then one item."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"{self.where}: truncated R serialization at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def read(self) -> Any:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(f"{self.where}: only XDR ('X\\n') R serialization is supported, got {fmt!r}")
        version = self.int()
        if version not in (2, 3):
            raise RDataError(f"{self.where}: R serialization version {version} is not supported")
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.native_encoding = self._take(self.int()).decode("ascii").lower()
        return self.item()

    def _length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (0, 254):  # NILSXP, NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: index into the table of symbols read so far (1-based)
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:  # LISTSXP (pairlist), returned as a dict tag -> value
            return self._pairlist(has_attr, has_tag)
        if kind == 9:  # CHARSXP
            return self._charsxp(levels)
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self._length()
            values: list[Any] = [None if v == _NA_INT else v for v in self._ints(n)]
            if kind == 10:
                values = [None if v is None else bool(v) for v in values]
        elif kind == 14:  # REALSXP
            n = self._length()
            values = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = [self.item() for _ in range(self._length())]
        else:
            name = _TYPE_NAMES.get(kind, f"SEXP type {kind}")
            raise RDataError(f"{self.where}: R objects of type {name} are not supported")
        attributes = self.item() if has_attr else None
        if kind == 19 and isinstance(attributes, dict) and "names" in attributes:
            return dict(zip(attributes["names"], values, strict=True))
        return values

    def _ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self._take(4 * n))

    def _charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & _LATIN1:
            return raw.decode("latin-1")
        if levels & (_UTF8 | _ASCII) or self.native_encoding in ("utf-8", "utf8"):
            return raw.decode("utf-8", errors="replace")
        return raw.decode(self.native_encoding, errors="replace")

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else str(len(out))
            out[str(tag)] = self.item()
            flags = self.int()  # the CDR: another pairlist cell or NILVALUE
            if flags & 0xFF == 254:
                return out
            if flags & 0xFF != 2:
                raise RDataError(f"{self.where}: malformed pairlist (CDR type {flags & 0xFF})")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes, where: str = "<bytes>") -> Any:
    """Decode one XDR R serialization (character vectors -> ``list[str | None]``,
    named lists -> ``dict``, pairlists -> ``dict``)."""
    return _Reader(data, where).read()


def _decompress(blob: bytes, compressed: int, where: str) -> bytes:
    if len(blob) < 5:
        raise RDataError(f"{where}: lazy-load blob of {len(blob)} bytes is too short")
    size = struct.unpack(">I", blob[:4])[0]
    if compressed == 1:
        out = zlib.decompress(blob[4:])
    else:
        kind, payload = blob[4:5], blob[5:]
        if kind == b"Z":
            out = zlib.decompress(payload)
        elif kind == b"2":
            out = bz2.decompress(payload)
        elif kind == b"X":
            out = lzma.decompress(payload)
        elif kind == b"0":
            out = payload
        else:
            raise RDataError(f"{where}: unknown lazy-load compression type byte {kind!r}")
    if len(out) != size:
        raise RDataError(f"{where}: blob decompressed to {len(out)} bytes, header says {size}")
    return out


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """Every variable of the lazy-load DB ``base`` (path without ``.rdx``/``.rdb``)."""
    base = Path(base)
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for path in (rdx, rdb):
        if not path.is_file():
            raise FileNotFoundError(f"R lazy-load DB file not found: {path}")
    index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{rdx}: expected a named list with 'variables', got {type(index)}")
    flag = index.get("compressed", [True])
    compressed = int(flag[0]) if isinstance(flag, list) and flag else 1
    data = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        where = f"{rdb}[{name}]"
        out[name] = unserialize(_decompress(data[offset : offset + length], compressed, where), where)
    return out
