"""Memory planner: bytes per GPU for LoRA finetuning of a real architecture, built on the meta device.

The model is instantiated with ``accelerate.init_empty_weights`` from its config and wrapped with
stock ``peft`` LoRA, so parameter counts and LoRA shapes are exact; only activations are a model.
Activations per decoder layer and token, compute dtype of d bytes (2 for bf16), HF implementation
with autocast, frozen base (frozen Linear layers save no input), as measured with saved-tensor hooks
(Korthikanti et al. 2022, "Reducing Activation Recomputation", adapted to LoRA + SwiGLU + GQA):

    A_layer = sum_norms 4*dim               RMSNorm keeps an fp32 copy of its input
            + sum_lora d*(fan_in + r)        each LoRA module saves its own cast input and A x
            + d*(2*a*hd + 2*kv*hd) + 4*a     SDPA/flash saves q, k, v, out and the logsumexp
            + 3*d*i (gated MLP) | d*i        act input, act output, up output
    eager attention adds 6*a*s per token (fp32 softmax + its bf16 copy), 8*a*s with logit softcapping.
    no checkpointing:   L * A_layer * b*s
    checkpointing:      L * d*h * b*s  (layer inputs)  +  A_layer * b*s  (one layer recomputed)
    loss, full:         12 * b*s*V  (+4 with final softcapping): bf16 logits, fp32 copy and
                        log-softmax in forward; log-softmax, its gradient and the input gradient
                        in backward (HF Trainer, ``training.fused_loss: false``).
    loss, fused:        2*b*s*h*d (labelled hidden states, their gradient cast back) + 4*b*s*h (fp32
                        hidden gradient) + one min(b*s, 4096) x min(V, 32768) tile of d bytes
                        (trl's SFTTrainer always; the Trainer with ``training.fused_loss: true``).
    Summing the rows is an upper bound: the loss peak and the layer recompute do not coincide.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

GIB = 1024**3
CUDA_OVERHEAD_BYTES = int(0.75 * GIB)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
NF4_BLOCK, STATE_BLOCK, BNB_MIN_8BIT_SIZE = 64, 256, 4096
#: trl's fused LM head (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE and
#: trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE; a test keeps them in step with trl)
FUSED_TOKEN_TILE, FUSED_VOCAB_TILE = 4096, 32768
Row = tuple[str, int, str]


@dataclass
class PlanInputs:
    """One training setup. ``gpu_mem_gb`` is in GiB, as cards are sold (a "24 GB" card = 24 GiB)."""

    lora_r: int = 16
    lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    quantization: str | None = None  # None | "4bit" | "8bit"
    dtype: str = "bfloat16"
    batch_size: int = 4
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    state_bits: int = 32  # 32 | 8
    basis_rank: int = 32
    n_domains: int = 8
    gpus: int = 1
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    offload: bool = False
    fsdp: bool = False  # FSDP2 (training.fsdp): shards like ZeRO-3 (base, LoRA, grads, states)
    gpu_mem_gb: float = 24.0
    attention: str = "auto"  # "auto" (sdpa; eager if the model softcaps attention logits) | "sdpa" | "eager"
    double_quant: bool = False  # nf4 double quantization; lora_cl.models.load_model leaves it off
    loss: str = "full"  # "full": b x s x V logits (HF Trainer) | "fused": trl's tiled LM head

    def __post_init__(self) -> None:
        checks = [(self.quantization in (None, "4bit", "8bit"),
                   "quantization must be None, '4bit' or '8bit'"),
                  (self.dtype in DTYPE_BYTES, f"dtype must be one of {sorted(DTYPE_BYTES)}"),
                  (self.state_bits in (8, 32), "state_bits must be 32 or 8"),
                  (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
                  (not (self.fsdp and (self.zero_stage or self.offload)),
                   "fsdp and a ZeRO stage (or offload) exclude each other"),
                  (self.attention in ("auto", "sdpa", "eager"), "attention must be auto, sdpa or eager"),
                  (self.loss in ("full", "fused"), "loss must be 'full' or 'fused'"),
                  (min(self.lora_r, self.batch_size, self.seq_len, self.gpus, self.n_domains) >= 1,
                   "lora_r, batch_size, seq_len, gpus and n_domains must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PlanInputs: {message}; got {self}")
        self.lora_targets = tuple(self.lora_targets)


@dataclass
class MemoryPlan:
    """Bytes per GPU by component; ``cpu_rows`` are host-resident (offload, per-domain bases)."""

    rows: list[Row]
    total_bytes: int
    gpu_mem_bytes: int
    fits: bool
    advice: list[str]
    n_params: int
    n_lora_params: int
    cpu_rows: list[Row] = field(default_factory=list)
    inputs: PlanInputs | None = None

    def _verdict(self) -> str:
        word = "fits" if self.fits else "does NOT fit"
        return f"{_gib(self.total_bytes)} GiB of {_gib(self.gpu_mem_bytes)} GiB per GPU: {word}"

    def to_markdown(self) -> str:
        lines = ["| component | GiB per GPU | how |", "|---|---:|---|"]
        lines += [f"| {name} | {_gib(b)} | {how} |" for name, b, how in self.rows]
        lines.append(f"| **total** | **{_gib(self.total_bytes)}** | |")
        lines += ["", f"Verdict: {self._verdict()}."]
        lines += [f"- CPU: {name}: {_gib(b)} GiB ({how})" for name, b, how in self.cpu_rows]
        lines += [f"- advice: {a}" for a in self.advice]
        return "\n".join(lines)

    def to_text(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{name:<{width}}  {_gib(b):>8} GiB  {how}" for name, b, how in self.rows]
        lines.append(f"{'total':<{width}}  {_gib(self.total_bytes):>8} GiB  {self._verdict()}")
        lines += [f"CPU: {name}: {_gib(b)} GiB ({how})" for name, b, how in self.cpu_rows]
        lines += [f"advice: {a}" for a in self.advice]
        return "\n".join(lines)


def _gib(b: int | float) -> str:
    return f"{b / GIB:.2f}"


@dataclass(frozen=True)
class _Anatomy:
    """What the planner needs from the meta model."""

    n_params: int
    linear_weights: tuple[tuple[int, int], ...]  # (out, in) of every Linear bitsandbytes quantizes
    other_params: int  # embeddings, norms, lm_head, biases: never quantized
    lora_shapes: tuple[tuple[int, int], ...]
    layer_norm_dims: tuple[int, ...]  # norms of one decoder layer
    layer_lora: tuple[tuple[int, int], ...]  # (fan_in, r) of the LoRA modules of one decoder layer
    layer_params: int
    gated_mlp: bool  # SwiGLU/GeGLU: gate_proj beside up_proj


def _meta_model(config: PretrainedConfig) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config skips tying on the meta device (Gemma would count lm_head twice)
    return model


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the architecture ``config`` describes (tied weights once), on the meta device."""
    return sum(p.numel() for p in _meta_model(config).parameters())


