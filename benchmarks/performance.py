"""Run every performance benchmark, one after another, and write docs/performance.md with a PNG.

    python benchmarks/performance.py            # or: make bench
    python benchmarks/performance.py --report   # only rebuild the page from docs/performance/*.json

Each benchmark runs in its own process, alone (ratios are taken inside one run, never across
runs). The targets table compares each measured ratio with issue 6's targets.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs"
PAGE = DOCS / "performance.md"
TINY = {n: str(ROOT / "recipes" / "data" / "tiny" / f"{n}.txt") for n in ("cooking", "astronomy")}


def results_dir(page: Path) -> Path:
    """Where the page's JSON, fragments and PNG live: ``performance/`` beside it."""
    return page.parent / "performance"


def run_all(quick: bool, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    jobs = [
        ["optimizer_step.py", "--out", str(results / "optimizer_step.md"),
         "--json", str(results / "optimizer_step.json"),
         "--profile", str(results / "projection_profile.md")]
        + (["--rounds", "2", "--steps", "1", "--layers", "2", "--hidden", "256"] if quick else []),
        ["trainer_step.py", "--json", str(results / "trainer_step.json")]
        + (["--model", "tiny", "--rounds", "1", "--steps", "3", "--seq", "32", "--old", TINY["cooking"],
            "--new", TINY["astronomy"]] if quick else []),
        ["basis_build.py", "--json", str(results / "basis_build.json")]
        + (["--model", "tiny", "--steps", "3", "--seq", "32", "--source", TINY["cooking"]] if quick else []),
    ]
    for job in jobs:
        print(f"== {job[0]}", flush=True)
        subprocess.run([sys.executable, str(HERE / job[0]), *job[1:]], check=True)


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _row(what: str, baseline: str, target: str, measured: str, ok: bool | None) -> str:
    verdict = "not run" if ok is None else ("**met**" if ok else "**not met**")
    return f"| {what} | {baseline} | {target} | {measured} | {verdict} |"


def targets_table(opt: dict | None, trainer: dict | None, basis: dict | None) -> list[str]:
    lines = ["| measurement | baseline | target | measured | verdict |", "|---|---|---|---|---|"]
    if opt:
        r = opt["ratio"]
        nm, pj = r[opt["no_modifier"]], r[opt["projection"]]
        read = r.get(opt.get("guard_read", ""))
        floor = ("" if read is None else
                 f" (floor {1 + read:.2f}x: the guard's read of g alone is {read:.2f}x)")
        lines.append(_row("RoutedAdamW decoupled, no modifier, guard on, 7B-shaped LoRA step",
                          opt["baseline"], "<= 1.10x", f"{nm:.2f}x{floor}", nm <= 1.10))
        off = r[opt["no_modifier_off"]]
        lines.append(_row("same without the inf/nan guard (nonfinite='off', as torch AdamW)",
                          opt["baseline"], "<= 1.10x", f"{off:.2f}x", off <= 1.10))
        fed = r.get(opt.get("no_modifier_fed", ""))
        if fed is not None:
            lines.append(_row("same, guard on, fed the Trainer's clipping norm (lora_cl.attach)",
                              opt["baseline"], "<= 1.10x", f"{fed:.2f}x", fed <= 1.10))
        pfloor = opt.get("projection_floor")
        pfloor_text = ("" if pfloor is None else
                       f" (floor {pfloor:.2f}x: its two products and the fused kernel alone)")
        lines.append(_row("same + rank-32 projection, overlap-adaptive, guard on", opt["baseline"],
                          "<= 2.6x", f"{pj:.2f}x{pfloor_text}", pj <= 2.6))
        pf = r.get(opt.get("projection_fed", ""))
        if pf is not None:
            lines.append(_row("same, guard fed the Trainer's clipping norm (lora_cl.attach)",
                              opt["baseline"], "<= 2.6x", f"{pf:.2f}x", pf <= 2.6))
        syncs = opt.get("syncs_per_step")
        if syncs:
            guarded = [syncs[opt["no_modifier"]], syncs[opt["projection"]]]
            what = "no modifier; projection"
            if opt.get("routed_8bit") in syncs:  # (runs before 2026-12-07 did not count it)
                guarded.append(syncs[opt["routed_8bit"]])
                what += "; 8-bit states"
            lines.append(_row(f"host syncs per step(), default guard: {what}", "",
                              "0", "; ".join(f"{s:g}" for s in guarded), max(guarded) == 0))
            chain = syncs.get(opt.get("ogp_chain", ""))
            if chain is not None:
                lines.append(_row("host syncs per step(), the ogp preset's chain (gradient-row "
                                  "buffers + projection)", "", "0", f"{chain:g}", chain == 0))
        if "ratio_8bit_vs_bnb" in opt:
            q, b = opt["ratio_8bit_vs_bnb"], opt["state_bytes_per_param"][opt["routed_8bit"]]
            lines.append(_row("same, 8-bit states", "bitsandbytes AdamW8bit", "<= 1.0x; <= 2.1 B/param",
                              f"{q:.2f}x; {b:.3f} B/param", q <= 1.0 and b <= 2.1))
    if trainer:
        o = trainer["overhead"]
        lines.append(_row(f"Trainer step, {trainer['model']} LoRA, ContinualCallback + RoutedAdamW(ogp)",
                          "peft + AdamW(fused), same Trainer", "overhead <= 5%", f"{o:+.1%}", o <= 0.05))
    if basis:
        for label, row in basis["sources"].items():
            f = row["fraction_at_80_steps"]
            floor = ("" if "floor_fraction_at_80_steps" not in row else
                     f"; floor {row['floor_fraction_at_80_steps']:.1%}: its sample's forwards alone")
            lines.append(_row(f"basis building at a domain end: {label}", "an 80-step domain's training",
                              "<= 5%", f"{f:.1%} ({row['build_seconds']:.2f} s{floor})", f <= 0.05))
    lines.append(_row("GPU: no-modifier step vs AdamW(fused); 8-bit vs AdamW8bit", "", "<= 1.2x",
                      "no GPU lent to this task (benchmarks/gpu_7b.py is ready)", None))
    return lines


def plot(opt: dict | None, trainer: dict | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not opt:
        return False
    labels = list(opt["ratio"])
    values = [opt["ratio"][k] for k in labels]
    if trainer:
        labels.append("Trainer step: lora-cl ogp vs peft + AdamW(fused)")
        values.append(1.0 + trainer["overhead"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=["#888" if v <= 1.0001 else "#3a7" for v in values])
    ax.set_yticks(range(len(labels)), [lbl[:90] for lbl in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_xlabel(f"time relative to the baseline ({opt['baseline']}; log scale)")
    ax.set_title("Step time as ratios measured in one run (lower is faster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_page(page: Path) -> Path:
    results = results_dir(page)
    opt, trainer, basis = (_load(results, n) for n in ("optimizer_step", "trainer_step", "basis_build"))
    png = plot(opt, trainer, results / "ratios.png")
    lines = [
        "# Performance",
        "",
        "Regenerate everything with `make bench` (`python benchmarks/performance.py`; "
        "`--report` only rebuilds this page from `docs/performance/*.json`). Every number is a "
        "ratio of two things timed in the same run, alternating, on "
        f"{platform.machine()} with the thread count shown; absolute times vary with the machine.",
        "",
        "## Targets",
        "",
        *targets_table(opt, trainer, basis),
        "",
    ]
    if png:
        lines += ["![step-time ratios](performance/ratios.png)", ""]
    if opt:
        fragment = (results / "optimizer_step.md").read_text(encoding="utf-8")
        lines += ["## Optimizer step", "", fragment.replace("\n### ", "\n#### ").rstrip(), ""]
        lines += _projection_profile(results)
    if trainer:
        med = trainer["median_seconds"]
        q = trainer["paired_ratio_quartiles"]
        lines += [
            "## Trainer step", "",
            f"`benchmarks/trainer_step.py`: {trainer['model']}, LoRA r=8 on q,k,v,o, batch "
            f"{trainer['batch']} x {trainer['seq']} tokens, {trainer['rounds']} alternating rounds of "
            f"{trainer['steps_per_round']} steps (first step of each round not timed), "
            f"{trainer['threads']} threads, device {trainer['device']}; lora-cl's bank holds "
            f"{len(trainer['bank_domains'])} old domain (rank-32 gradient bases), last alpha "
            f"{trainer['last_alpha']:.3f}. Load average at the end: {trainer['load_avg_1min_end']:.2f}.",
            "",
            "| | median s/step | steps timed |", "|---|---|---|",
            *(f"| {k} | {v:.3f} | {len(trainer['step_seconds'][k])} |" for k, v in med.items()),
            "",
            f"Overhead of lora-cl: **{trainer['overhead']:+.1%}** (ratio of medians); step-by-step "
            f"ratios, quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}.",
            "",
        ]
    if basis:
        lines += [
            "## Basis building", "",
            f"`benchmarks/basis_build.py`: {basis['model']}, one real domain (debian:austen) of "
            f"{basis['steps']} steps per basis source, batch {basis['batch']} x {basis['seq']}, "
            f"{basis['threads']} threads, device {basis['device']}. The build runs once per domain, "
            "so its share shrinks with the domain's length.",
            "",
            "| basis source | build s | step s | tensors | bank MiB | share of a 16-step domain | "
            "share of an 80-step domain | steps for <= 5% |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {k} | {r['build_seconds']:.3f} | {r['step_seconds']:.3f} | {r['bases']} | "
              f"{r['bank_mib']:.2f} | {r['fraction_at_16_steps']:.1%} | {r['fraction_at_80_steps']:.1%} | "
              f"{r['steps_for_5_percent']} |" for k, r in basis["sources"].items()),
            "",
            *(f"Exact GPM ({k}) runs its sample of examples through the model at the domain's end: "
              f"those forwards alone, through the decoder body without the LM head, took "
              f"{r['floor_seconds']:.2f} s of its {r['build_seconds']:.2f} s "
              f"({r['floor_fraction_at_80_steps']:.1%} of an 80-step domain), so "
              + ("no faster sampling or decomposition can bring it under 5% there"
                 if r["floor_fraction_at_80_steps"] > 0.05 else "the rest is sampling and decomposition")
              + "; `activation_sample=\"last_steps\"` samples the domain's last training forwards "
              "instead (a change of definition) and skips them."
              for k, r in basis["sources"].items() if "floor_seconds" in r),
            "",
        ]
    page.write_text("\n".join(lines), encoding="utf-8")
    return page


def _projection_profile(results: Path) -> list[str]:
    path = results / "projection_profile.md"
    return [path.read_text(encoding="utf-8").rstrip(), ""] if path.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only rebuild the page from the JSON files")
    ap.add_argument("--quick", action="store_true", help="tiny model, few rounds (a smoke test)")
    ap.add_argument("--out", type=Path, default=PAGE,
                    help="the page; its JSON, fragments and PNG go to performance/ beside it")
    args = ap.parse_args()
    if not args.report:
        run_all(args.quick, results_dir(args.out))
    print(f"wrote {write_page(args.out)}")


if __name__ == "__main__":
    main()
