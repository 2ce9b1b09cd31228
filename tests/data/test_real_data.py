"""Build all 16 text domains and the 8 default Q/A tasks from the real Debian archive.

Needs apt-get/dpkg and the Debian mirror (CI runs it; ~1 minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lora_cl.data import (
    DEFAULT_QA_STREAM_8,
    DEFAULT_STREAM_8,
    TEXT_DOMAINS,
    build_qa_task,
    build_text_domain,
    debian,
    load_qa_task,
    load_text_domain,
    qa_tasks,
    text_domains,
)
from lora_cl.data.slices import paragraphs, sha256_text

pytestmark = pytest.mark.slow

Built = tuple[Path, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]
_REBUILD = """
import json
from lora_cl.data import DEFAULT_QA_STREAM_8, TEXT_DOMAINS, build_qa_task, build_text_domain
metas = [build_text_domain(n) for n in TEXT_DOMAINS]
metas += [build_qa_task(n) for n in DEFAULT_QA_STREAM_8]
print(json.dumps({m["name"]: {s: v["sha256"] for s, v in m["splits"].items()} for m in metas}))
"""


def _hashes(*metas: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {n: {s: v["sha256"] for s, v in m["splits"].items()} for d in metas for n, m in d.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("missing dependency: the real data sets are built from Debian packages (apt-get, dpkg)")
    cache = tmp_path_factory.mktemp("real-data-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_CL_CACHE", str(cache))
        start = time.perf_counter()
        text = {name: build_text_domain(name) for name in TEXT_DOMAINS}
        qa = {name: build_qa_task(name) for name in DEFAULT_QA_STREAM_8}
        print(f"\nbuilt 16 text domains + 8 Q/A tasks in {time.perf_counter() - start:.1f} s")
    return cache, text, qa


def test_text_domains_have_full_disjoint_slices(built: Built) -> None:
    _, text, _ = built
    assert set(DEFAULT_STREAM_8) <= set(text) and len(text) == 16
    for name, meta in text.items():
        folder = Path(meta["path"])
        train = (folder / "train.txt").read_text(encoding="utf-8")
        held_out = (folder / "eval.txt").read_text(encoding="utf-8")
        assert (len(train), len(held_out)) == (200_000, 40_000), name
        assert meta["splits"]["train"]["sha256"] == sha256_text(train)
        assert meta["splits"]["eval"]["sha256"] == sha256_text(held_out)
        assert meta["eval_documents"] >= 4 and meta["documents"] > meta["eval_documents"]
        assert all(p["version"] and len(p["deb_sha256"]) == 64 for p in meta["packages"].values())
        train_paragraphs = {p.strip() for p in paragraphs(train)}
        shared = [p for p in paragraphs(held_out) if len(p.strip()) >= 30 and p.strip() in train_paragraphs]
        assert not shared, f"{name}: held-out paragraph in train: {shared[0][:80]!r}"


def test_text_domains_look_like_their_sources(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_CL_CACHE", str(built[0]))
    names = ("austen", "kjv", "python_code", "man_pages")
    samples = {n: load_text_domain(n, "train") for n in names}
    assert "Mr." in samples["austen"] or "Mrs." in samples["austen"]
    assert "LORD" in samples["kjv"]
    assert "def " in samples["python_code"] and "import " in samples["python_code"]
    assert "\b" not in samples["man_pages"] and "DESCRIPTION" in samples["man_pages"]


def test_qa_tasks_are_seeded_disjoint_splits_of_real_pairs(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _, qa = built
    for name, meta in qa.items():
        assert meta["splits"]["eval"]["examples"] >= 30, name
        assert meta["splits"]["train"]["examples"] >= 4 * meta["splits"]["eval"]["examples"], name
        assert meta["splits"]["train"]["examples"] <= qa_tasks.DEFAULT_TRAIN
    monkeypatch.setenv("LORA_CL_CACHE", str(cache))
    records = {n: load_qa_task(n, "train") + load_qa_task(n, "eval") for n in qa}
    train_prompts = {r["prompt"] for r in load_qa_task("gcide_defs", "train")}
    eval_prompts = {r["prompt"] for r in load_qa_task("gcide_defs", "eval")}
    assert not train_prompts & eval_prompts
    for name, recs in records.items():
        assert all(r["completion"] == r["answers"][0] and "?" in r["prompt"] for r in recs), name
    capitals = {r["prompt"]: r for r in records["capitals"]}
    assert capitals["What is the capital of France?"]["completion"] == "Paris"
    assert "Yaoundé" in capitals["What is the capital of Cameroon?"]["answers"]
    assert qa["gcide_defs"]["available"] > 50_000  # capped to 2,000 / 200 by default


def test_rebuild_in_a_fresh_process_is_identical(built: Built, tmp_path: Path) -> None:
    cache, text, qa = built
    fresh = tmp_path / "cache"
    fresh.mkdir()
    (fresh / "debian").symlink_to(cache / "debian")  # reuse the unpacked packages, not the data
    env = {**os.environ, "LORA_CL_CACHE": str(fresh), "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", _REBUILD], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == _hashes(text, qa)


def test_second_call_is_a_cache_hit_without_apt(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, text, qa = built
    monkeypatch.setenv("LORA_CL_CACHE", str(cache))

    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached data set must not run apt")

    monkeypatch.setattr(debian, "_run", no_apt)
    monkeypatch.setattr(text_domains, "fetch_packages", no_apt)
    monkeypatch.setattr(qa_tasks, "fetch_packages", no_apt)
    start = time.perf_counter()
    again_text = {name: build_text_domain(name) for name in TEXT_DOMAINS}
    again_qa = {name: build_qa_task(name) for name in DEFAULT_QA_STREAM_8}
    assert time.perf_counter() - start < 2.0
    assert (again_text, again_qa) == (text, qa)


def test_kjv_sections_are_disjoint_runs_of_books(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """The high-overlap stream's eight domains: one source, full slices, no chapter in two sections."""
    from lora_cl.data import KJV_SECTION_DOMAINS

    monkeypatch.setenv("LORA_CL_CACHE", str(built[0]))
    texts = {}
    for name in KJV_SECTION_DOMAINS:
        meta = build_text_domain(name)
        assert meta["splits"]["train"]["chars"] == 200_000 and meta["splits"]["eval"]["chars"] == 40_000
        texts[name] = load_text_domain(name, "train") + "\n\n" + load_text_domain(name, "eval")
    assert "Pharaoh" in texts["kjv_genesis_exodus"] and "Jesus" in texts["kjv_gospels_acts"]
    assert not any("Jesus" in texts[n] for n in KJV_SECTION_DOMAINS[:6])        # the Old Testament
    seen: dict[str, str] = {}
    for name, text in texts.items():
        for para in paragraphs(text):
            if len(para) >= 200:  # whole chapters (short refrains may repeat across books)
                assert seen.setdefault(para, name) == name, f"{para[:60]!r} in {seen[para]} and {name}"
    assert "kjv_prophets" not in TEXT_DOMAINS and len(TEXT_DOMAINS) == 16
