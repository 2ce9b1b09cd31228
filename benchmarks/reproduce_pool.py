"""Run the reproduction grid's missing cells as a pool of worker processes sharing one cell cache.

Each job is one (part, method, seed) cell, trained by its own ``lora-cl reproduce --only P
--methods M --only-seeds S`` process, so every cell is the same as a serial run's (one process's
work, same settings, same config hash). The pool suits a GPU, which has room for many SmolLM2-135M
runs at once; on 2 CPU cores it brings nothing (measured: +6% for two workers).

Jobs are ordered seed-major (every method's seed 0 before any seed 1, so a run cut short still
covers every part), then longest first within a seed; ``--order longest`` puts the longest cells
first over all seeds instead. Once cells have finished, a queued cell is started only if it is
expected to finish by the deadline (its estimate scaled by the finished cells' measured/estimated
ratio, per stream), so doomed cells do not slow the running ones; ``--start-late`` starts them
anyway. Jobs still running at the deadline are stopped; a stopped cell is not marked complete
and resumes or reruns next time.

    python benchmarks/reproduce_pool.py --workers 8 --deadline 480 --parts 2,3,4,5,6 \\
        --cache CACHE --logs LOGDIR [--quick] [--model tiny] [--seeds 3] [--steps N] [--seq-len N]

Writes LOGDIR/job-<part>-<method>-s<seed>.log per job and LOGDIR/pool.json (each job's outcome
and wall time). ``--pack FILE.tar.gz`` then packs the finished cells' JSON and CSV (what the
repository commits; paths relative to CACHE) into one small archive: a cell stopped at the
deadline keeps its checkpoints and adapters, which are too large to bring back from a device.
Jobs skip the report (``--no-report``); write it once afterwards with
``lora-cl reproduce --report --cache CACHE``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path


def plan_jobs(parts: list[int], cache: Path, settings, methods: list[str] | None = None,
              order: str = "seed") -> list[dict]:
    """The unfinished, runnable cells of ``parts`` as jobs.

    ``order="seed"``: seed-major, longest first per seed (a pool cut short still covers every
    part). ``order="longest"``: longest first over all seeds, lower seed first on ties (the
    shortest makespan when the deadline is expected to hold the whole set)."""
    from lora_cl.reproduce.grid import estimate_run_seconds, part_cells, runnable

    jobs, seen = [], set()
    for seed in settings.seeds:
        one = replace(settings, seeds=(seed,))
        batch = []
        for part in parts:
            for cell in part_cells(part, one, tuple(methods) if methods else None):
                run_dir = cell.run_dir(cache)
                if run_dir in seen or cell.complete(cache) or runnable(cell.stream, settings):
                    continue
                seen.add(run_dir)
                batch.append({"part": part, "method": cell.method.label, "seed": seed,
                              "stream": cell.stream, "run_dir": str(run_dir),
                              "estimate_s": estimate_run_seconds(cell.stream, settings)})
        jobs += sorted(batch, key=lambda j: -j["estimate_s"])
    if order == "longest":
        jobs.sort(key=lambda j: -j["estimate_s"])  # stable: seed order kept on ties
    elif order != "seed":
        raise ValueError(f"order must be 'seed' or 'longest', got {order!r}")
    return jobs


def job_command(job: dict, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "lora_cl.cli", "reproduce", "--only", str(job["part"]),
           "--methods", job["method"], "--only-seeds", str(job["seed"]), "--cache", str(args.cache),
           "--no-progress", "--no-report"]  # one report at the end (lora-cl reproduce --report), not per cell
    if args.quick:
        cmd.append("--quick")
    if args.model:
        cmd += ["--model", args.model]
    for flag, value in (("--steps", args.steps), ("--seq-len", args.seq_len), ("--seeds", args.seeds)):
        if value:
            cmd += [flag, str(value)]
    return cmd


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the job's process group, then SIGKILL what is left after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def expected_seconds(job: dict, finished: list[dict]) -> float | None:
    """``job``'s expected wall time here: its 2-core estimate times the largest ratio of measured
    to estimated time among the finished cells of its stream (of every stream when none of its
    own has finished); None before any cell has finished."""
    ok = [d for d in finished if d["outcome"] == "ok" and d["estimate_s"] > 0]
    basis = [d for d in ok if d["stream"] == job["stream"]] or ok
    if not basis:
        return None
    return job["estimate_s"] * max(d["seconds"] / d["estimate_s"] for d in basis)


def next_job(queue: list[dict], finished: list[dict], remaining: float) -> int | None:
    """Index of the first queued job expected to finish within ``remaining`` seconds (the first
    job while nothing has finished yet), or None when none is."""
    for i, job in enumerate(queue):
        expected = expected_seconds(job, finished)
        if expected is None or expected <= remaining:
            return i
    return None


def run_pool(jobs: list[dict], args: argparse.Namespace) -> list[dict]:
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    deadline = start + args.deadline
    queue, running, done = list(jobs), [], []
    while queue or running:
        now = time.monotonic()
        while queue and len(running) < args.workers and now < deadline:
            # a job that cannot finish by the deadline would only slow the running ones down
            pick = 0 if args.start_late else next_job(queue, done, deadline - now)
            if pick is None:
                break
            job = queue.pop(pick)
            log = logs / f"job-{job['part']}-{job['method']}-s{job['seed']}.log"
            handle = log.open("w")
            proc = subprocess.Popen(job_command(job, args), stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            running.append((job, proc, handle, now))
            print(f"[{now - start:6.0f}s] start  part {job['part']} {job['method']} s{job['seed']}",
                  flush=True)
        for item in list(running):
            job, proc, handle, began = item
            code = proc.poll()
            if code is None and time.monotonic() < deadline:
                continue
            outcome = "ok" if code == 0 else (f"exit {code}" if code is not None else "stopped at deadline")
            if code is None:
                _stop(proc)
            handle.close()
            running.remove(item)
            took = time.monotonic() - began
            done.append({**job, "outcome": outcome, "seconds": round(took, 1)})
            print(f"[{time.monotonic() - start:6.0f}s] {outcome:>6}  part {job['part']} {job['method']} "
                  f"s{job['seed']} ({took:.0f}s)", flush=True)
        if not running and (not queue or time.monotonic() >= deadline or (
                not args.start_late and next_job(queue, done, deadline - time.monotonic()) is None)):
            break
        time.sleep(1.0)
    for job in queue:
        expected = expected_seconds(job, done)
        done.append({**job, "outcome": "not started", "seconds": 0.0,
                     "expected_s": None if expected is None else round(expected, 1)})
    return done


def pack_cells(jobs: list[dict], cache: Path, dest: Path) -> list[str]:
    """Pack the jobs' finished cells (``summary.json`` complete), pruned as the runner prunes them
    (``prune_cell``: JSON and CSV only), into the gzip tarball ``dest``, paths relative to
    ``cache``; returns the packed cells' paths."""
    import tarfile

    from lora_cl.reproduce.runner import prune_cell

    cache = Path(cache)
    packed, seen = [], set()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for job in jobs:
            run_dir = Path(job["run_dir"])
            summary = run_dir / "summary.json"
            if run_dir in seen or not summary.is_file():
                continue
            seen.add(run_dir)
            if not json.loads(summary.read_text(encoding="utf-8")).get("complete"):
                continue
            prune_cell(run_dir)  # already done by a job that exited; idempotent
            for path in sorted(run_dir.rglob("*")):
                if path.is_file() and path.suffix in (".json", ".csv"):
                    tar.add(path, arcname=str(path.relative_to(cache)))
            packed.append(str(run_dir.relative_to(cache)))
    tmp.replace(dest)
    return packed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="2,3,4,5,6", help="comma-separated grid parts (2-6)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: each part's all)")
    ap.add_argument("--workers", type=int, default=7, help="parallel cells (7 was the best seen on one H100)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per job (default 1)")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds; running jobs are stopped then")
    ap.add_argument("--cache", default="benchmarks/reproduction/cells")
    ap.add_argument("--logs", default="reproduce-pool-logs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per domain (lora-cl reproduce --steps)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (reproduce --seq-len)")
    ap.add_argument("--order", choices=("seed", "longest"), default="seed",
                    help="seed: every seed 0 cell first (default); longest: longest cell first over all "
                         "seeds (shortest makespan when the deadline should hold every cell)")
    ap.add_argument("--start-late", action="store_true",
                    help="start queued cells up to the deadline even when the finished cells' times say "
                         "they cannot finish (default: such cells wait for a later run)")
    ap.add_argument("--pack", metavar="FILE", default=None,
                    help="afterwards, pack the finished cells' JSON/CSV into this .tar.gz (paths relative "
                         "to --cache; unpack into benchmarks/reproduction/cells)")
    ap.add_argument("--dry-run", action="store_true", help="print the jobs and stop")
    args = ap.parse_args(argv)

    from lora_cl.reproduce.grid import PARTS, chosen_methods, default_settings

    parts = [int(x) for x in args.parts.split(",")]
    bad = [p for p in parts if p not in PARTS or not PARTS[p].streams]
    if bad:
        with_streams = [p for p in PARTS if PARTS[p].streams]
        ap.error(f"--parts takes grid parts with streams ({with_streams}); got {bad}")
    settings = default_settings(quick=args.quick, model=args.model, steps=args.steps, seq_len=args.seq_len,
                                seeds=tuple(range(args.seeds)) if args.seeds else None)
    try:
        methods = chosen_methods(parts, args.methods)
    except ValueError as err:
        ap.error(str(err))
    jobs = plan_jobs(parts, Path(args.cache), settings, methods, args.order)
    print(f"reproduce_pool: {len(jobs)} unfinished cells, {args.workers} workers, "
          f"deadline {args.deadline:.0f}s", flush=True)
    if args.dry_run:
        for job in jobs:
            print(f"  part {job['part']} {job['stream']} {job['method']} s{job['seed']} "
                  f"(~{job['estimate_s'] / 60:.0f} min on 2 CPU cores)")
        return 0
    done = run_pool(jobs, args)
    Path(args.logs, "pool.json").write_text(json.dumps(done, indent=1), encoding="utf-8")
    counts: dict[str, int] = {}
    for job in done:
        counts[job["outcome"]] = counts.get(job["outcome"], 0) + 1
    print("reproduce_pool:", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), flush=True)
    if args.pack:
        packed = pack_cells(done, Path(args.cache), Path(args.pack))
        print(f"reproduce_pool: packed {len(packed)} finished cells into {args.pack}", flush=True)
    return 0 if all(j["outcome"] == "ok" for j in done) else 1


if __name__ == "__main__":
    sys.exit(main())
