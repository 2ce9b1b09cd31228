"""Package fetching against a fake apt (no network), and the build cache on fake domains."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lora_cl.data import debian, qa_tasks, resolve_source, text_domains
from lora_cl.data.quiz import QuizItem


class FakeApt:
    """Stands in for apt-get/dpkg: an archive of name -> versions, maybe without lists."""

    def __init__(self, archive: dict[str, list[str]], lists: bool = True) -> None:
        self.archive, self.lists, self.calls = archive, lists, []

    def __call__(self, cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        if cmd[:2] == ["apt-get", "update"]:
            self.lists = True
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[:2] == ["apt-get", "download"]:
            name, _, version = cmd[-1].partition("=")
            if not self.lists or name not in self.archive:
                return subprocess.CompletedProcess(cmd, 100, "", f"E: Unable to locate package {name}\n")
            if version and version not in self.archive[name]:
                err = f"E: Version '{version}' for '{name}' was not found\n"
                return subprocess.CompletedProcess(cmd, 100, "", err)
            version = version or self.archive[name][0]
            assert cwd is not None
            (cwd / f"{name}_{version}_all.deb").write_text(f"{name}\n{version}")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[0] == "dpkg-deb":
            return subprocess.CompletedProcess(cmd, 0, Path(cmd[2]).read_text().split("\n")[1], "")
        if cmd[:2] == ["dpkg", "-x"]:
            name = Path(cmd[2]).read_text().split("\n")[0]
            (Path(cmd[3]) / "usr/share/doc" / name).mkdir(parents=True)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        raise AssertionError(f"unexpected command {cmd}")


@pytest.fixture
def fake_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeApt:
    monkeypatch.setenv("LORA_CL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(debian, "_updated_lists", False)
    monkeypatch.setattr(debian.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(debian, "_is_root", lambda: True)
    apt = FakeApt({"fortunes": ["1:1.99.1-8", "1:1.99.1-7.3"]})
    monkeypatch.setattr(debian, "_run", apt)
    return apt


def test_pinned_version_is_fetched_once_then_cached(fake_apt: FakeApt) -> None:
    pkg = debian.fetch_package("fortunes")
    assert (pkg.version, pkg.pinned) == ("1:1.99.1-7.3", "1:1.99.1-7.3")
    assert (pkg.root / "usr/share/doc/fortunes").is_dir()
    assert not (pkg.root / ".download").exists()
    calls = len(fake_apt.calls)
    assert debian.fetch_package("fortunes") == pkg
    assert len(fake_apt.calls) == calls


def test_missing_pin_falls_back_to_candidate_with_a_warning(fake_apt: FakeApt) -> None:
    fake_apt.archive["fortunes"] = ["1:1.99.1-9"]
    with pytest.warns(UserWarning, match=r"pinned version 1:1\.99\.1-7\.3 .* using 1:1\.99\.1-9"):
        pkg = debian.fetch_package("fortunes")
    assert (pkg.version, pkg.pinned) == ("1:1.99.1-9", "1:1.99.1-7.3")
    assert pkg.record()["version"] == "1:1.99.1-9"


def test_missing_lists_run_apt_update_once_as_root(fake_apt: FakeApt) -> None:
    fake_apt.lists = False
    debian.fetch_package("fortunes")
    assert sum(c[:2] == ["apt-get", "update"] for c in fake_apt.calls) == 1


def test_missing_lists_as_user_name_the_fix(fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_apt.lists = False
    monkeypatch.setattr(debian, "_is_root", lambda: False)
    with pytest.raises(debian.DebianFetchError, match=r"sudo apt-get update.*LORA_CL_CACHE"):
        debian.fetch_package("fortunes")
    assert not any(c[:2] == ["apt-get", "update"] for c in fake_apt.calls)


def test_unknown_package_and_missing_tools(fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(debian.DebianFetchError, match=r"no-such-pkg.*Debian 12 \(bookworm\)"):
        debian.fetch_package("no-such-pkg")
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
    with pytest.raises(debian.DebianFetchError, match=r"apt-get and dpkg not found.*LORA_CL_CACHE"):
        debian.fetch_package("fortunes")


def test_text_and_qa_builds_are_cached_atomically(fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def reader(pkgs: dict[str, debian.Package]) -> list[str]:
        calls.append("text")
        return [f"document {i}\n\n" + f"line {i} " * 50 for i in range(100)]

    def qa_reader(pkgs: dict[str, debian.Package]) -> list[QuizItem]:
        calls.append("qa")
        return [QuizItem(f"What is {i}+1?", str(i + 1), [str(i + 1)]) for i in range(30)]

    monkeypatch.setitem(text_domains.DOMAINS, "fake", text_domains.TextDomain("fake", (), reader))
    monkeypatch.setitem(qa_tasks.TASKS, "fake_qa", qa_tasks.QATask("fake_qa", (), qa_reader))
    meta = text_domains.build_text_domain("fake", train_chars=3000, eval_chars=1000)
    assert meta["splits"]["train"]["chars"] == 3000
    assert text_domains.build_text_domain("fake", train_chars=3000, eval_chars=1000) == meta
    assert len(text_domains.load_text_domain("fake", "eval", train_chars=3000, eval_chars=1000)) == 1000
    qa_meta = qa_tasks.build_qa_task("fake_qa")
    assert (qa_meta["splits"]["train"]["examples"], qa_meta["splits"]["eval"]["examples"]) == (24, 6)
    assert qa_tasks.load_qa_task("fake_qa", "eval")[0].keys() == {"prompt", "completion", "answers"}
    assert calls == ["text", "qa"]  # every later call read the cache
    leftovers = [p for p in Path(meta["path"]).parent.iterdir() if p.name.startswith(".tmp")]
    assert not leftovers
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        qa_tasks.load_qa_task("fake_qa", "test")


def test_resolve_source_and_did_you_mean() -> None:
    assert resolve_source("debian:kjv").kind == "text"
    assert resolve_source("qa:quiz:africa").kind == "qa"
    assert resolve_source("data/mine.jsonl").kind == "user"
    with pytest.raises(KeyError, match=r"unknown text domain 'austin'\. Did you mean 'austen'\?"):
        resolve_source("debian:austin")
    with pytest.raises(KeyError, match=r"Did you mean 'capitals'"):
        resolve_source("qa:capitols")
    with pytest.raises(KeyError, match=r"unknown Q/A task 'zzz'\. Known: perlfaq"):
        qa_tasks.build_qa_task("zzz")
