"""What a new user sees for bad input: `lora-cl validate|train` exit 2 with one line naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text(encoding="utf-8"))


def recipe_file(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(yaml.safe_dump(TINY))
    doc["domains"] = [str(REPO / "recipes" / d) for d in doc["domains"]]
    doc["output_dir"] = str(tmp_path / "runs")
    edit(doc, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _set(path: str, value):
    def edit(doc, _tmp):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def _empty_domain(doc, tmp):
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    doc["domains"][1] = str(tmp / "empty.txt")


def _full_finetune(doc, _tmp):
    doc["model"]["finetune"] = "full"
    doc.pop("lora", None)


CASES = [
    ("unknown key", "validate", _set("training.learning_rate", 1e-4),
     ["training.learning_rate", "unknown key", "training.lr"]),
    ("wrong type", "validate", _set("training.lr", "fast"), ["training.lr must be a number, got 'fast'"]),
    ("missing file", "validate", _set("domains", [str(REPO / "recipes/data/tiny/cooking.txt"), "nope.txt"]),
     ["domains[1].source", "nope.txt"]),
    ("empty domain", "train", _empty_domain, ["empty", "domain"]),
    ("LoRA target not in the model", "validate", _set("lora.target_modules", ["q_proj", "qkv_proj"]),
     ["qkv_proj", "q_proj"]),
    ("replay without buffer", "validate", _set("method", {"name": "replay", "replay_fraction": 0}),
     ["replay_fraction > 0"]),
    ("unknown method", "validate", _set("method", "ogpp"), ["unknown method", "ogp"]),
    ("plan of a full finetune", "plan", _full_finetune, ["model.finetune: full", "LoRA training only"]),
    ("full finetune with a lora section", "validate", _set("model.finetune", "full"),
     ["model.finetune is full", "lora section", "drop the lora section"]),
]


@pytest.mark.parametrize(("what", "command", "edit", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_fix(tmp_path, test_cache_dir, what, command, edit, needles):
    path = recipe_file(tmp_path, edit)
    args = [command, str(path)] + (["--no-progress"] if command == "train" else [])
    proc = subprocess.run([sys.executable, "-m", "lora_cl.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={**os.environ, "LORA_CL_CACHE": str(test_cache_dir)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"lora-cl {command}: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])


def test_the_shipped_tiny_recipe_validates(test_cache_dir):
    proc = subprocess.run([sys.executable, "-m", "lora_cl.cli", "validate", "recipes/tiny.yaml"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "LORA_CL_CACHE": str(test_cache_dir)})
    assert proc.returncode == 0, proc.stderr
    assert "OK - model tiny, 3 domains (cooking, astronomy, law), methods ogp, vanilla" in proc.stdout
