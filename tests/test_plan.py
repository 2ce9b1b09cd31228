"""The memory planner against exact counts, a real optimizer and saved activations; DeepSpeed configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from lora_cl.plan import (
    GIB,
    MemoryPlan,
    PlanInputs,
    activation_bytes_per_layer,
    count_parameters,
    plan_memory,
)

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "deepspeed_configs"
DS_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload")


@pytest.fixture(scope="module")
def llama2_7b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


def tiny_config(**kw) -> LlamaConfig:
    return LlamaConfig(**{"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
                          "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 1000, **kw})


def row(plan: MemoryPlan, name: str) -> int:
    return next(b for n, b, _ in plan.rows if n == name)


def test_llama2_7b_counts(llama2_7b):
    assert count_parameters(llama2_7b) == 6_738_415_616
    plan = plan_memory(llama2_7b, PlanInputs(lora_r=16))
    assert plan.n_params == 6_738_415_616
    assert plan.n_lora_params == 16_777_216


def test_llama2_7b_bf16_batch4_fits_24gb_with_checkpointing_and_8bit_states(llama2_7b):
    plan = plan_memory(llama2_7b, PlanInputs(batch_size=4, seq_len=2048, state_bits=8, gpu_mem_gb=24))
    assert plan.fits, plan.to_text()
    assert plan.advice == []
    assert plan.total_bytes == sum(b for _, b, _ in plan.rows)
    assert 18 * GIB < plan.total_bytes < 22 * GIB  # 20.1 GiB, of which 12.55 GiB bf16 weights


@pytest.mark.parametrize("batch", [1, 2])
def test_llama2_7b_4bit_fits_12gb_at_batch_1_and_2(llama2_7b, batch):
    plan = plan_memory(llama2_7b, PlanInputs(quantization="4bit", batch_size=batch, state_bits=8,
                                             gpu_mem_gb=12))
    assert plan.fits, plan.to_text()
    assert plan.total_bytes < 10 * GIB  # at batch 2: 8.9 GiB, 3 GiB headroom for what we do not model


def test_no_checkpointing_does_not_fit_and_advice_says_so(llama2_7b):
    plan = plan_memory(llama2_7b, PlanInputs(gradient_checkpointing=False, state_bits=8, gpu_mem_gb=24))
    assert not plan.fits
    assert plan.total_bytes > 40 * GIB
    assert "gradient_checkpointing" in plan.advice[0]
    assert all("fits" in a for a in plan.advice)
    assert "does NOT fit" in plan.to_text() and "| **total** |" in plan.to_markdown()


def test_base_weights_sharding_and_offload(llama2_7b):
    n = 6_738_415_616
    single = plan_memory(llama2_7b, PlanInputs())
    assert row(single, "base weights") == 2 * n
    zero3 = plan_memory(llama2_7b, PlanInputs(gpus=4, zero_stage=3))
    assert row(zero3, "base weights") == 2 * n // 4
    assert row(zero3, "optimizer states") == row(single, "optimizer states") // 4
    offload = plan_memory(llama2_7b, PlanInputs(gpus=2, zero_stage=2, offload=True))
    assert row(offload, "optimizer states") == 0
    assert any(name == "optimizer states" and b > 0 for name, b, _ in offload.cpu_rows)
    assert row(offload, "LoRA grads") == row(single, "LoRA grads") // 2
    zero3_off = plan_memory(llama2_7b, PlanInputs(gpus=2, zero_stage=3, offload=True))
    assert row(zero3_off, "base weights") == 0 and row(zero3_off, "optimizer states") == 0


def test_fsdp2_shards_what_zero3_shards(llama2_7b):
    """training.fsdp plans like ZeRO-3 (FSDP2 shards the base, LoRA, grads and states per
    parameter), labelled FSDP2; it excludes a ZeRO stage."""
    zero3 = plan_memory(llama2_7b, PlanInputs(gpus=2, zero_stage=3))
    fsdp = plan_memory(llama2_7b, PlanInputs(gpus=2, fsdp=True))
    assert fsdp.total_bytes == zero3.total_bytes and row(fsdp, "base weights") == row(zero3, "base weights")
    assert row(fsdp, "FSDP2 gathered layers") == row(zero3, "ZeRO-3 gathered layers") > 0
    single = plan_memory(llama2_7b, PlanInputs())
    assert row(fsdp, "base weights") == row(single, "base weights") // 2
    with pytest.raises(ValueError, match="fsdp and a ZeRO stage"):
        PlanInputs(gpus=2, fsdp=True, zero_stage=2)


def test_quantized_base_weights_are_smaller(llama2_7b):
    bf16 = row(plan_memory(llama2_7b, PlanInputs()), "base weights")
    int8 = row(plan_memory(llama2_7b, PlanInputs(quantization="8bit")), "base weights")
    nf4 = row(plan_memory(llama2_7b, PlanInputs(quantization="4bit")), "base weights")
    nf4_dq = row(plan_memory(llama2_7b, PlanInputs(quantization="4bit", double_quant=True)), "base weights")
    assert nf4_dq < nf4 < int8 < bf16
    linear = 6_476_005_376  # 32 layers x (4*4096^2 + 3*4096*11008)
    assert nf4 - nf4_dq == pytest.approx(linear * (0.5 - 0.127) / 8, rel=0.01)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_lora_bytes_match_a_real_optimizer_step(state_bits):
    """LoRA params, grads and AdamW state bytes equal what torch (or bitsandbytes 8-bit) holds."""
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    set_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    if state_bits == 32:
        opt = torch.optim.AdamW(params, lr=1e-3)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        opt = bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=4096)
    ids = torch.randint(0, config.vocab_size, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()

    plan = plan_memory(config, PlanInputs(lora_r=16, state_bits=state_bits))
    assert row(plan, "LoRA params") == sum(p.nbytes for p in params)
    assert row(plan, "LoRA grads") == sum(p.grad.nbytes for p in params)
    held = sum(t.nbytes for p in params for k, t in opt.state[p].items()
               if torch.is_tensor(t) and not k.startswith("qmap"))  # qmaps: one shared 1 KiB table
    if state_bits == 8:
        held += 4 * len(params)  # bitsandbytes counts steps in a Python int; ours is an fp32 tensor
    assert row(plan, "optimizer states") == held


@pytest.mark.parametrize(("kv_heads", "attention"), [(8, "sdpa"), (2, "sdpa"), (8, "eager")])
def test_activation_model_matches_saved_tensors(kv_heads, attention):
    """A_layer against the bytes autograd really saves for one decoder layer (bf16 autocast, CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def saved_bytes(layers: int) -> int:
        config = tiny_config(num_hidden_layers=layers, num_key_value_heads=kv_heads,
                             attn_implementation=attention)
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16),
                               LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        model.train()
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in frozen:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, 1000, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    measured = (saved_bytes(4) - saved_bytes(2)) / 2
    planned = activation_bytes_per_layer(tiny_config(num_key_value_heads=kv_heads),
                                         PlanInputs(batch_size=2, seq_len=64, attention=attention))
    assert planned == pytest.approx(measured, rel=0.05)


