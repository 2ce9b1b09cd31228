"""Your own data as a stream: a .txt file, prompt/completion JSONL, chat JSONL and a datasets folder.

    python examples/own_data_recipe.py [MODEL] [--out DIR] [--steps N]

Writes the four files and a recipe that names them into DIR (default: a temp dir), then runs the
recipe exactly as ``lora-cl train DIR/my_stream.yaml --set ...`` would. MODEL (default
smollm2-135m, or $LORA_CL_MODEL) is the base model. This is docs/guides/own-data.md, runnable.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from datasets import Dataset

from lora_cl.recipe import check_recipe, load_recipe
from lora_cl.report import results_table
from lora_cl.trainer.stream import run_stream

RECIPE = """\
# lora-cl train my_stream.yaml   (paths are relative to this file)
model:
  name: {model}
domains:
  - notes.txt                      # plain text: blank-line separated chunks
  - qa.jsonl                       # {{"prompt": ..., "completion": ...}} per line
  - source: chat.jsonl             # {{"messages": [{{"role": ..., "content": ...}}, ...]}} per line
    name: support
  - glossary_ds                    # a folder written by datasets.Dataset.save_to_disk
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
method: ogp
data: {{seq_len: 32, eval_examples: 2}}
training: {{steps_per_domain: 4, batch_size: 2, lr: 1.0e-3, save_steps: 2}}
eval: {{batch_size: 4, generate: false}}
output_dir: runs
"""

NOTES = "\n\n".join(
    f"Field note {i}: the heron waited by the reed bed while the tide turned over the mud flats, "
    f"and the curlews called from the saltmarsh as the light went down behind the dunes."
    for i in range(12))
QA = [("What is the boiling point of water at sea level?", " 100 degrees Celsius."),
      ("How many legs does a spider have?", " Eight."), ("What gas do plants absorb?", " Carbon dioxide."),
      ("What is the largest ocean?", " The Pacific."), ("How many days are in a leap year?", " 366."),
      ("What is frozen water called?", " Ice."), ("Which planet is called the red planet?", " Mars."),
      ("What do bees make?", " Honey."), ("How many sides does a hexagon have?", " Six."),
      ("What is the chemical symbol for gold?", " Au.")]
CHAT = [("My printer says paper jam.", "Open the rear tray and pull the sheet out gently."),
        ("The screen stays black.", "Hold the power button for ten seconds, then try again."),
        ("I forgot my password.", "Use the reset link on the sign-in page."),
        ("The app crashes on start.", "Update it to the latest version and restart the phone."),
        ("Wi-Fi keeps dropping.", "Move closer to the router or restart it."),
        ("Sound is not working.", "Check that the device is not muted and the volume is up."),
        ("The battery drains fast.", "Lower the screen brightness and close background apps."),
        ("I cannot print in colour.", "Replace the empty colour cartridge."),
        ("My mouse does not move.", "Replace the batteries or plug in the receiver again."),
        ("Files will not sync.", "Sign out, sign in again and check the free storage.")]
GLOSSARY = ["An anemometer measures wind speed.", "A barometer measures air pressure.",
            "A hygrometer measures humidity.", "A pluviometer measures rainfall.",
            "A thermometer measures temperature.", "A seismometer measures ground motion.",
            "A lux meter measures illuminance.", "A tachometer measures rotation speed.",
            "An altimeter measures altitude.", "A spectrometer measures spectra."] * 2


def write_data(root: Path, model: str) -> Path:
    """The four data files and the recipe that names them; returns the recipe path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text(NOTES + "\n", encoding="utf-8")
    (root / "qa.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                           for p, c in QA), encoding="utf-8")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for q, a in CHAT),
        encoding="utf-8")
    Dataset.from_dict({"text": GLOSSARY}).save_to_disk(str(root / "glossary_ds"))
    recipe = root / "my_stream.yaml"
    recipe.write_text(RECIPE.format(model=model), encoding="utf-8")
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get("LORA_CL_MODEL", "smollm2-135m"))
    ap.add_argument("--out", default=None, help="folder for the data, the recipe and runs/")
    ap.add_argument("--steps", type=int, default=4, help="training steps per domain")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="lora-cl-own-data-"))

    path = write_data(root, args.model)
    # the same as: lora-cl train my_stream.yaml --set training.steps_per_domain=N --output root/runs
    recipe = load_recipe(path, [f"training.steps_per_domain={args.steps}"])
    recipe.output_dir = str(root / "runs")
    for note in check_recipe(recipe):
        print("note:", note)
    print(f"domains: {recipe.domain_names()}")
    runs = run_stream(recipe, progress=False)
    print(results_table(runs, markdown=False))
    print(f"report: {root / 'runs' / 'report.md'}")


if __name__ == "__main__":
    main()
