"""Kill a stream run mid-domain, resume it with --resume, and show what is kept where.

    python examples/resume.py [MODEL] [--out DIR]     # MODEL: tiny (default here), smollm2-135m, ...

Runs ``lora-cl train recipes/tiny.yaml`` with the model swapped in, SIGKILLs it during the second
domain (a real ``kill -9`` as soon as the second domain's first checkpoint is complete; a lost
machine leaves the same files), then reruns the same command with ``--resume``. MODEL also comes
from $LORA_CL_MODEL. This is docs/guides/resume.md, runnable.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_cl.trainer.checkpoints import MARKER

ROOT = Path(__file__).resolve().parents[1]


def train(recipe: Path, out: Path, model: str, *, resume: bool, kill_at: Path | None = None) -> int:
    """Run ``lora-cl train``; with ``kill_at``, SIGKILL it once that file exists."""
    cmd = [sys.executable, "-m", "lora_cl.cli", "train", str(recipe), "--output", str(out),
           "--set", f"model.name={model}", "--set", "compare=[]", "--set", "training.steps_per_domain=40",
           "--set", "training.save_steps=10", "--no-progress"] + (["--resume"] if resume else [])
    print("$", "lora-cl", *cmd[3:], flush=True)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 600
        while kill_at is not None and proc.poll() is None and time.monotonic() < deadline:
            if kill_at.is_file():
                proc.send_signal(signal.SIGKILL)  # no clean-up of any kind, as a lost machine
                break
            time.sleep(0.05)
        code = proc.wait()
        err.seek(0)
        for line in err.read().splitlines():
            if line.startswith("lora-cl"):  # the runner's own progress lines, not the Trainer's logs
                print("   ", line)
    return code


def tree(root: Path, depth: int = 3) -> None:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if len(rel.parts) <= depth:
            print("   ", "  " * (len(rel.parts) - 1) + path.name + ("/" if path.is_dir() else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get("LORA_CL_MODEL", "tiny"))
    ap.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lora-cl-resume-")) / "tiny"
    recipe = ROOT / "recipes" / "tiny.yaml"

    # 1. killed (SIGKILL, no clean-up) once domain index 1 has its complete checkpoint at step 10 (of 40)
    marker = out / "ogp" / "checkpoints" / "01-astronomy" / "checkpoint-10" / MARKER
    code = train(recipe, out, args.model, resume=False, kill_at=marker)
    print(f"killed: exit status {code}; what survived:")
    tree(out / "ogp")
    # 2. the same command plus --resume: domain 0 is kept, domain 1 continues from its newest checkpoint
    code = train(recipe, out, args.model, resume=True)
    print(f"resumed: exit status {code}; finished run:")
    tree(out / "ogp", depth=2)


if __name__ == "__main__":
    main()
