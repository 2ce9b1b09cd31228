"""Recipes: YAML -> typed Recipe, overrides, one-line errors with file:line, offline model checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_cl.methods import MethodError, resolve_method
from lora_cl.recipe import (
    DomainConfig,
    MethodChoice,
    Recipe,
    RecipeError,
    check_recipe,
    dump_recipe,
    load_recipe,
    meta_model,
    model_config,
    recipe_from_dict,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

BASE = """\
model:
  name: tiny
domains:
  - data/a.txt
  - data/b.txt
  - data/c.txt
lora:
  r: 4
  alpha: 8
  target_modules: [q_proj, v_proj]
method: ogp
compare: [vanilla]
data:
  seq_len: 32
training:
  steps_per_domain: 2
  batch_size: 2
  lr: 2.0e-4
eval:
  generate: false
"""


def _write(tmp_path: Path, text: str = BASE) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("a", "b", "c"):
        (data / f"{name}.txt").write_text(f"Some text of domain {name}.\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _line(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if marker in line)


# (id, replace old, by new, overrides, check kwargs, line marker or None, expected text after "file:line: ")
ERRORS = [
    ("unknown-top-key", "training:", "traning:", (), None, "traning:",
     "unknown key traning; did you mean training?"),
    ("unknown-nested-key", "  lr: 2.0e-4", "  lrr: 2.0e-4", (), None, "lrr:",
     "unknown key training.lrr; did you mean training.lr?"),
    ("unknown-domain-key", "  - data/c.txt", "  - {sorce: data/c.txt}", (), None, "sorce",
     "unknown key domains[2].sorce; did you mean domains[2].source?"),
    ("unknown-method-field", "method: ogp", "method: {name: ogp, alpah_max: 0.3}", (), None, "alpah_max",
     "unknown key method.alpah_max; did you mean method.alpha_max?"),
    ("adam-betas-key", "  lr: 2.0e-4", "  lr: 2.0e-4\n  betas: [0.9, 0.99]", (), None, "betas:",
     "unknown key training.betas; did you mean training.adam_beta1 and training.adam_beta2?"),
    ("adam-beta2-range", "  lr: 2.0e-4", "  lr: 2.0e-4\n  adam_beta2: 1.0", (), None, "adam_beta2:",
     "training.adam_beta2 must be in [0, 1), got 1.0"),
    ("adam-eps-alias", "  lr: 2.0e-4", "  lr: 2.0e-4\n  eps: 1.0e-6", (), None, "eps:",
     "unknown key training.eps; did you mean training.adam_epsilon?"),
    ("wrong-type-number", "  lr: 2.0e-4", "  lr: fast", (), None, "lr: fast",
     "training.lr must be a number, got 'fast'"),
    ("wrong-type-bool", "  generate: false", "  generate: maybe", (), None, "generate",
     "eval.generate must be true or false, got 'maybe'"),
    ("wrong-type-list", "  target_modules: [q_proj, v_proj]", "  target_modules: q_proj", (), None,
     "target_modules", "lora.target_modules must be a list of strings, got 'q_proj'"),
    ("missing-data-file", "  - data/c.txt", "  - data/missing.txt", (), {"check_sources": True},
     "missing.txt", "domains[2].source: data path {tmp}/data/missing.txt does not exist; create it (a "
     "recipe's header says how) or fix the path; relative paths resolve against the recipe's folder; "
     "`lora-cl validate --no-data` checks the rest before the data exists"),
    ("empty-domains", "  - data/a.txt\n  - data/b.txt\n  - data/c.txt\n", "", (), None, "domains:",
     "domains is empty; list the stream, e.g. domains: [debian:kjv, qa:capitals, data/mine.jsonl]"),
    ("unknown-builtin-source", "  - data/b.txt", "  - debian:kvj", (), None, "debian:kvj",
     "domains[1].source: unknown text domain 'kvj'. Did you mean 'kjv'?"),
    ("lora-target-not-in-model", "[q_proj, v_proj]", "[q_proj, qproj]", (), {"check_model": True},
     "target_modules", "lora.target_modules: 'qproj' is not a linear layer of LlamaForCausalLM; did you "
     "mean q_proj? (linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
    ("unknown-method", "method: ogp", "method: ogpp", (), None, "method:",
     "method: unknown method 'ogpp'; did you mean 'ogp'?"),
    ("unknown-compare-method", "compare: [vanilla]", "compare: [vanila]", (), None, "compare:",
     "compare[0]: unknown method 'vanila'; did you mean 'vanilla'?"),
    ("replay-without-buffer", "method: ogp", "method: {name: replay, replay_fraction: 0.0}", (), None,
     "replay_fraction", "method: method 'replay': replay='mix' draws from a buffer of earlier domains' "
     "examples but replay_fraction is 0; set replay_fraction > 0, e.g. 0.005, or use a method without "
     "replay"),
    ("bf16-and-fp16", "  lr: 2.0e-4", "  lr: 2.0e-4\n  bf16: true\n  fp16: true", (), None, "fp16",
     "training.bf16 and training.fp16 are both true; set only one"),
    ("bad-trainer", "  lr: 2.0e-4", "  lr: 2.0e-4\n  trainer: sf", (), None, "trainer",
     "training.trainer must be one of trainer, sft, got 'sf'; did you mean sft?"),
    ("bad-quantization", "  name: tiny", "  name: tiny\n  quantization: 2bit", (), None, "quantization",
     "model.quantization must be one of null, 4bit, 8bit, got '2bit'"),
    ("bad-dtype", "  name: tiny", "  name: tiny\n  dtype: fp32", (), None, "dtype",
     "model.dtype must be one of float32, bfloat16, float16, got 'fp32'"),
    ("bad-metric", "  generate: false", "  generate: false\n  metric: bleu", (), None, "metric",
     "eval.metric must be one of auto, loss, exact_match, rougeL, got 'bleu'"),
    ("bad-nonfinite", "  lr: 2.0e-4", "  lr: 2.0e-4\n  nonfinite: ignore", (), None, "nonfinite",
     "training.nonfinite must be one of stop, skip, got 'ignore'"),
    ("zero-steps", "  steps_per_domain: 2", "  steps_per_domain: 0", (), None, "steps_per_domain",
     "training.steps_per_domain must be positive, got 0"),
    ("negative-probe-every", "  generate: false", "  generate: false\n  probe_every: -1", (), None,
     "probe_every", "eval.probe_every must be >= 0, got -1"),
    ("zero-batch", "  batch_size: 2", "  batch_size: 0", (), None, "batch_size",
     "training.batch_size must be positive, got 0"),
    ("zero-seq-len", "  seq_len: 32", "  seq_len: 0", (), None, "seq_len",
     "data.seq_len must be positive, got 0"),
    ("negative-domain-steps", "  - data/a.txt", "  - {source: data/a.txt, steps: -1}", (), None, "steps: -1",
     "domains[0].steps must be positive, got -1"),
    ("deepspeed-missing", "  lr: 2.0e-4", "  lr: 2.0e-4\n  deepspeed: ds/zero2.json", (),
     {"check_sources": True}, "deepspeed",
     "training.deepspeed: DeepSpeed config {tmp}/ds/zero2.json does not exist; point it at a JSON such "
     "as deepspeed_configs/zero2.json, or remove the key"),
    ("bad-state-bits", "  lr: 2.0e-4", "  lr: 2.0e-4\n  state_bits: 4", (), None, "state_bits",
     "training.state_bits must be one of 32, 8, got 4"),
    ("fsdp-and-deepspeed", "  lr: 2.0e-4", "  lr: 2.0e-4\n  fsdp: true\n  deepspeed: ds/zero2.json", (), None,
     "fsdp", "training.fsdp and training.deepspeed are both set; shard with one of them: remove "
     "training.deepspeed for FSDP2, or training.fsdp for DeepSpeed ZeRO"),
    ("yaml-syntax-error", "  r: 4", "  r: [4", (), None, "alpha: 8",
     "YAML syntax error: expected ',' or ']', but got ':' (while parsing a flow sequence at line 8); "
     "fix the indentation"),
    ("duplicate-yaml-key", "  r: 4", "  r: 4\n  r: 8", (), None, "r: 8", "lora.r is given twice; keep one"),
    ("duplicate-run-label", "compare: [vanilla]", "compare: [vanilla, ogp]", (), None, "compare:",
     "compare[1] runs as 'ogp', like method; give one of them a distinct `label:`"),
    ("duplicate-domain-name", "  - data/c.txt", "  - {source: data/c.txt, name: a}", (), None, "name: a",
     "domains[2] is named 'a', like domains[0]; give it a distinct `name:`"),
    ("hub-id-without-architecture", "  name: tiny", "  name: some-org/not-cached-model", (),
     {"check_model": True}, "not-cached",
     "model 'some-org/not-cached-model' is not a built-in model, a local directory or in the local "
     "Hugging Face cache; add model.architecture"),
    ("override-unknown-key", None, None, ("training.lrr=1e-4",), None, None,
     "(override 'training.lrr=1e-4'): unknown key training.lrr; did you mean training.lr?"),
    ("override-wrong-type", None, None, ("training.lr=fast",), None, None,
     "(override 'training.lr=fast'): training.lr must be a number, got 'fast'"),
    ("override-not-key-value", None, None, ("training.lr",), None, None,
     "(override 'training.lr'): an override is key=value; e.g. training.lr=1.0e-4 or method=vanilla"),
]


@pytest.mark.parametrize("old,new,overrides,kwargs,marker,expected",
                         [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_each_problem_is_one_line_naming_file_line_and_fix(tmp_path, old, new, overrides, kwargs, marker,
                                                          expected):
    text = BASE if old is None else BASE.replace(old, new, 1)
    assert old is None or text != BASE
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        recipe = load_recipe(path, overrides)
        check_recipe(recipe, **({"check_sources": False, "check_model": False} | (kwargs or {})))
    message = str(info.value)
    where = f"{path}:{_line(text, marker)}" if marker else f"{path} "
    assert "\n" not in message
    assert message.startswith(where), message
    assert expected.format(tmp=tmp_path) in message, message


def test_base_recipe_is_valid_and_typed(tmp_path):
    path = _write(tmp_path)
    recipe = load_recipe(path)
    notes = check_recipe(recipe)
    assert notes[0] == "3 domains: a, b, c"
    assert any("LlamaForCausalLM" in n and "LoRA wraps 4 linear layers" in n for n in notes)
    assert recipe.domains[0] == DomainConfig(source=str(tmp_path / "data" / "a.txt"))
    assert recipe.training.lr == 2e-4 and isinstance(recipe.training.lr, float)
    assert recipe.output_dir == "runs/recipe"
    assert recipe.source_path == str(path)
    assert [m.run_label for m in recipe.methods()] == ["ogp", "vanilla"]
    assert recipe.steps_for(1) == 2


def test_overrides_set_nested_keys_lists_and_method_fields(tmp_path, monkeypatch):
    path = _write(tmp_path)
    recipe = load_recipe(path, ["training.lr=1e-4", "method.alpha_max=0.3", "compare[0].label=plain",
                                "domains=[debian:kjv,qa:capitals]", "domains[1].steps=7",
                                "eval.generate=true"])
    assert recipe.training.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string; the schema wants a number
    assert recipe.method == MethodChoice("ogp", None, {"alpha_max": 0.3})
    assert recipe.method.spec().alpha_max == 0.3
    assert recipe.compare == [MethodChoice("vanilla", "plain", {})]
    assert recipe.domain_names() == ["kjv", "capitals"]
    assert [recipe.steps_for(i) for i in range(2)] == [2, 7]
    assert recipe.eval.generate is True
    # paths given on the command line resolve against the current directory, not the recipe's
    monkeypatch.chdir(tmp_path / "data")
    recipe = load_recipe(path, ["domains=[b.txt]"])
    assert recipe.domains[0].source == str(tmp_path / "data" / "b.txt")


def test_override_with_no_such_item_index(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(RecipeError, match=r"compare has no item \[3\] \(it has 1\)"):
        load_recipe(path, ["compare[3].label=x"])


def test_method_mappings_and_run_labels(tmp_path):
    text = BASE.replace("compare: [vanilla]", "compare: [vanilla, {name: gpm, routing: decoupled}, "
                        "{name: ogp, label: ogp-strong, alpha_max: 0.9}]")
    recipe = load_recipe(_write(tmp_path, text))
    labels = [m.run_label for m in recipe.methods()]
    assert labels == ["ogp", "vanilla", "gpm-routing=decoupled", "ogp-strong"]
    assert recipe.compare[1].spec().routing == "decoupled"
    assert recipe.compare[2].spec().alpha_max == 0.9
    assert MethodChoice("gpm", overrides={"routing": "decoupled", "alpha": 0.5}).run_label == (
        "gpm-alpha=0.5,routing=decoupled")
    with pytest.raises(RecipeError, match="unknown method 'nope'"):
        MethodChoice("nope").spec()


def test_round_trips_through_dict_and_yaml(tmp_path):
    text = BASE.replace("  - data/c.txt",
                        "  - {source: data/c.txt, name: cee, steps: 3, eval_source: data/a.txt}")
    text = text.replace("compare: [vanilla]", "compare: [vanilla, {name: gpm, routing: decoupled}]")
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe
    data = tmp_path / "data"
    assert recipe.domains[2] == DomainConfig(str(data / "c.txt"), "cee", 3, str(data / "a.txt"))


def test_recipe_from_dict_resolves_paths_against_base_dir_and_keeps_builtins(tmp_path):
    recipe = recipe_from_dict({"domains": ["debian:kjv", "mine/x.jsonl", {"source": "qa:capitals"}]},
                              base_dir=tmp_path)
    assert [d.source for d in recipe.domains] == ["debian:kjv", str(tmp_path / "mine/x.jsonl"), "qa:capitals"]
    assert recipe.domain_names() == ["kjv", "x", "capitals"]
    assert recipe.method.name == "ogp" and recipe.model.name == "smollm2-135m"
    with pytest.raises(RecipeError, match=r"^<dict>: unknown key trainig; did you mean training\?"):
        recipe_from_dict({"domains": ["debian:kjv"], "trainig": {}})


def test_quantization_with_float32_is_accepted_with_a_note(tmp_path):
    text = BASE.replace("  name: tiny", "  name: tiny\n  quantization: 4bit\n  dtype: float32")
    notes = check_recipe(load_recipe(_write(tmp_path, text)), check_model=False)
    assert any("4bit with dtype float32" in n for n in notes)


def test_lora_settings_make_a_peft_config(tmp_path):
    lora = load_recipe(_write(tmp_path)).lora
    config = lora.peft_config()
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    assert config.task_type == "CAUSAL_LM"


def test_model_config_from_local_dir_and_architecture(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path / "m")
    recipe = recipe_from_dict({"domains": ["debian:kjv"], "model": {"name": str(tmp_path / "m")},
                               "lora": {"target_modules": ["gate_proj"]}})
    assert model_config(recipe).hidden_size == 32
    assert "LoRA wraps 1 linear layers" in check_recipe(recipe)[-1]
    bad = recipe_from_dict({"domains": ["debian:kjv"], "model": {"name": "org/x",
                                                                 "architecture": {"model_type": "nope"}}})
    with pytest.raises(RecipeError, match="model.architecture is not a transformers config"):
        model_config(bad)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_checks_offline(path):
    assert path.read_text().startswith("#") and f"lora-cl train recipes/{path.name}" in path.read_text()
    recipe = load_recipe(path)
    notes = check_recipe(recipe, check_sources=False)
    assert recipe.output_dir == f"runs/{path.stem}"
    assert len(recipe.domains) in (3, 8) and "model " in notes[-1]


def test_tiny_recipe_data_exists_and_checks():
    recipe = load_recipe(RECIPES / "tiny.yaml")
    check_recipe(recipe, check_sources=True)
    assert recipe.domain_names() == ["cooking", "astronomy", "law"]
    for d in recipe.domains:
        lines = Path(d.source).read_text().splitlines()
        assert len(lines) >= 35 and all(line.strip() for line in lines)


def test_llama2_recipe_is_the_7b_model_on_the_meta_device():
    recipe = load_recipe(RECIPES / "llama2-7b-chat-trace.yaml")
    model = meta_model(recipe)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert next(model.parameters()).device.type == "meta"
    assert recipe.training.deepspeed is None  # routing under ZeRO is not built: one GPU by default
    assert recipe.domain_names()[0] == "C-STANCE" and recipe.steps_for(7) == 2000


def test_recipe_built_in_python_is_checked_too():
    recipe = Recipe(domains=[DomainConfig("debian:kjv")])
    recipe.training.bf16 = recipe.training.fp16 = True
    with pytest.raises(RecipeError, match=r"^<recipe>: training.bf16 and training.fp16 are both true"):
        check_recipe(recipe, check_model=False)


@pytest.mark.parametrize("name", ["replay", "agem"])
def test_replay_method_needs_a_buffer(name):
    assert resolve_method(name).replay_fraction > 0
    fix = "set replay_fraction > 0, e.g. 0.005, or use a method without replay"
    with pytest.raises(MethodError, match=fix):
        resolve_method(name, {"replay_fraction": 0.0})
