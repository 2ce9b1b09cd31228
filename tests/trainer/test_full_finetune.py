"""route="linear": full finetuning of a plain (non-peft) model, every linear weight routed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trainer_helpers import DOMAINS, lora_model, run_domain

import lora_cl
from lora_cl.grouping import linear_weight_names, param_groups


def _plain(tiny_factory):
    model, tokenizer = tiny_factory()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tokenizer


def test_linear_route_takes_every_linear_weight_and_leaves_the_rest_vanilla(tiny_factory):
    model, _ = _plain(tiny_factory)
    routed, vanilla = param_groups(model, route="linear", routing="shared")
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # the tiny Llama ties its LM head to the embedding: that one tensor is routed, under its
    # first name; the 2 x 7 projections (q, k, v, o, gate, up, down) are the rest
    assert model.config.tie_word_embeddings and "lm_head" in linear
    expected = {f"{n}.weight" for n in linear if n != "lm_head"} | {"model.embed_tokens.weight"}
    assert set(routed["param_names"]) == expected == linear_weight_names(model)
    assert len(routed["params"]) == 2 * 7 + 1 and routed["routing"] == "shared"
    assert all(p.dim() == 2 for p in routed["params"])
    assert vanilla["routing"] == "vanilla" and all("norm" in n for n in vanilla["param_names"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(routed["param_names"]) | set(vanilla["param_names"])


def test_route_is_checked(tiny_factory):
    model, _ = tiny_factory()
    with pytest.raises(ValueError, match=r"route must be one of \('lora', 'linear'\), got 'all'"):
        param_groups(model, route="all")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="route='linear' found no trainable weight.*requires_grad=True"):
        param_groups(model, route="linear")
    peft_model, _ = lora_model(tiny_factory)
    with pytest.raises(ValueError, match="is a peft LoRA factor; use route='lora'"):
        param_groups(peft_model, route="linear")


def test_full_finetune_stream_projects_every_linear_weight(tiny_factory, tmp_path):
    """Two domains through the real Trainer: domain 1 leaves an input-side gradient basis for each
    linear weight whose fan-in exceeds the rank cap, and domain 2's steps project all of them."""
    model, tokenizer = _plain(tiny_factory)
    optimizer = lora_cl.make_optimizer(model, "ogp-in", route="linear", lr=1e-3)
    callback = lora_cl.ContinualCallback()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_domain(model, tokenizer, optimizer, callback, "cooking", DOMAINS["cooking"], tmp_path)
    bank = optimizer.bank
    routed = optimizer.param_groups[0]["param_names"]
    wide = {n for n, p in model.named_parameters() if n in routed and p.shape[1] > 32}
    assert set(bank.names("in")) == wide and not bank.names("out")
    assert len(wide) == len(routed)  # hidden 64, MLP 128: every fan-in is above 32
    trainer = run_domain(model, tokenizer, optimizer, callback, "law", DOMAINS["law"], tmp_path)
    logs = [h for h in trainer.state.log_history if "projection/projected_tensors" in h]
    assert logs and all(h["projection/projected_tensors"] == len(wide) for h in logs)
    # full finetuning: every trainable tensor moved, routed and vanilla alike
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert set(callback.snapshots["law"]) == set(routed)


# -- model.finetune: full through the stream runner ------------------------------------------
def _full_recipe(out, **training):
    from test_run_stream import tiny_recipe

    doc = tiny_recipe(out, model={"name": "tiny", "finetune": "full"}, method="ogp-in",
                      training={"adam_beta2": 0.9, **training})
    del doc["lora"]
    *doc["domains"], general = doc["domains"]  # law: scored after every domain, never trained
    doc["eval"]["general"] = general
    return doc


def _weights(run_dir):
    from safetensors.torch import load_file

    return {d.name: load_file(str(d / "model" / "model.safetensors"))
            for d in sorted((run_dir / "domains").iterdir())}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, test_cache_dir):
    from lora_cl.recipe import recipe_from_dict
    from lora_cl.trainer.stream import run_stream

    out = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_CL_CACHE", str(test_cache_dir))
        doc = _full_recipe(out / "runs")
        runs = run_stream(recipe_from_dict({**doc, "compare": ["vanilla"]}), progress=False,
                          log=lambda _: None)
    return out, runs


