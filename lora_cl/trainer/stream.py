"""``run_stream(recipe)``: train one model through a stream of domains, once per method.

Per method, in ``<output_dir>/<label>/``: the base model is evaluated on every domain, then for
each domain a fresh Trainer (or trl SFTTrainer) sharing the model, the one RoutedAdamW and the
:class:`ContinualCallback` trains ``steps`` steps, the callback builds that domain's bases, the
model is evaluated on every domain (seen and unseen) and the domain directory is written
atomically. Trainer checkpoints every ``training.save_steps`` steps cover the middle of a
domain; ``resume=True`` restarts from the last complete domain directory and the newest marked
checkpoint after it, so a killed run finishes with the same adapters and scores.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_cl.optim import NonFiniteGradientError, RoutedAdamW
from lora_cl.optim.dtensor import full_state_dict
from lora_cl.paths import atomic_dir
from lora_cl.trainer.callback import ContinualCallback, attach
from lora_cl.trainer.checkpoints import (
    MARKER,
    CheckpointMarker,
    checkpoint_root,
    latest_checkpoint,
)
from lora_cl.trainer.fsdp import steps_fsdp2
from lora_cl.trainer.optimizer_factory import bank_of, make_optimizer
from lora_cl.trainer.run_files import (
    device,
    domain_dir,
    finished_domains,
    git_commit,
    now_iso,
    primary_metric,
    read_json,
    rebuild_matrices,
    versions,
    write_json,
)
from lora_cl.trainer.trainers import StreamError, make_trainer
from lora_cl.trainer.zero3 import gathered_trainable

Log = Callable[[str], None]
#: ``make(domain_index, domain_name) -> TrainerCallback``: one callback per domain's Trainer.
DomainCallbacks = Callable[[int, str], Any]
__all__ = ["StreamError", "is_main_process", "latest_checkpoint", "load_adapter", "load_general_data",
           "load_peft_model",
           "load_stream_data", "make_trainer", "run_method", "run_stream"]


def run_stream(recipe: Any, *, output_dir: str | os.PathLike[str] | None = None, resume: bool = False,
               progress: bool = True, log: Log | None = None,
               callbacks: Sequence[DomainCallbacks] = ()) -> list[Path]:
    """Run every method of ``recipe`` (``method`` then ``compare``) over its domains; return run dirs.

    Writes ``<output_dir>/<label>/`` per method, ``compare.json`` and the reports. With
    ``resume=True`` finished methods are kept and an interrupted one continues where it stopped.
    ``callbacks``: factories ``make(index, domain_name) -> TrainerCallback``; each domain's
    Trainer gets one callback from each (your own logging, early stopping, ...).
    """
    from lora_cl.report import write_comparison_report

    main = is_main_process()
    log = (log or _stderr) if main else _silent
    out = Path(output_dir if output_dir is not None else recipe.output_dir)
    choices = recipe.methods()
    data, _ = load_stream_data(recipe, log)
    runs: list[Path] = []
    for k, choice in enumerate(choices):
        run_dir = out / choice.run_label
        log(f"lora-cl: method {k + 1}/{len(choices)} {choice.run_label!r} -> {run_dir}")
        runs.append(run_method(recipe, choice, run_dir, data=data, resume=resume, progress=progress,
                               log=log, callbacks=callbacks))
        if main:
            write_json(out / "compare.json", {"runs": [r.name for r in runs]})
    if main:
        report = write_comparison_report(out, runs)
        log(f"lora-cl: report {report}")
    return runs


def is_main_process() -> bool:
    """Rank 0 of a torchrun/DeepSpeed launch (or no launcher): the process that writes run files.

    Every rank trains (the Trainer, DDP and DeepSpeed need them all); evaluation, domain
    directories, matrices and reports are rank 0's alone.
    """
    return int(os.environ.get("RANK", "0")) == 0


def _silent(message: str) -> None:
    del message


def load_stream_data(recipe: Any, log: Log | None = None) -> tuple[list[Any], Any]:
    """Tokenised train/eval data of every domain (built-in sources are built on first use)."""
    from lora_cl.data.examples import load_domain
    from lora_cl.models import load_tokenizer

    log = log or _stderr
    tokenizer = load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    data = []
    names = recipe.domain_names()
    for i, (domain, name) in enumerate(zip(recipe.domains, names, strict=True)):
        log(f"lora-cl: data {i + 1}/{len(names)} {name} <- {domain.source}")
        data.append(load_domain(domain.source, tokenizer, name=name, seq_len=recipe.data.seq_len,
                                train_examples=recipe.data.train_examples,
                                eval_examples=recipe.data.eval_examples, seed=recipe.data.seed,
                                eval_source=domain.eval_source, train_chars=recipe.data.train_chars,
                                eval_chars=recipe.data.eval_chars))
    return data, tokenizer


def load_general_data(recipe: Any, tokenizer: Any) -> Any:
    """The held-out examples of ``eval.general`` (None when the recipe has none)."""
    from lora_cl.data import resolve_source
    from lora_cl.data.examples import load_domain

    source = recipe.eval.general
    if source is None:
        return None
    d = recipe.data
    sizes = ({"train_chars": d.train_chars, "eval_chars": d.eval_chars}
             if resolve_source(source).kind == "text" else {})
    return load_domain(source, tokenizer, name="general", seq_len=d.seq_len, eval_examples=d.eval_examples,
                       seed=d.seed, **sizes)


def run_method(recipe: Any, choice: Any, run_dir: str | os.PathLike[str], *,
               data: Sequence[Any] | None = None, resume: bool = False, progress: bool = True,
               log: Log | None = None, callbacks: Sequence[DomainCallbacks] = ()) -> Path:
    """One method's stream into ``run_dir`` (see the module docstring); returns ``run_dir``.

    ``callbacks`` as in :func:`run_stream`. ``progress=False`` also silences transformers' own
    progress bars (a fully finetuned model's "Writing model shards" at every save) meanwhile.
    """
    with _progress_bars(progress):
        return _run_method(recipe, choice, run_dir, data=data, resume=resume, progress=progress,
                           log=log, callbacks=callbacks)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Any:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _run_method(recipe: Any, choice: Any, run_dir: str | os.PathLike[str], *,
                data: Sequence[Any] | None, resume: bool, progress: bool, log: Log | None,
                callbacks: Sequence[DomainCallbacks]) -> Path:
    from lora_cl.evaluation import evaluate_all
    from lora_cl.report import write_run_report

    main = is_main_process()
    log = (log or _stderr) if main else _silent
    run_dir = Path(run_dir)
    names = recipe.domain_names()
    if main:  # (another rank could see the run.json rank 0 has just written)
        _check_start(recipe, choice, run_dir, resume)
    if data is None:
        data, _ = load_stream_data(recipe, log)
    model, tokenizer = load_peft_model(recipe)
    spec = choice.spec()
    tr = recipe.training
    route = "linear" if recipe.model.finetune == "full" else "lora"
    optimizer = make_optimizer(model, spec, route=route, lr=tr.lr, weight_decay=tr.weight_decay,
                               betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_epsilon,
                               state_bits=tr.state_bits, min_8bit_size=tr.min_8bit_size,
                               nonfinite="raise" if recipe.training.nonfinite == "stop" else "skip")
    callback = ContinualCallback(seed=recipe.training.seed, probe_every=recipe.eval.probe_every)
    has_generation = recipe.eval.generate and all(d.eval_prompts for d in data)
    primary = primary_metric(recipe.eval.metric, has_generation)
    eval_kw = dict(batch_size=recipe.eval.batch_size, generate=recipe.eval.generate,
                   max_new_tokens=recipe.eval.max_new_tokens)
    # After each domain every rank of a distributed run scores its share of the held-out batches
    # (lora_cl.evaluation: sums all-reduced, answers gathered; under ZeRO-3 and FSDP2 each forward
    # is collective anyway); rank 0 alone writes. The base model, before any Trainer set up the
    # process group, is scored by rank 0 alone.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    evaluates = main or world > 1
    split = {"across_ranks": world > 1}
    general = load_general_data(recipe, tokenizer) if evaluates else None
    if main and not (run_dir / "base_eval.json").is_file():
        _write_run_json(recipe, choice, spec, run_dir, data, primary)
        log(f"lora-cl: [{choice.run_label}] evaluating the base model on {len(data)} domains"
            + (f" and the general set {recipe.eval.general}" if general is not None else ""))
        base = evaluate_all(model, data, tokenizer, **eval_kw)
        write_json(run_dir / "base_eval.json", {"domains": names, "eval": base,
                                                **_general_scores(model, general, tokenizer, eval_kw)})
    done = finished_domains(run_dir, names)
    if 0 < done < len(names):  # (with every domain done only the files below are rebuilt)
        _check_resumable(run_dir, names)
        _restore_domain(model, optimizer, callback, domain_dir(run_dir, done - 1, names[done - 1]))
        log(f"lora-cl: [{choice.run_label}] resuming after domain {done}/{len(names)} {names[done - 1]!r}")
    for i in range(done, len(names)):
        trained = _train_domain(recipe, choice, run_dir, i, model, tokenizer, optimizer, callback,
                                data, progress, log, callbacks)
        if not evaluates:
            continue  # the other ranks go on to the next domain's Trainer and wait for rank 0 there
        start = time.perf_counter()
        scores = evaluate_all(model, data, tokenizer, **eval_kw, **split)
        general_scores = _general_scores(model, general, tokenizer, {**eval_kw, **split})
        eval_seconds = time.perf_counter() - start
        # ZeRO-3 / FSDP2: the LoRA tensors whole for the leak and the save (after the forwards,
        # whose hooks would release them again); a collective, so every rank enters it, as it
        # does the whole optimizer state under FSDP2
        optimizer_state = full_state_dict(optimizer) if tr.fsdp else optimizer.state_dict()
        with gathered_trainable(model):
            if not main:
                continue
            leak = domain_leak(run_dir, i, names, optimizer, model)
            _save_domain(run_dir, i, names[i], model, optimizer, callback, optimizer_state,
                         {**trained, "eval_seconds": eval_seconds, "eval": scores,
                          "protection_leak": leak, **general_scores})
        shutil.rmtree(checkpoint_root(run_dir, i, names[i]), ignore_errors=True)
        rebuild_matrices(run_dir, names, primary)
        log(f"lora-cl: [{choice.run_label}] domain {i + 1}/{len(names)} {names[i]!r} done: "
            + _scores_line(scores, names, primary))
    if not main:
        return run_dir
    meta = read_json(run_dir / "run.json")
    meta["finished"] = meta.get("finished") or now_iso()
    write_json(run_dir / "run.json", meta)
    rebuild_matrices(run_dir, names, primary)
    write_run_report(run_dir)
    return run_dir


def _general_scores(model: Any, general: Any, tokenizer: Any, eval_kw: dict[str, Any]) -> dict[str, Any]:
    """``{"general": scores}`` of the eval.general set, or nothing when the recipe has none."""
    from lora_cl.evaluation import evaluate_domain

    return {} if general is None else {"general": evaluate_domain(model, general, tokenizer, **eval_kw)}


# -- one domain ----------------------------------------------------------------------------
def _train_domain(recipe: Any, choice: Any, run_dir: Path, i: int, model: Any, tokenizer: Any,
                  optimizer: RoutedAdamW, callback: ContinualCallback, data: Sequence[Any],
                  progress: bool, log: Log, callbacks: Sequence[DomainCallbacks] = ()) -> dict[str, Any]:
    """Train domain ``i`` (from its newest checkpoint, if any); return its record for metrics.json."""
    name = data[i].name
    ckpt_root = checkpoint_root(run_dir, i, name)
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:  # the callback's state as it was when that checkpoint was written
        callback.load_state_dict(read_json(latest / MARKER)["callback"])
        log(f"lora-cl: [{choice.run_label}] resuming domain {name!r} from {latest}")
    _supply_replay(recipe, model, tokenizer, optimizer, callback, data, run_dir)
    trainer = make_trainer(recipe, model, tokenizer, optimizer, data[i], ckpt_root,
                           steps=recipe.steps_for(i), seed=recipe.training.seed + i, progress=progress)
    trainer.add_callback(CheckpointMarker(callback, name))
    for make in callbacks:
        trainer.add_callback(make(i, name))
    attach(trainer, callback)
    callback.set_domain(name)
    log(f"lora-cl: [{choice.run_label}] domain {i + 1}/{len(data)} {name!r}: "
        f"{recipe.steps_for(i)} steps")
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(latest) if latest is not None else None)
    except NonFiniteGradientError as exc:
        good = latest_checkpoint(ckpt_root) or (domain_dir(run_dir, i - 1, data[i - 1].name) if i else None)
        raise StreamError(
            f"[{choice.run_label}] domain {name!r}, step {trainer.state.global_step + 1}: non-finite "
            f"loss or gradient ({exc}); stopped before it reached the optimizer states. Last good "
            f"checkpoint: {good or 'none (the base model)'}. Lower training.lr, keep "
            "training.max_grad_norm > 0, prefer bf16 to fp16, or set training.nonfinite=skip to "
            "skip such steps; then rerun with --resume") from exc
    return {"steps": trainer.state.global_step, "train_seconds": time.perf_counter() - start,
            "resumed_from": str(latest) if latest is not None else None,
            "log_history": [dict(h) for h in trainer.state.log_history]}












# -- domain directories -------------------------------------------------------------------
def _save_domain(run_dir: Path, i: int, name: str, model: Any, optimizer: RoutedAdamW,
                 callback: ContinualCallback, optimizer_state: dict[str, Any],
                 record: dict[str, Any]) -> None:
    target = domain_dir(run_dir, i, name)
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp / weights_dir_name(model)))
        bank = bank_of(optimizer)
        if bank is not None:
            bank.save(tmp / "bank.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        write_json(tmp / "callback.json", callback.state_dict())
        write_json(tmp / "metrics.json", {
            "domain": name, "index": i, "basis_seconds": callback.basis_build_seconds.get(name),
            "bases_added": callback.bases_added.get(name), **record})


def domain_leak(run_dir: Path, i: int, names: Sequence[str], optimizer: RoutedAdamW,
                model: Any = None) -> dict[str, float | None] | None:
    """The protection leak of domain ``i``'s update (see :func:`lora_cl.subspace.leak.protection_leak`).

    The update is the routed tensors now minus the previous domain's saved adapter (or model); the protected
    subspace is the bank as it stood when domain ``i`` began (the previous domain's bank file).
    None for the first domain and for methods without a bank. Under FSDP2 pass the ``model``:
    its trainable tensors whole (inside ``gathered_trainable``) stand for the optimizer's shards.
    """
    from safetensors.torch import load_file

    from lora_cl.subspace import SubspaceBank
    from lora_cl.subspace.leak import protection_leak

    if i == 0:
        return None
    prev = domain_dir(run_dir, i - 1, names[i - 1])
    if not (prev / "bank.safetensors").is_file():
        return None
    bank = SubspaceBank.load(prev / "bank.safetensors")
    before = load_file(str(saved_weights_file(prev)))
    deltas = {}
    named = zip(*optimizer.routed_named_params(), strict=True)
    if model is not None and steps_fsdp2(optimizer):
        named = _whole_named(model, optimizer)
    for name, p in named:
        key = name.replace(".default.", ".")  # peft saves adapter tensors without the adapter name
        if key in before:
            deltas[name] = p.detach().float().cpu() - before[key].float()
    return protection_leak(deltas, bank)


def _whole_named(model: Any, optimizer: RoutedAdamW) -> list[tuple[str, Any]]:
    """(name, tensor) of the optimizer's routed tensors as the model holds them now (whole inside
    ``gathered_trainable`` under FSDP2), matched by the parameters' names in the model."""
    held = dict(model.named_parameters())
    return [(n, held[n]) for n in optimizer.routed_named_params()[0]]


#: A domain directory's weights: a peft adapter (``adapter/``) or, under ``model.finetune: full``,
#: the whole model (``model/``, a transformers model directory ``from_pretrained`` loads).
WEIGHTS_DIRS = {"lora": "adapter", "full": "model"}
_WEIGHTS_FILES = {"adapter": "adapter_model.safetensors", "model": "model.safetensors"}


def weights_dir_name(model: Any) -> str:
    """``adapter`` for a peft model, ``model`` for a plain (fully finetuned) one."""
    from peft import PeftModel

    return WEIGHTS_DIRS["lora" if isinstance(model, PeftModel) else "full"]


def saved_weights_file(domain_dir_: Path) -> Path:
    """The safetensors file of a domain directory's saved adapter or model."""
    for sub, name in _WEIGHTS_FILES.items():
        if (domain_dir_ / sub / name).is_file():
            return domain_dir_ / sub / name
    raise FileNotFoundError(f"{domain_dir_} holds neither adapter/ nor model/ weights")


def load_adapter(model: Any, adapter_dir: str | os.PathLike[str]) -> None:
    """Load the weights ``save_pretrained`` wrote to ``adapter_dir`` into ``model``: a LoRA adapter
    into a peft model, or a whole model's weights (a ``model.finetune: full`` domain) into a plain one."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if not isinstance(model, PeftModel):
        _load_full_weights(model, Path(adapter_dir))
        return
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: an adapter is a directory written by "
                                "save_pretrained, e.g. runs/x/ogp/domains/00-kjv/adapter")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise StreamError(f"{adapter_dir}: adapter tensors {unexpected[:3]} do not fit this model; "
                          "the recipe's model or lora settings differ from the adapter's")


def _load_full_weights(model: Any, folder: Path) -> None:
    """A plain model's weights from ``folder/model.safetensors``; a key may be missing only when
    it is tied to one that is there (save_pretrained drops a tied LM head)."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: a fully finetuned domain's weights are a model "
                                "directory written by save_pretrained, e.g. runs/x/ogp/domains/00-kjv/model")
    state = load_file(str(weights))
    own = model.state_dict()
    wrong = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    if wrong:
        raise StreamError(f"{folder}: tensors {wrong[:3]} do not fit this model; the recipe's model "
                          "differs from the one that was saved")
    result = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if untied:
        raise StreamError(f"{folder}: {len(untied)} tensor(s) of the model are not in the saved "
                          f"weights ({', '.join(untied[:3])}); it was saved from another model")


