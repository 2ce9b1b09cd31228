"""Kill a stream run mid-domain, resume it with --resume, and show what is kept where.

    python examples/resume.py [MODEL] [--out DIR]     # MODEL: tiny (default here), smollm2-135m, ...

Runs ``lora-cl train recipes/tiny.yaml`` with the model swapped in, SIGKILLs it during the second
domain (LORA_CL_FAULT, the hook lora-cl's own kill -9 tests use; a real ``kill -9 PID`` or a lost
machine leaves the same files), then reruns the same command with ``--resume``. MODEL also comes
from $LORA_CL_MODEL. This is docs/guides/resume.md, runnable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(recipe: Path, out: Path, model: str, *, resume: bool, kill: str | None = None) -> int:
    cmd = [sys.executable, "-m", "lora_cl.cli", "train", str(recipe), "--output", str(out),
           "--set", f"model.name={model}", "--set", "compare=[]", "--set", "training.steps_per_domain=4",
           "--set", "training.save_steps=2", "--no-progress"] + (["--resume"] if resume else [])
    env = dict(os.environ, **({"LORA_CL_FAULT": kill} if kill else {}))
    print("$", "lora-cl", *cmd[3:], flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("lora-cl"):  # the runner's own progress lines, not the Trainer's logs
            print("   ", line)
    return proc.returncode


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

    # 1. killed (SIGKILL, no clean-up) after step 3 of domain index 1; a checkpoint exists at step 2
    code = train(recipe, out, args.model, resume=False, kill="kill:1:3")
    print(f"killed: exit status {code}; what survived:")
    tree(out / "ogp")
    # 2. the same command plus --resume: domain 0 is kept, domain 1 continues from checkpoint-2
    code = train(recipe, out, args.model, resume=True)
    print(f"resumed: exit status {code}; finished run:")
    tree(out / "ogp", depth=2)


if __name__ == "__main__":
    main()