def test_bases_report_per_domain_and_merged(llama2_7b):
    plan = plan_memory(llama2_7b, PlanInputs(basis_rank=32, n_domains=8))
    # 128 lora_A tensors (16 x 4096) have fan_in 4096 > 32; lora_B (fan_in 16) gets no basis
    merged = row(plan, "subspace projector after 8 domains")
    assert merged == 128 * 4 * (4096 + 1) * 256
    per_domain = next(b for n, b, _ in plan.cpu_rows if n == "per-domain subspace bases")
    assert per_domain == 8 * 128 * 4 * 4096 * 32


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="state_bits"):
        PlanInputs(state_bits=16)
    with pytest.raises(ValueError, match="quantization"):
        PlanInputs(quantization="3bit")


@pytest.mark.parametrize("name", DS_CONFIGS)
def test_deepspeed_config_shape(name):
    config = json.loads((DS_DIR / f"{name}.json").read_text())
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_allow_untested_optimizer"] is True
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if name.startswith("zero3") else 2)
    offload = name.endswith("offload")
    assert ("offload_optimizer" in zero) == offload
    assert ("offload_param" in zero) == (name == "zero3_offload")
    if offload:
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    if zero["stage"] == 2:
        assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_scatter"]
    else:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["stage3_prefetch_bucket_size"] == "auto"