def resume_gap(run_dir: str | os.PathLike[str], names: Sequence[str]) -> list[str]:
    """What an interrupted run lacks to resume after its last finished domain: the files of that
    domain's directory that a resume loads (its weights, ``optimizer.pt``, ``callback.json``) and
    that are gone, e.g. pruned by ``lora-cl reproduce`` or not kept by git. Empty when nothing is
    missing, when no domain has finished, or when every domain has."""
    run_dir = Path(run_dir)
    done = finished_domains(run_dir, names)
    if not done or done == len(names):
        return []
    ddir = domain_dir(run_dir, done - 1, names[done - 1])
    missing = [] if any((ddir / sub / f).is_file() for sub, f in _WEIGHTS_FILES.items()) \
        else ["adapter/ or model/ weights"]
    return missing + [f for f in ("optimizer.pt", "callback.json") if not (ddir / f).is_file()]


def _check_resumable(run_dir: Path, names: Sequence[str]) -> None:
    missing = resume_gap(run_dir, names)
    if missing:
        done = finished_domains(run_dir, names)
        raise StreamError(f"{run_dir}: cannot resume after domain {done}/{len(names)} {names[done - 1]!r}: "
                          f"its directory lacks {', '.join(missing)} (only its metrics were kept); delete "
                          f"{run_dir} to train this run again from the start")