def test_full_stream_saves_whole_models_and_measures_leak_and_v_share(full_run, tiny_factory):
    import json

    from transformers import AutoModelForCausalLM

    _, (ogp, vanilla) = full_run
    base, _ = tiny_factory()
    saved = _weights(ogp)
    assert list(saved) == ["00-cooking", "01-astronomy"]
    assert not (ogp / "domains" / "00-cooking" / "adapter").exists()
    # every weight trained, routed (linear) and vanilla (norms) alike
    first = saved["00-cooking"]
    moved = {k for k, v in base.state_dict().items() if k in first and not torch.equal(v, first[k])}
    assert moved == set(first)
    # a domain's model/ is a transformers model directory
    reloaded = AutoModelForCausalLM.from_pretrained(str(ogp / "domains" / "01-astronomy" / "model"))
    assert all(torch.equal(reloaded.state_dict()[k], t) for k, t in saved["01-astronomy"].items())
    summary = json.loads((ogp / "summary.json").read_text())
    leak = summary["protection_leak"]
    assert leak[0] is None and all(0.0 < row["other"] < 1.0 and row["lora_A"] is None for row in leak[1:])
    assert json.loads((vanilla / "summary.json").read_text())["protection_leak"] == [None, None]
    report = (ogp / "report.md").read_text()
    assert "| tensors projected | leak other weights |" in report and "leak lora_A" not in report
    assert f"| {leak[1]['other']:.1%} |" in report
    for run in (ogp, vanilla):
        shares = [json.loads((d / "metrics.json").read_text())["log_history"][-1]["cl/v_current_share"]
                  for d in sorted((run / "domains").iterdir())]
        assert shares[0] == 1.0 and all(0.0 < s < 1.0 for s in shares[1:]), shares


def test_general_set_is_scored_at_the_base_and_after_every_domain(full_run):
    """eval.general (law, in no domain): summary.json's base, after and delta, and the column in
    the comparison report."""
    import json

    out, (ogp, vanilla) = full_run
    for run in (ogp, vanilla):
        base = json.loads((run / "base_eval.json").read_text())["general"]["loss"]
        after = [json.loads((d / "metrics.json").read_text())["general"]["loss"]
                 for d in sorted((run / "domains").iterdir())]
        general = json.loads((run / "summary.json").read_text())["general"]["loss"]
        assert general == {"base": base, "after": after, "delta": after[-1] - base} and len(after) == 2
        assert after[-1] < base  # any text teaches a random model something about English
    table = (out / "runs" / "report.md").read_text()
    assert "general Δ (held-out loss of eval.general, final - base; > 0: lost)" in table
    delta = json.loads((ogp / "summary.json").read_text())["general"]["loss"]["delta"]
    assert f"| {delta:+.4f} |" in table


@pytest.mark.slow
def test_full_stream_resumes_after_kill_to_the_same_weights(full_run, tmp_path, test_cache_dir):
    from test_run_stream import run_cli, write_recipe

    _, (ogp, _) = full_run
    recipe = write_recipe(tmp_path / "r.yaml", _full_recipe(tmp_path / "runs"))
    env = {"LORA_CL_CACHE": str(test_cache_dir)}
    killed = run_cli("train", str(recipe), "--no-progress", env=env, fault="kill:1:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli("train", str(recipe), "--no-progress", "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = _weights(tmp_path / "runs" / "ogp-in"), _weights(ogp)
    assert got.keys() == want.keys()
    for name in want:
        for key, tensor in want[name].items():
            torch.testing.assert_close(got[name][key], tensor, rtol=0, atol=0, msg=f"{name} {key}")


def test_full_weights_refuse_another_model(full_run, tiny_factory, tmp_path):
    from lora_cl.trainer.stream import StreamError, load_adapter

    _, (ogp, _) = full_run
    model, _ = tiny_factory()
    load_adapter(model, ogp / "domains" / "01-astronomy" / "model")  # the plain model takes it
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(ogp / "domains" / "01-astronomy" / "model" / "model.safetensors"))
    (tmp_path / "bad").mkdir()
    partial = {k: v for k, v in state.items() if "layers.1." not in k}
    save_file(partial, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(StreamError, match=r"not in the saved weights \(model\.layers\.1\."):
        load_adapter(model, tmp_path / "bad")


@pytest.mark.parametrize(("change", "message"), [
    ({"lora": {"r": 4}},
     "model.finetune is full, which trains no LoRA adapter, but the recipe has a lora section"),
    ({"model": {"name": "tiny", "finetune": "full", "quantization": "4bit"}},
     "model.finetune full trains every weight, which a 4bit quantized base cannot"),
    ({"model": {"name": "tiny", "finetune": "partial"}}, "model.finetune must be one of lora, full"),
    ({"data": {"train_chars": 1000}}, "data.train_chars sizes the slices of built-in debian: text "
                                      "domains, but .*cooking.txt is not one"),
    ({"eval": {"general": "debian:kjvv"}}, "eval.general: unknown text domain 'kjvv'. Did you mean 'kjv'"),
])
def test_full_finetune_recipe_mistakes_are_refused(tmp_path, change, message):
    from lora_cl.recipe import RecipeError, recipe_from_dict

    doc = _full_recipe(tmp_path)
    for key, value in change.items():
        doc[key] = {**doc.get(key, {}), **value} if key == "eval" else value
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(doc)


def test_general_set_that_a_domain_trains_on_is_refused(tmp_path):
    from lora_cl.recipe import RecipeError, recipe_from_dict

    doc = _full_recipe(tmp_path)
    doc["eval"]["general"] = doc["domains"][1]
    with pytest.raises(RecipeError, match=r"eval.general .*astronomy.txt is domains\[1\], which the stream "
                                          "trains on; general ability is measured on text no domain"):
        recipe_from_dict(doc)
