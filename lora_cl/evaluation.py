"""Held-out scores of a model on each domain: token-weighted NLL / perplexity, and for Q/A tasks
exact match and ROUGE-L of greedy answers. Evaluation leaves the model, tokenizer and RNG as found.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from lora_cl.data.examples import IGNORE_INDEX, DomainData, pad_collate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def evaluate_domain(
    model: Any,
    data: DomainData,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    generate: bool = True,
    max_new_tokens: int = 32,
    across_ranks: bool = False,
) -> dict[str, float]:
    """``{"loss", "ppl", "n", "tokens"}`` on ``data.eval``, plus ``{"exact_match", "rougeL"}`` of
    greedy answers to ``data.eval_prompts`` when there are any and ``generate`` is set.

    loss = sum_i sum_t -log p(y_it | y_i<t) / (number of label tokens), over every predicted label
    (labels shifted by one, -100 ignored), so longer examples weigh more.

    Split across the ranks of a distributed run (each its share of the batches, the sums
    all-reduced, the answers gathered in order: one process's scores) when the model is sharded
    (ZeRO-3, FSDP2: its forwards are collective) or ``across_ranks`` is set; then every rank must
    call it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ranks = _eval_ranks(model, across_ranks)
    with _untouched(model, tokenizer):
        nll, tokens = _nll(model, data, tokenizer, batch_size, ranks)
        loss = nll / tokens if tokens else float("nan")
        result = {
            "loss": loss,
            "ppl": math.exp(loss) if tokens else float("nan"),
            "n": float(len(data.eval)),
            "tokens": float(tokens),
        }
        if generate and data.eval_prompts:
            answers = [p["answers"] for p in data.eval_prompts]
            predictions = _greedy(model, tokenizer, [p["prompt_ids"] for p in data.eval_prompts],
                                  batch_size, max_new_tokens, ranks)
            result["exact_match"] = sum(map(exact_match, predictions, answers)) / len(predictions)
            result["rougeL"] = sum(
                max(rouge_l(pred, ref) for ref in refs)
                for pred, refs in zip(predictions, answers, strict=True)
            ) / len(predictions)
    return result


def evaluate_all(
    model: Any, domains: Sequence[DomainData], tokenizer: Any, **kw: Any
) -> list[dict[str, float]]:
    """:func:`evaluate_domain` on each domain, in order (one row of the accuracy matrix R)."""
    return [evaluate_domain(model, data, tokenizer, **kw) for data in domains]


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, collapse spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalized words: P = LCS / |pred|, R = LCS / |ref|, F = 2PR / (P + R)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


@contextmanager
def _untouched(model: Any, tokenizer: Any) -> Iterator[None]:
    """Eval mode and no grad inside; every module's training flag, the tokenizer's padding side
    and the torch RNG state (CPU and the model's GPU) restored after."""
    modes = [(m, m.training) for m in model.modules()]
    padding_side = tokenizer.padding_side
    device = _device(model)
    gpus = [device.index or 0] if device.type == "cuda" else []
    try:
        # no_grad, not inference_mode: a layer that caches a tensor made here (quantized layers
        # do) would hand training an inference tensor, which autograd refuses
        with torch.random.fork_rng(devices=gpus), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        tokenizer.padding_side = padding_side


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _my_batches(n_batches: int, ranks: int, rank: int | None = None) -> list[int | None]:
    """The batch indices this rank evaluates when the model is sharded over ``ranks`` (ZeRO-3,
    FSDP2: every forward is collective, so every rank runs the same number): batch b goes to rank
    b mod ranks, and a rank short of one at the end runs a dummy (None). One rank: all of them."""
    if ranks == 1:
        return list(range(n_batches))
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank()
    rounds = -(-n_batches // ranks)
    return [b if (b := k * ranks + rank) < n_batches else None for k in range(rounds)]


def _my_starts(n_items: int, batch_size: int, ranks: int,
               collective: bool) -> Iterator[tuple[int | None, int]]:
    """(batch index, first item) of each batch this rank runs (:func:`_my_batches`); a dummy
    (None) repeats the last batch, and runs only where forwards are ``collective``."""
    n_batches = -(-n_items // batch_size)
    for b in _my_batches(n_batches, ranks):
        if b is None and not collective:
            continue  # (local forwards: no dummy needed)
        yield b, (b if b is not None else n_batches - 1) * batch_size


def _nll(model: Any, data: DomainData, tokenizer: Any, batch_size: int, ranks: int = 1) -> tuple[float, int]:
    """(summed NLL, number of predicted label tokens) over ``data.eval``. Split over ``ranks``
    ranks (each its share of the batches, the sums all-reduced): the same batches as one
    process, so the same sums up to their order."""
    collate, device = pad_collate(tokenizer), _device(model)
    n = len(data.eval)
    total, count = 0.0, 0
    for b, start in _my_starts(n, batch_size, ranks, _sharded_ranks(model) > 1):
        batch = collate(list(data.eval.select(range(start, min(start + batch_size, n)))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if b is None:
            continue
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    if ranks > 1:
        import torch.distributed as dist

        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total, count


def _greedy(model: Any, tokenizer: Any, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
            ranks: int = 1) -> list[str]:
    """Greedy continuations (first line, stripped) of left-padded prompt batches."""
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = {tokenizer.eos_token_id} - {None}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(config_eos) if isinstance(config_eos, list) else {config_eos} - {None}
    tokenizer.padding_side = "left"
    # under ZeRO-3 and FSDP2 each forward all-gathers the layers from every rank: a rank whose batch
    # stopped early must keep stepping until all have (transformers' synced_gpus), or the others
    # wait for ever
    synced = _sharded_ranks(model) > 1
    n_batches = -(-len(prompts) // batch_size)
    mine: dict[int, list[str]] = {}  # batch index -> its answers (this rank's share when split)
    for b, start in _my_starts(len(prompts), batch_size, ranks, synced):
        batch = tokenizer.pad({"input_ids": prompts[start : start + batch_size]}, return_tensors="pt")
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos) or None,
            synced_gpus=synced,
        )
        if b is None:
            continue
        answers = []
        for row in generated[:, input_ids.shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(text.splitlines()[0].strip() if text else "")
        mine[b] = answers
    if ranks > 1:  # every rank's answers, back in the batches' order
        import torch.distributed as dist

        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, mine)
        mine = {b: a for share in shares for b, a in share.items()}
    return [answer for b in range(n_batches) for answer in mine[b]]


def _eval_ranks(model: Any, across_ranks: bool) -> int:
    """How many ranks split an evaluation: the world when the model is sharded or it is asked for
    (and a process group is up), else 1."""
    if across_ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return _sharded_ranks(model)


def _sharded_ranks(model: Any) -> int:
    """The world size when ``model`` holds DeepSpeed ZeRO-3 or FSDP2 parameters, else 1."""
    from lora_cl.trainer.fsdp import is_fsdp2
    from lora_cl.trainer.zero3 import is_zero3

    if not (is_zero3(model.parameters()) or is_fsdp2(model.parameters())):
        return 1
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
