"""The docs' runnable examples run on the tiny model, and the docs' code names real API (no rot)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def run_example(name: str, *args: str, cache: Path, timeout: int = 300) -> str:
    env = dict(os.environ, LORA_CL_CACHE=str(cache), LORA_CL_MODEL="tiny", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_trainer_20_lines_protects_each_finished_domain(test_cache_dir):
    out = run_example("trainer_20_lines.py", "tiny", cache=test_cache_dir)
    assert "cooking: protected domains ['cooking']" in out
    assert "astronomy: protected domains ['cooking', 'astronomy']" in out
    # 2 domains x 2 layers x (q, v lora_A + q lora_B; v's fan-out 32 is not above the rank cap 32)
    assert "subspace bank (accumulate): 12 bases" in out


@pytest.mark.slow
def test_sft_continual_runs_three_tasks(test_cache_dir):
    out = run_example("sft_continual.py", "tiny", "ogp", cache=test_cache_dir)
    assert "finished ['capitals', 'arithmetic', 'colours']" in out
    assert "'projection/overlap'" in out.splitlines()[-1]


@pytest.mark.slow
def test_own_data_recipe_reads_all_four_formats(test_cache_dir, tmp_path):
    out = run_example("own_data_recipe.py", "tiny", "--out", str(tmp_path), "--steps", "2",
                      cache=test_cache_dir)
    assert "domains: ['notes', 'qa', 'support', 'glossary_ds']" in out
    assert re.search(r"^ogp\s+decoupled\s", out, re.M)
    assert (tmp_path / "runs" / "report.md").is_file()
    assert len(list((tmp_path / "runs" / "ogp" / "domains").iterdir())) == 4


@pytest.mark.slow
def test_resume_continues_a_killed_run(test_cache_dir, tmp_path):
    out = run_example("resume.py", "tiny", "--out", str(tmp_path), cache=test_cache_dir)
    assert "killed: exit status -9" in out
    killed = out.split("killed:")[1].split("$ lora-cl")[0]
    assert "00-cooking/" in killed and "checkpoint-10/" in killed and "01-astronomy/\n" not in killed.split(
        "domains/")[1]
    assert "resuming domain 'astronomy' from" in out and "checkpoint-10" in out
    assert "resumed: exit status 0" in out
    assert (tmp_path / "tiny" / "ogp" / "domains" / "02-law" / "metrics.json").is_file()


@pytest.mark.slow
def test_qlora_trains_lora_on_a_4bit_base(test_cache_dir):
    pytest.importorskip("bitsandbytes")
    out = run_example("qlora.py", "tiny", cache=test_cache_dir)
    assert "base layers under LoRA: 4, all bitsandbytes Linear4bit: True (nf4)" in out  # 2 layers x (q, v)
    assert "LoRA params: 8 tensors, dtypes ['torch.float32']" in out
    assert re.search(r"^cooking: protected domains \['cooking'\], .*LoRA changed: True$", out, re.M)
    assert re.search(r"^astronomy: protected domains \['cooking', 'astronomy'\], .*changed: True$", out, re.M)
    assert "subspace bank (accumulate): 12 bases" in out


@pytest.mark.slow
def test_memory_plan_runs_offline_for_both_setups(test_cache_dir):
    out = run_example("memory_plan.py", cache=test_cache_dir)
    assert "6,738,415,616 params, 16,777,216 LoRA" in out  # Llama-2-7B on the meta device, r 16 on q/k/v/o
    assert "17.80 GiB of 24.00 GiB per GPU: fits" in out  # the table in docs/guides/memory-planning.md
    assert re.search(r"^base weights +4\.37 GiB +[\d,]+ Linear params nf4", out, re.M)
    assert re.search(r"^logits \+ loss \(fused LM head\) +0\.49 GiB", out, re.M)  # an SFT recipe
    assert "verdict: bf16 base, 24 GiB: 17.80 GiB of 24 GiB, fits" in out
    assert "verdict: 4-bit base, 12 GiB: 9.62 GiB of 12 GiB, fits" in out


@pytest.mark.slow
def test_read_report_recomputes_the_stored_summary(test_cache_dir):
    out = run_example("read_report.py", cache=test_cache_dir)
    assert "domains ['cooking', 'astronomy', 'law'], primary metric loss, finished 3/3" in out
    for metric in ("loss", "ppl"):
        section = out.split(f"\n{metric} (lower is better)")[1]
        for key in ("op", "bwt_trace", "bwt_gem", "forgetting", "fwt"):
            line = rf"^  {key} +recomputed [-+][\d.]+  summary\.json [-+][\d.]+  agree$"
            assert re.search(line, section, re.M), (metric, key)
    assert "DIFFER" not in out and "all summary values agree with lora_cl.metrics" in out
    report = Path(out.rsplit("the report: ", 1)[1].strip())
    assert report.is_file() and "BWT" in report.read_text(encoding="utf-8")


# -- the code in the pages --------------------------------------------------------------------
def _python_blocks() -> list[tuple[Path, str]]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        blocks += [(page, b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    return blocks


def test_docs_python_blocks_parse_and_import_real_names():
    blocks = _python_blocks()
    assert len(blocks) >= 8
    checked = 0
    for page, code in blocks:
        tree = ast.parse(code, filename=str(page))  # every block is valid Python
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_cl"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {node.module}.{alias.name} missing"
                    checked += 1
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "lora_cl"):
                assert hasattr(importlib.import_module("lora_cl"), node.attr), \
                    f"{page.name}: lora_cl.{node.attr} missing"
                checked += 1
    assert checked >= 10


def test_mkdocs_nav_names_existing_pages():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    missing = [p for p in pages(config["nav"]) if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml nav names missing pages: {missing}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = (tmp_path / "site" / "api" / "cli.html").read_text(encoding="utf-8")
    assert "lora-cl train --help" in cli and "--resume" in cli  # generated from the parser
    assert (tmp_path / "site" / "prop1" / "prop1.png").is_file()


def test_readme_reproduction_summary_counts_match_the_generated_page():
    """The README's honest summary quotes the verdict counts of docs/reproduction.md, which
    `lora-cl reproduce --report` regenerates from the cells; a new cell that moves a verdict must
    move the README in the same commit."""
    page = (DOCS / "reproduction.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    got = re.search(r"of the paper's (\d+) claims in .*?, (\d+) reproduced(?: \((\d+) only against a weak "
                    r"baseline\))?, (\d+) not reproduced.*?, (\d+) not testable here", page)
    said = re.search(r"Of the paper's (\d+) claims, (\d+) reproduce(?: \((\d+) of them only against "
                     r"[^)]*\))?, (\d+) do not, (\d+) are not testable here", readme)
    assert got and said, "the page's 'At a glance' line or the README's summary changed form"
    assert said.groups() == got.groups(), f"README says {said.group(0)!r}; the page: {got.group(0)!r}"


def readme_results() -> list[str]:
    """The README's results summary: the lines between its ``<!-- results -->`` markers."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- results -->\n(.*?)\n<!-- /results -->", readme, re.S)
    assert found, "README.md lost its <!-- results --> ... <!-- /results --> block"
    return [line for line in found.group(1).splitlines() if line.strip()]


