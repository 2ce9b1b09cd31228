"""The R lazy-load reader on hand-made XDR serializations."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from lora_cl.data.rdata import RDataError, read_lazyload_db, unserialize

UTF8_FLAG = 1 << 15  # CHARSXP "levels" bit 3 (UTF-8), shifted by 12
ATTR, TAG = 1 << 9, 1 << 10


def i32(value: int) -> bytes:
    return struct.pack(">i", value)


def charsxp(text: str | None) -> bytes:
    if text is None:
        return i32(9) + i32(-1)
    raw = text.encode("utf-8")
    return i32(9 | UTF8_FLAG) + i32(len(raw)) + raw


def strsxp(values: list[str | None]) -> bytes:
    return i32(16) + i32(len(values)) + b"".join(charsxp(v) for v in values)


def names_attr(names: list[str], first_use: bool) -> bytes:
    tag = i32(1) + charsxp("names") if first_use else i32(255 | (1 << 8))  # REFSXP #1
    return i32(2 | TAG) + tag + strsxp(names) + i32(254)


def named_list(items: dict[str, bytes], first_use: bool = True) -> bytes:
    body = b"".join(items.values())
    return i32(19 | ATTR) + i32(len(items)) + body + names_attr(list(items), first_use)


def stream(item: bytes, version: int = 3) -> bytes:
    head = b"X\n" + i32(version) + i32(0x040201) + i32(0x030500)
    return head + (i32(5) + b"UTF-8" if version == 3 else b"") + item


def test_character_vectors_named_lists_and_symbol_references() -> None:
    inner = named_list({"x": strsxp(["é", None])})
    outer = i32(19 | ATTR) + i32(2) + inner + i32(13) + i32(2) + i32(7) + i32(-(2**31))
    outer += names_attr(["inner", "ints"], first_use=False)  # the "names" symbol is a REFSXP
    assert unserialize(stream(outer)) == {"inner": {"x": ["é", None]}, "ints": [7, None]}
    assert unserialize(stream(strsxp(["a"]), version=2)) == ["a"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"A\n" + i32(3), r"only XDR"),
        (stream(i32(3)), r"type closure are not supported"),
        (stream(i32(4)), r"type environment are not supported"),
        (stream(strsxp(["abc"]))[:-2], r"truncated"),
        (b"X\n" + i32(4), r"version 4 is not supported"),
    ],
)
def test_unsupported_or_broken_input_raises_clearly(data: bytes, message: str) -> None:
    with pytest.raises(RDataError, match=message):
        unserialize(data, "blob")


def _lazyload_db(folder: Path, compressed: int, pack: bytes) -> Path:
    payloads = {"emma": stream(strsxp(["EMMA", "", "CHAPTER I"])), "persuasion": stream(strsxp([]))}
    rdb, variables = b"", {}
    for name, payload in payloads.items():
        if compressed == 1:
            blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        else:
            packer = {b"Z": zlib.compress, b"2": bz2.compress, b"X": lzma.compress}[pack]
            blob = struct.pack(">I", len(payload)) + pack + packer(payload)
        variables[name] = i32(13) + i32(2) + i32(len(rdb)) + i32(len(blob))
        rdb += blob
    flag = i32(10) + i32(1) + i32(1) if compressed == 1 else i32(13) + i32(1) + i32(compressed)
    index = named_list(
        {"variables": named_list(variables), "references": named_list({}, False), "compressed": flag},
        first_use=False,
    )
    base = folder / "Rdata"
    base.with_suffix(".rdx").write_bytes(gzip.compress(stream(index)))
    base.with_suffix(".rdb").write_bytes(rdb)
    return base


@pytest.mark.parametrize(("compressed", "pack"), [(1, b""), (2, b"Z"), (2, b"2"), (3, b"X")])
def test_lazyload_db_round_trip(tmp_path: Path, compressed: int, pack: bytes) -> None:
    # The index's first names attribute lives in `variables`, so the outer ones are REFSXPs.
    base = _lazyload_db(tmp_path, compressed, pack)
    assert read_lazyload_db(base) == {"emma": ["EMMA", "", "CHAPTER I"], "persuasion": []}


def test_lazyload_db_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Rdata\.rdx"):
        read_lazyload_db(tmp_path / "Rdata")