@pytest.fixture
def clean_process_group():
    """TrainingArguments(deepspeed=...) starts a 1-rank gloo group; leave none behind."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name", ["zero2", "zero3_offload"])
def test_training_arguments_fill_the_autos(name, tmp_path, monkeypatch, clean_process_group, master_port):
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_config(tiny_config())  # before: ZeRO-3 args make from_config shard
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master_port, "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(DS_DIR / f"{name}.json"),
                             use_cpu=True, per_device_train_batch_size=2, gradient_accumulation_steps=3,
                             max_grad_norm=0.5, bf16=False, report_to=[])
    hf_ds = args.hf_deepspeed_config
    config = hf_ds.config
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 6
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert hf_ds.is_zero3() == name.startswith("zero3")
    # the hidden-size autos (ZeRO-3 buckets) are filled once the Trainer sees the model
    hf_ds.trainer_config_finalize(args, model, num_training_steps=10)
    assert "auto" not in json.dumps(config)
    if name.startswith("zero3"):
        assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 256 * 256)


def test_fused_loss_row_and_advice_for_a_large_vocabulary():
    llama3 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    full = plan_memory(llama3, PlanInputs(batch_size=4, seq_len=2048, gpu_mem_gb=24))
    fused = plan_memory(llama3, PlanInputs(batch_size=4, seq_len=2048, gpu_mem_gb=24, loss="fused"))
    tokens, h = 4 * 2048, 4096
    assert row(full, "logits + loss") == 12 * tokens * 128256  # 11.7 GiB of b*s*V logits
    tile = 4096 * 32768 * 2
    assert row(fused, "logits + loss (fused LM head)") == 2 * tokens * h * 2 + 4 * tokens * h + tile
    assert not full.fits and fused.fits, (full.to_text(), fused.to_text())
    assert full.advice[0].startswith("training.fused_loss: true") and full.advice[0].endswith("fits")
    assert fused.total_bytes == full.total_bytes - row(full, "logits + loss") + row(
        fused, "logits + loss (fused LM head)")
    with pytest.raises(ValueError, match="loss must be"):
        PlanInputs(loss="chunked")


def test_fused_tiles_are_trls():
    """The planner's fused-head tile is trl's: a trl upgrade that changes it fails here."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from lora_cl.plan import FUSED_TOKEN_TILE, FUSED_VOCAB_TILE

    assert (FUSED_TOKEN_TILE, FUSED_VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


def test_read_zero_reads_stage_and_offload_from_a_path_or_a_dict(tmp_path):
    from lora_cl.dsconfig import ZeroSettings, read_zero

    configs = Path(__file__).resolve().parents[1] / "deepspeed_configs"
    assert read_zero(configs / "zero2.json") == ZeroSettings(stage=2, offload=False)
    assert read_zero(configs / "zero2_offload.json") == ZeroSettings(stage=2, offload=True,
                                                             optimizer_offload="cpu")
    assert read_zero(configs / "zero3_offload.json") == ZeroSettings(stage=3, offload=True,
                                                             optimizer_offload="cpu")
    assert read_zero({}) == ZeroSettings(stage=0, offload=False)
    none = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}}}
    assert read_zero(none) == ZeroSettings(stage=1, offload=False)
    assert read_zero({"zero_optimization": {"stage": 2, "offload_param": None}}) == ZeroSettings(2, False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError):
        read_zero(bad)
    with pytest.raises(OSError):
        read_zero(tmp_path / "missing.json")


def test_advice_offers_zero3_over_several_gpus_and_it_fits(llama2_7b):
    """Two 16 GiB cards, no ZeRO: the bf16 7B does not fit one of them; sharding the base with
    zero3.json (no quality cost) is offered, and fits, before 4-bit; on one GPU it is not offered."""
    two = plan_memory(llama2_7b, PlanInputs(gpus=2, gpu_mem_gb=16, loss="fused"))
    assert not two.fits
    zero3 = next(a for a in two.advice if "zero3.json" in a)
    assert "sharded over 2 GPUs" in zero3 and zero3.endswith("fits")
    assert two.advice.index(zero3) < next(i for i, a in enumerate(two.advice) if "4bit" in a)
    one = plan_memory(llama2_7b, PlanInputs(gpus=1, gpu_mem_gb=16, loss="fused"))
    assert not any("zero3" in a for a in one.advice)


def test_the_sharded_commands_on_the_memory_page_plan_what_its_table_says():
    """docs/memory.md's ZeRO-3 section (generated by benchmarks/plan_tables.py): each `lora-cl plan`
    command of a shipped recipe runs offline and prints the per-GPU total of its table row."""
    page = (ROOT / "docs" / "memory.md").read_text(encoding="utf-8")
    section = page.split("## Two GPUs, the base sharded (ZeRO-3)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"\| (\d+) x (\d+) \| [\d.]+ \| \*\*([\d.]+)\*\*", section)
    totals = {(int(gpus), int(mem)): total for gpus, mem, total in rows}
    commands = re.findall(r"^lora-cl plan (recipes/\S+\.yaml .*)$", section, re.M)
    assert len(commands) == 3 and len(totals) == 4
    for command in commands:
        args = command.split()
        gpus, mem = int(args[args.index("--gpus") + 1]), int(args[args.index("--gpu-mem") + 1])
        proc = subprocess.run([sys.executable, "-m", "lora_cl.cli", "plan", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        total = re.search(r"^total\s+([\d.]+) GiB", proc.stdout, re.M)
        assert total and total.group(1) == totals[gpus, mem], (command, proc.stdout[-1500:])
