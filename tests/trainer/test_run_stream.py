"""run_stream end to end on the tiny model: run files, scores, reports, resume after kill -9, NaN stop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_cl import metrics as M
from lora_cl.recipe import recipe_from_dict
from lora_cl.trainer.stream import StreamError, run_stream

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = REPO / "recipes" / "data" / "tiny"


def tiny_recipe(out: Path, **sections) -> dict:
    """Three real-text domains on the tiny model, 4 steps each, a checkpoint every 2 steps."""
    doc = {
        "model": {"name": "tiny"},
        "domains": [str(TINY_DATA / f"{n}.txt") for n in ("cooking", "astronomy", "law")],
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "method": "ogp",
        "data": {"seq_len": 32, "eval_examples": 3},
        "training": {"steps_per_domain": 4, "batch_size": 2, "save_steps": 2, "logging_steps": 1,
                     "lr": 1e-3, "adam_beta2": 0.99},
        "eval": {"batch_size": 4, "generate": False},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and key in doc else value
    return doc


def run_cli(*args: str, env: dict | None = None, timeout: int = 300,
            fault: str | None = None) -> subprocess.CompletedProcess:
    """``lora-cl ARGS`` in a subprocess; ``fault`` runs it through the test-only fault_cli.py."""
    entry = ["-m", "lora_cl.cli"] if fault is None else [str(Path(__file__).with_name("fault_cli.py")),
                                                          fault]
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def write_recipe(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d.name: load_file(str(d / "adapter" / "adapter_model.safetensors"))
            for d in sorted((run_dir / "domains").iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, test_cache_dir):
    """One uninterrupted run of ogp and vanilla (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("stream")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_CL_CACHE", str(test_cache_dir))
        recipe = recipe_from_dict(tiny_recipe(out / "runs", compare=["vanilla"]))
        runs = run_stream(recipe, progress=False, log=lambda _: None)
    return out, runs


def test_stream_writes_every_run_file(finished):
    out, runs = finished
    assert [r.name for r in runs] == ["ogp", "vanilla"]
    ogp = runs[0]
    for name in ("run.json", "base_eval.json", "matrix.json", "summary.json", "matrix_loss.csv",
                 "report.md", "plots/matrix.png"):
        assert (ogp / name).is_file(), name
    meta = json.loads((ogp / "run.json").read_text())
    assert meta["domains"] == ["cooking", "astronomy", "law"] and meta["world_size"] == 1
    assert meta["global_batch"] == 2 and meta["finished"] and meta["method"]["name"] == "ogp"
    assert set(meta["data_fingerprints"]) == {"cooking", "astronomy", "law"}
    assert meta["recipe"]["training"]["adam_beta2"] == 0.99  # recipe betas reach the optimizer
    saved = torch.load(ogp / "domains" / "00-cooking" / "optimizer.pt", weights_only=True)
    assert all(tuple(g["betas"]) == (0.9, 0.99) and g["eps"] == 1e-8 for g in saved["param_groups"])
    dirs = sorted(p.name for p in (ogp / "domains").iterdir())
    assert dirs == ["00-cooking", "01-astronomy", "02-law"]
    assert (ogp / "domains" / "02-law" / "bank.safetensors").is_file()
    assert not (runs[1] / "domains" / "02-law" / "bank.safetensors").exists()  # vanilla: no bank
    assert not (ogp / "checkpoints" / "00-cooking").exists()  # removed once the domain dir exists
    assert json.loads((out / "runs" / "compare.json").read_text()) == {"runs": ["ogp", "vanilla"]}
    assert (out / "runs" / "report.md").is_file()


def test_matrix_is_the_evaluations_and_summary_matches_metrics(finished):
    _, runs = finished
    run = runs[0]
    doc = json.loads((run / "matrix.json").read_text())
    rows = [json.loads((d / "metrics.json").read_text()) for d in sorted((run / "domains").iterdir())]
    R = [[e["loss"] for e in row["eval"]] for row in rows]
    assert doc["metrics"]["loss"]["R"] == R and np.shape(R) == (3, 3)
    base = [e["loss"] for e in json.loads((run / "base_eval.json").read_text())["eval"]]
    expected = M.summarize(R, base, False, ["cooking", "astronomy", "law"])
    assert doc["metrics"]["loss"]["summary"] == expected
    assert doc["primary"] == "loss"
    # training moved the scores: each domain's loss right after it is below the base model's
    assert all(R[i][i] < base[i] for i in range(3))
    assert rows[1]["steps"] == 4 and rows[1]["bases_added"] > 0
    assert any("projection/alpha" in h for h in rows[1]["log_history"])
    # the leak of each later domain's update into the bases the domain started with, per factor:
    # ogp (weighted alpha <= 0.5 projection) protects partially, so each is strictly in (0, 1)
    leak = json.loads((run / "summary.json").read_text())["protection_leak"]
    assert leak[0] is None and [r["protection_leak"] for r in rows] == leak
    for row in leak[1:]:
        assert 0.0 < row["lora_A"] < 1.0 and 0.0 < row["lora_B"] < 1.0
    vanilla = json.loads((runs[1] / "summary.json").read_text())["protection_leak"]
    assert vanilla == [None, None, None]  # no bank, no protected subspace to leak into


def test_domain_adapter_loads_with_peft(finished, tiny_factory):
    from peft import PeftModel

    _, runs = finished
    model, _ = tiny_factory()
    adapter_dir = runs[0] / "domains" / "01-astronomy" / "adapter"
    loaded = PeftModel.from_pretrained(model, str(adapter_dir))
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert state.keys() == saved.keys() and any("lora_B" in k for k in saved)
    for key, tensor in saved.items():  # every tensor, A and B, as saved
        assert torch.equal(state[key], tensor), key
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # B trained (starts at 0)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill:1:3", "kill:0:end", "kill:2:1"])
def test_resume_after_kill_equals_uninterrupted(finished, tmp_path, test_cache_dir, fault):
    _, runs = finished
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs"))
    env = {"LORA_CL_CACHE": str(test_cache_dir)}
    killed = run_cli("train", str(recipe), "--no-progress", env=env, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli("train", str(recipe), "--no-progress", "--resume",
                      env={"LORA_CL_CACHE": str(test_cache_dir)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = tmp_path / "runs" / "ogp"
    got, want = adapters(run), adapters(runs[0])
    assert got.keys() == want.keys()
    for name in want:
        for key, tensor in want[name].items():
            torch.testing.assert_close(got[name][key], tensor, rtol=0, atol=0, msg=f"{name} {key}")
    R = json.loads((run / "matrix.json").read_text())["metrics"]["loss"]["R"]
    assert R == json.loads((runs[0] / "matrix.json").read_text())["metrics"]["loss"]["R"]


def test_nan_stops_with_message_and_keeps_checkpoint(tmp_path, test_cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs"))
    proc = run_cli("train", str(recipe), "--no-progress", env={"LORA_CL_CACHE": str(test_cache_dir)},
                   fault="nan:1:3")
    assert proc.returncode == 1
    assert "domain 'astronomy', step 3: non-finite" in proc.stderr
    assert "checkpoint-2" in proc.stderr and "training.nonfinite=skip" in proc.stderr
    assert (tmp_path / "runs" / "ogp" / "domains" / "00-cooking" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "ogp" / "checkpoints" / "01-astronomy" / "checkpoint-2").is_dir()


def test_existing_run_needs_resume(finished, lora_cl_cache):
    out, _ = finished
    recipe = recipe_from_dict(tiny_recipe(out / "runs", compare=["vanilla"]))
    with pytest.raises(StreamError, match="pass --resume"):
        run_stream(recipe, progress=False, log=lambda _: None)


def test_resume_refuses_a_changed_recipe(finished, lora_cl_cache):
    out, _ = finished
    recipe = recipe_from_dict(tiny_recipe(out / "runs", training={"lr": 5e-4}))
    with pytest.raises(StreamError, match="recipe changed.*training"):
        run_stream(recipe, resume=True, progress=False, log=lambda _: None)


def test_sft_stream_on_instruction_data_reports_exact_match(tmp_path, lora_cl_cache):
    """trl SFTTrainer per domain on prompt/completion JSONL; generation scores in the matrix."""
    from trainer_helpers import qa_jsonl

    paths = qa_jsonl(tmp_path)
    doc = tiny_recipe(tmp_path / "runs", domains=paths, training={"trainer": "sft", "steps_per_domain": 3},
                      eval={"generate": True, "max_new_tokens": 4}, data={"seq_len": 32})
    with pytest.raises(StreamError, match="trl dropped every training example.*raise data.seq_len"):
        run_stream(recipe_from_dict(doc), progress=False, log=lambda _: None)
    doc["data"]["seq_len"], doc["output_dir"] = 96, str(tmp_path / "runs2")
    run = run_stream(recipe_from_dict(doc), progress=False, log=lambda _: None)[0]
    doc = json.loads((run / "matrix.json").read_text())
    assert doc["primary"] == "exact_match"
    assert set(doc["metrics"]) == {"loss", "ppl", "exact_match", "rougeL"}
    R = doc["metrics"]["exact_match"]["R"]
    assert np.shape(R) == (2, 2) and all(0.0 <= x <= 1.0 for row in R for x in row)
    meta = json.loads((run / "run.json").read_text())
    assert meta["kinds"] == ["qa", "qa"] and meta["recipe"]["training"]["trainer"] == "sft"
    report = (run / "report.md").read_text()
    assert re.search(r"Primary metric: EM\b", report), report[:2000]  # not just any "em" in the text


def test_qlora_4bit_stream_trains_on_cpu(tmp_path, lora_cl_cache):
    """model.quantization: 4bit loads the base through bitsandbytes (CPU backend) and trains LoRA."""
    pytest.importorskip("bitsandbytes")
    doc = tiny_recipe(tmp_path / "runs", model={"name": "tiny", "quantization": "4bit"},
                      domains=[str(TINY_DATA / "cooking.txt"), str(TINY_DATA / "law.txt")],
                      training={"steps_per_domain": 2, "save_steps": 10})
    run = run_stream(recipe_from_dict(doc), progress=False, log=lambda _: None)[0]
    first, second = (load_file(str(d / "adapter" / "adapter_model.safetensors"))
                     for d in sorted((run / "domains").iterdir()))
    b = [k for k in first if "lora_B" in k]
    assert b and any(first[k].abs().sum() > 0 for k in b)  # B starts at 0: training moved it
    assert any(not torch.equal(first[k], second[k]) for k in b)
    assert json.loads((run / "summary.json").read_text())["complete"]