def _restore_domain(model: Any, optimizer: RoutedAdamW, callback: ContinualCallback, ddir: Path) -> None:
    load_adapter(model, ddir / weights_dir_name(model))
    optimizer.load_state_dict(torch.load(ddir / "optimizer.pt", weights_only=True))
    callback.load_state_dict(read_json(ddir / "callback.json"))


def _supply_replay(recipe: Any, model: Any, tokenizer: Any, optimizer: RoutedAdamW,
                   callback: ContinualCallback, data: Sequence[Any], run_dir: Path) -> None:
    """After a resume, the replay buffer needs the earlier domains' training rows again."""
    missing = sorted({d for d, _ in callback.replay.entries} - set(callback.replay.datasets))
    by_name = {d.name: d for d in data}
    for name in missing:
        trainer = make_trainer(recipe, model, tokenizer, optimizer, by_name[name],
                               run_dir / "checkpoints" / "_replay", steps=1, seed=0, progress=False)
        callback.replay.datasets[name] = trainer.train_dataset


# -- start-up checks and metadata ------------------------------------------------------------
def _check_start(recipe: Any, choice: Any, run_dir: Path, resume: bool) -> None:
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        if resume and run_dir.exists() and any(run_dir.iterdir()):
            raise StreamError(f"{run_dir}: --resume given but there is no run.json; this is not a "
                              "lora-cl run directory (pass the --output the run was started with)")
        return
    if not resume:
        raise StreamError(f"{run_dir} already holds a run of {choice.run_label!r}; pass --resume to "
                          "continue it, or --output DIR (or --set output_dir=DIR) for a new run")
    saved = read_json(meta_path).get("recipe", {})
    now = _comparable(recipe.to_dict())
    before = _comparable(saved)
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        raise StreamError(f"{run_dir}: cannot resume, the recipe changed since the run started "
                          f"({', '.join(changed)}); restore those settings or start a new run with "
                          "--output DIR")


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """Top-level recipe sections that must not change across a resume.

    A section's keys missing from an older run.json take their defaults (a key added in a
    later lora-cl version, at its default, is not a change).
    """
    from dataclasses import asdict

    from lora_cl.recipe.schema import _SECTIONS

    out = {k: v for k, v in d.items() if k in ("domains", "model", "lora", "data", "training")}
    for key in ("model", "lora", "data", "training"):
        if isinstance(out.get(key), dict):
            out[key] = {**asdict(_SECTIONS[key]()), **out[key]}
    return out