_NUM = r"[-+]?\d+\.\d+|[-+]?\d+(?=%)"
#: a figure: an estimate with its interval ("-4.3 [-6.1, -2.5]%"), a list of three or more numbers
#: ("-4.5, -3.4, -3.5"), a number with a decimal point or a %, or a count before "of"
_FIGURE = re.compile(rf"(?:{_NUM}) \[(?:{_NUM}), (?:{_NUM})\]%?|(?:{_NUM})%?(?:, (?:{_NUM})%?){{2,}}"
                     rf"|(?:{_NUM})%?|\d+ of \d+")


def figures_not_on_pages(lines: list[str], pages: list[str]) -> list[str]:
    """Every figure of ``lines`` (see ``_FIGURE``) that no generated page prints exactly so (a
    whole number there, not the start or end of a longer one: 0.0739 is not on a page that prints
    0.07394). An interval or a list is one figure, matched whole (its trailing % may be left off
    on the page, whose tables put it in the header), so a figure of it that moved is caught even
    where the old value is printed elsewhere on the page."""
    text = "\n".join(pages)
    figures = _FIGURE.findall("\n".join(lines))

    def printed(f: str) -> bool:
        whole = re.escape(f.removesuffix("%") if f.endswith("]%") else f)
        return re.search(rf"(?<![\d.]){whole}(?![\d])", text) is not None
    return [f for f in figures if not printed(f)]