_ANATOMIES: dict[tuple[str, int, tuple[str, ...]], _Anatomy] = {}


def _anatomy(config: PretrainedConfig, inputs: PlanInputs) -> _Anatomy:
    key = (config.to_json_string(use_diff=False), inputs.lora_r, tuple(inputs.lora_targets))
    if key not in _ANATOMIES:  # ~1 s for a 7B model; advice re-plans many times
        _ANATOMIES[key] = _build_anatomy(config, inputs.lora_r, key[2])
    return _ANATOMIES[key]


def _build_anatomy(config: PretrainedConfig, r: int, targets: tuple[str, ...]) -> _Anatomy:
    from peft import LoraConfig, get_peft_model

    model = _meta_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linears = [(m.out_features, m.in_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    layers_name, layers = next((n, m) for n, m in model.named_modules()
                               if isinstance(m, torch.nn.ModuleList)
                               and len(m) == config.get_text_config().num_hidden_layers)
    norms = tuple(m.weight.numel() for m in layers[0].modules()
                  if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None)
    gated = any(n.rsplit(".", 1)[-1].startswith("gate") for n, _ in layers[0].named_modules())
    layer_params = sum(p.numel() for p in layers[0].parameters())
    with warnings.catch_warnings():  # peft asks a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=list(targets)))
    lora = [(n, tuple(p.shape)) for n, p in peft_model.named_parameters() if p.requires_grad]
    in_layer0 = re.compile(rf"\.{re.escape(layers_name)}\.0\.")
    layer_lora = tuple((s[1], s[0]) for n, s in lora if "lora_A" in n and in_layer0.search(n))
    return _Anatomy(n_params=n_params, linear_weights=tuple(linears),
                    other_params=n_params - sum(o * i for o, i in linears),
                    lora_shapes=tuple(s for _, s in lora), layer_norm_dims=norms,
                    layer_lora=layer_lora, layer_params=layer_params, gated_mlp=gated)


def _attention(config: PretrainedConfig, inputs: PlanInputs) -> str:
    if inputs.attention != "auto":
        return inputs.attention
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def activation_bytes_per_layer(config: PretrainedConfig, inputs: PlanInputs) -> int:
    """Bytes one decoder layer saves for backward at (batch_size, seq_len): A_layer * b*s (module doc)."""
    text = config.get_text_config()
    anatomy = _anatomy(config, inputs)
    d = DTYPE_BYTES[inputs.dtype]
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    hd = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = sum(4 * dim for dim in anatomy.layer_norm_dims)
    per_token += sum(d * (fan_in + r) for fan_in, r in anatomy.layer_lora)
    if _attention(config, inputs) == "eager":
        softcap = bool(getattr(text, "attn_logit_softcapping", None))
        per_token += d * 3 * heads * hd + (8 if softcap else 6) * heads * inputs.seq_len
    else:
        per_token += d * (2 * heads * hd + 2 * kv * hd) + 4 * heads
    per_token += (3 if anatomy.gated_mlp else 1) * d * text.intermediate_size
    return per_token * inputs.batch_size * inputs.seq_len


def _base_weight_row(anatomy: _Anatomy, inputs: PlanInputs) -> Row:
    d = DTYPE_BYTES[inputs.dtype]
    if inputs.quantization is None:
        return "base weights", d * anatomy.n_params, f"{d} B/param ({inputs.dtype})"
    linear = sum(o * i for o, i in anatomy.linear_weights)
    if inputs.quantization == "8bit":
        q = sum(o * i + 4 * o for o, i in anatomy.linear_weights)
        how = "LLM.int8: 1 B/param + fp32 absmax per output row"
    else:
        q = 0
        for o, i in anatomy.linear_weights:
            blocks = math.ceil(o * i / NF4_BLOCK)
            scales = blocks + 4 * math.ceil(blocks / 256) + 4 if inputs.double_quant else 4 * blocks
            q += math.ceil(o * i / 2) + scales
        scale = "double-quantized, ~0.127 bit/param" if inputs.double_quant else "fp32, 0.5 bit/param"
        how = f"nf4: 0.5 B/param + absmax per {NF4_BLOCK} ({scale})"
    other = anatomy.n_params - linear
    return ("base weights", q + 4 * other,
            f"{linear:,} Linear params {how}; {other:,} embedding/norm/lm_head params fp32 "
            "(prepare_model_for_kbit_training upcasts them)")


def _state_bytes(shapes: Sequence[tuple[int, ...]], bits: int) -> int:
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if bits == 8 and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * (n + 4 * math.ceil(n / STATE_BLOCK))
        else:
            total += 8 * n
        total += 4  # the fp32 step counter, one per tensor
    return total


def _bases(anatomy: _Anatomy, inputs: PlanInputs) -> tuple[int, int]:
    """(bytes of one domain's bases, bytes of the merged projector after n_domains), fp32."""
    k = inputs.basis_rank
    fan_ins = [s[-1] for s in anatomy.lora_shapes if len(s) == 2 and s[-1] > k]
    per_domain = sum(4 * f * k for f in fan_ins)
    merged = sum(4 * (f + 1) * min(f, k * inputs.n_domains) for f in fan_ins)
    return per_domain, merged


def plan_memory(config: PretrainedConfig, inputs: PlanInputs) -> MemoryPlan:
    """GPU bytes per component for ``inputs`` on the architecture of ``config``; advice if it won't fit."""
    plan = _plan(config, inputs)
    if not plan.fits:
        plan.advice = _advice(config, inputs)
    return plan


def _plan(config: PretrainedConfig, inputs: PlanInputs) -> MemoryPlan:
    text = config.get_text_config()
    anatomy = _anatomy(config, inputs)
    n, zero, off = inputs.gpus, 3 if inputs.fsdp else inputs.zero_stage, inputs.offload
    tag = "FSDP2" if inputs.fsdp else "ZeRO-3"  # (FSDP2 shards what ZeRO-3 does, per parameter)
    n_lora = sum(math.prod(s) for s in anatomy.lora_shapes)
    shard = lambda stage: n if zero >= stage else 1  # noqa: E731
    rows: list[Row] = []
    cpu: list[Row] = []

    name, base, how = _base_weight_row(anatomy, inputs)
    if zero == 3 and off:
        rows.append((name, 0, "ZeRO-3 offload_param: on CPU"))
        cpu.append((name, base // n, f"{how}; 1/{n} per rank"))
    else:
        rows.append((name, base // shard(3), how + (f"; {tag} / {n}" if shard(3) > 1 else "")))
    if zero == 3 and (n > 1 or off):
        live = 2 * base * anatomy.layer_params // anatomy.n_params
        rows.append((f"{tag} gathered layers", live, "current + prefetched decoder layer"))
    lora_p = 4 * n_lora
    if zero == 3 and off:
        rows.append(("LoRA params", 0, "fp32, offloaded"))
        cpu.append(("LoRA params", lora_p // n, "fp32"))
    else:
        rows.append(("LoRA params", lora_p // shard(3), f"fp32, {n_lora:,} params"))
    zero_tag = "FSDP2" if inputs.fsdp else "ZeRO"
    rows.append(("LoRA grads", lora_p // shard(2), "fp32" + (f", {zero_tag} / {n}" if shard(2) > 1 else "")))
    states = _state_bytes(anatomy.lora_shapes, inputs.state_bits)
    how = ("fp32 m and v: 8 B/param" if inputs.state_bits == 32 else
           f"8-bit blockwise m and v: 2 B/param + fp32 absmax per {STATE_BLOCK} "
           f"(tensors < {BNB_MIN_8BIT_SIZE} elements stay fp32)")
    if off and zero >= 1:
        rows.append(("optimizer states", 0, "offload_optimizer: on CPU"))
        cpu.append(("optimizer states", states // n, how))
    else:
        rows.append(("optimizer states", states // shard(1),
                     how + (f"; {zero_tag} / {n}" if shard(1) > 1 else "")))
    per_domain, merged = _bases(anatomy, inputs)
    rows.append((f"subspace projector after {inputs.n_domains} domains", merged,
                 f"fan_in x min(fan_in, {inputs.basis_rank}*T) fp32 per LoRA tensor with fan_in > "
                 f"{inputs.basis_rank}; {_gib(per_domain)} GiB per domain"))
    cpu.append(("per-domain subspace bases", per_domain * inputs.n_domains,
                f"{_gib(per_domain)} GiB per domain x {inputs.n_domains} (SubspaceBank keeps them on CPU)"))

    d, tokens = DTYPE_BYTES[inputs.dtype], inputs.batch_size * inputs.seq_len
    layer = activation_bytes_per_layer(config, inputs)
    layers = text.num_hidden_layers
    attn = _attention(config, inputs)
    if inputs.gradient_checkpointing:
        rows.append(("activations: checkpointed layer inputs", layers * d * text.hidden_size * tokens,
                     f"L*d*h*b*s = {layers}*{d}*{text.hidden_size}*{tokens}"))
        rows.append(("activations: one layer recomputed", layer, f"A_layer*b*s ({attn} attention)"))
    else:
        rows.append(("activations: all layers", layers * layer, f"L*A_layer*b*s ({attn} attention)"))
    if inputs.loss == "fused":
        h = text.hidden_size
        rows_, cols = min(tokens, FUSED_TOKEN_TILE), min(text.vocab_size, FUSED_VOCAB_TILE)
        rows.append(("logits + loss (fused LM head)", 2 * tokens * h * d + 4 * tokens * h + rows_ * cols * d,
                     f"2*b*s*h*d + 4*b*s*h + {rows_}x{cols} tile*d (trl's chunked log-probs: "
                     "no b*s*V logits)"))
    else:
        softcap = bool(getattr(text, "final_logit_softcapping", None))
        per_logit = 16 if softcap else 12
        rows.append(("logits + loss", per_logit * tokens * text.vocab_size,
                     f"{per_logit}*b*s*V, V={text.vocab_size}" + (" (+softcapping)" if softcap else "")))
    rows.append(("CUDA context + allocator", CUDA_OVERHEAD_BYTES, "assumption: 0.75 GiB"))
    total = sum(b for _, b, _ in rows)
    gpu = int(inputs.gpu_mem_gb * GIB)
    return MemoryPlan(rows=rows, total_bytes=total, gpu_mem_bytes=gpu, fits=total <= gpu, advice=[],
                      n_params=anatomy.n_params, n_lora_params=n_lora, cpu_rows=cpu, inputs=inputs)


def _changes(inputs: PlanInputs) -> list[tuple[str, dict]]:
    """Candidate changes, cheapest in quality and speed first."""
    out: list[tuple[str, dict]] = []
    if inputs.loss == "full":
        out.append(("training.fused_loss: true (the same loss through a tiled LM head)", {"loss": "fused"}))
    if not inputs.gradient_checkpointing:
        out.append(("turn on gradient_checkpointing", {"gradient_checkpointing": True}))
    if inputs.state_bits == 32:
        out.append(("state_bits 8 (8-bit optimizer states)", {"state_bits": 8}))
    if inputs.gpus > 1 and inputs.zero_stage < 3 and not inputs.offload and not inputs.fsdp:
        # no quality cost, unlike 4-bit: the frozen base sharded over the GPUs (routed methods and
        # the stream runner run under ZeRO-3; its forwards all-gather each layer)
        out.append((f"training.deepspeed: deepspeed_configs/zero3.json (the base sharded over {inputs.gpus} "
                    "GPUs; training.fsdp: true shards the same)", {"zero_stage": 3}))
    if inputs.quantization != "4bit":
        out.append(("4bit quantization of the base (QLoRA, nf4)", {"quantization": "4bit"}))
    b = inputs.batch_size // 2
    while b >= 1:
        factor = inputs.batch_size // b
        out.append((f"batch_size {b} with gradient_accumulation_steps x{factor} (same global batch)",
                    {"batch_size": b}))
        b //= 2
    s = inputs.seq_len // 2
    while s >= 256:
        out.append((f"seq_len {s} (changes what the model sees: longer texts are cut)", {"seq_len": s}))
        s //= 2
    return out


def _advice(config: PretrainedConfig, inputs: PlanInputs) -> list[str]:
    advice, ladders_done = [], set()
    for label, change in _changes(inputs):
        ladder = next(iter(change))  # batch_size and seq_len: only the largest value that fits
        if ladder in ladders_done:
            continue
        p = _plan(config, dataclasses.replace(inputs, **change))
        if p.fits:
            advice.append(f"{label}: {_gib(p.total_bytes)} GiB, fits")
            if ladder in ("batch_size", "seq_len", "gpus"):
                ladders_done.add(ladder)
    if advice:
        return advice
    current, steps = inputs, {}
    for label, change in _changes(inputs):  # no single change is enough: accumulate, in order
        trial = dataclasses.replace(current, **change)
        if _plan(config, trial).total_bytes < _plan(config, current).total_bytes:
            current = trial
            steps[next(iter(change))] = label  # a smaller batch replaces the larger one
            p = _plan(config, current)
            if p.fits:
                together = "; ".join(steps.values())
                return [f"no single change fits; together: {together}: {_gib(p.total_bytes)} GiB, fits"]
    sharded = (inputs.zero_stage == 3 or inputs.fsdp) and inputs.gpus > 1
    more = "" if sharded else "more GPUs (zero3.json shards the base over them) or "
    return [f"nothing in the planner's list makes it fit: use {more}larger GPUs"]