def _write_run_json(recipe: Any, choice: Any, spec: Any, run_dir: Path, data: Sequence[Any],
                    primary: str) -> None:
    t = recipe.training
    world = int(os.environ.get("WORLD_SIZE", "1"))
    write_json(run_dir / "run.json", {
        "label": choice.run_label, "method": spec.to_dict(), "domains": recipe.domain_names(),
        "sources": [d.source for d in recipe.domains], "kinds": [d.kind for d in data],
        "data_fingerprints": {d.name: d.fingerprint for d in data},
        "model": recipe.model.name, "seed": t.seed, "world_size": world,
        "global_batch": t.batch_size * t.grad_accum * world,
        "steps_per_domain": [recipe.steps_for(i) for i in range(len(recipe.domains))],
        "primary": primary, "versions": versions(), "device": device(), "git_commit": git_commit(),
        "command": shlex.join(sys.argv), "started": now_iso(), "finished": None,
        "recipe": recipe.to_dict(),
    })


def load_peft_model(recipe: Any) -> tuple[Any, Any]:
    """The recipe's model and tokenizer: with its LoRA adapter (seeded init), or, when
    ``model.finetune`` is ``full``, the plain model with every weight trainable."""
    from peft import get_peft_model

    from lora_cl.models import load_model

    m = recipe.model
    dtype = getattr(torch, m.dtype)
    # under FSDP2 a 4-bit base is packed in the model's floating dtype, so fully_shard shards it
    # (accelerate leaves uint8-packed 4-bit weights whole on every rank)
    storage = {"quant_storage": dtype} if recipe.training.fsdp and m.quantization == "4bit" else {}
    model, tokenizer = load_model(m.name, dtype=dtype, trust_remote_code=m.trust_remote_code,
                                  quantization=m.quantization, **storage)
    if m.finetune == "full":
        model.requires_grad_(True)
    else:
        torch.manual_seed(recipe.training.seed)  # LoRA init
        model = get_peft_model(model, recipe.lora.peft_config())
    device = _accelerator(recipe)
    if device is not None:  # so the base-model evaluation runs there too, not on the CPU
        model.to(device)
    return model, tokenizer


def _accelerator(recipe: Any) -> torch.device | None:
    """The GPU this process's Trainer would move the model to, when it is safe to do so first.

    Quantized models are placed by their device map and DeepSpeed places its own engine's
    model, so those stay where they are.
    """
    if not torch.cuda.is_available() or recipe.model.quantization or recipe.training.deepspeed:
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _scores_line(scores: list[dict[str, Any]], names: Sequence[str], primary: str) -> str:
    key = primary if all(primary in s for s in scores) else "loss"
    return f"{key} " + " ".join(f"{n}={s[key]:.4g}" for n, s in zip(names, scores, strict=True))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)