def test_readme_results_are_five_short_lines_whose_figures_are_on_the_generated_pages():
    """Point 8 of the evidence issue: at most five short lines a newcomer reads, and each figure in
    them printed on docs/reproduction.md or a regime page (which `lora-cl reproduce --report`
    regenerates from the cells), so a new cell that moves a figure must move the README too."""
    lines = readme_results()
    assert 1 <= len(lines) <= 5 and all(len(line) <= 400 for line in lines), lines
    pages = [(DOCS / "reproduction.md").read_text(encoding="utf-8"),
             *(p.read_text(encoding="utf-8") for p in sorted((DOCS / "reproduction").glob("regime-*.md")))]
    assert not figures_not_on_pages(lines, pages)


def test_a_readme_figure_missing_from_the_pages_is_caught():
    pages = ["forgetting 0.123 nats, 12.5% of vanilla's; 3 of 5 cells"]
    assert figures_not_on_pages(["0.123 nats, 12.5%, 3 of 5"], pages) == []
    assert figures_not_on_pages(["0.124 nats, 12.6%, 4 of 5"], pages) == ["0.124", "12.6%", "4 of 5"]
    assert figures_not_on_pages(["p = 0.0739, 2.5%, 3 of 5"], ["p = 0.07394, 12.5%, 13 of 50"]) == [
        "0.0739", "2.5%", "3 of 5"]
    # an interval or a list is matched whole: one moved figure in it is caught, even where the old
    # value is printed elsewhere on the page
    page = ["-4.3 [-6.1, -2.5] and -4.5; at 0.5x, 1x, 2x the lr: -4.5, -3.4, -3.5."]
    assert figures_not_on_pages(["-4.3 [-6.1, -2.5]% less; -4.5, -3.4, -3.5"], page) == []
    assert figures_not_on_pages(["-4.3 [-6.1, -2.4]%; lr: -4.5, -3.4, -4.5"], page) == [
        "-4.3 [-6.1, -2.4]%", "-4.5, -3.4, -4.5"]


def test_committed_reproduction_pages_are_what_the_committed_cells_generate(tmp_path, monkeypatch):
    """docs/reproduction.md and the regime pages, regenerated from the committed cell caches, are
    the committed pages (but for the --docs flag in their commands): a cell committed without its
    regenerated pages, or a page edited by hand, fails here."""
    from lora_cl.reproduce import default_settings, write_report

    monkeypatch.chdir(ROOT)  # the pages name the caches as the command does: relative to the repo
    write_report(Path("benchmarks/reproduction/cells"), default_settings(), tmp_path)
    regimes = sorted((DOCS / "reproduction").glob("regime-*.md"))
    pages = ["reproduction.md", *(f"reproduction/{p.name}" for p in regimes)]
    assert len(pages) >= 3
    for page in pages:
        got = (tmp_path / page).read_text(encoding="utf-8").replace(f" --docs {tmp_path}", "")
        assert got == (DOCS / page).read_text(encoding="utf-8"), f"{page}: rerun `lora-cl reproduce --report`"


def test_deepspeed_page_figures_are_on_the_generated_pages():
    """docs/deepspeed.md quotes memory figures (GiB) of docs/memory.md, which `make bench`'s
    planner run generates, and points to docs/sharding.md for its measured differences: a figure
    the generated pages no longer print fails here, as the README's do."""
    page = (DOCS / "deepspeed.md").read_text(encoding="utf-8")
    quoted = re.findall(r"(\d+\.\d+) GiB", page)
    assert quoted, "docs/deepspeed.md lost its GiB figures: update this test"
    pages = [(DOCS / "memory.md").read_text(encoding="utf-8")]
    assert not figures_not_on_pages(quoted, pages)
    assert "(sharding.md)" in page and "max abs diff" in (DOCS / "sharding.md").read_text(encoding="utf-8")
