"""evaluate_domain: token-weighted NLL, greedy-answer metrics, and no side effects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helpers
import pytest
import torch

from lora_cl.data.examples import load_domain
from lora_cl.evaluation import evaluate_all, evaluate_domain, exact_match, normalize_answer, rouge_l

QA = [
    {"prompt": "What is 0 plus 0?", "completion": "0.", "answers": ["0.", "zero"]},
    {"prompt": "Name two colours of the sky, please, in a short answer.", "completion": "red and blue"},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    return str(helpers.write_jsonl(path, rows))


@pytest.fixture
def qa_data(tmp_path: Path, tiny_factory: Any) -> Any:
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    return load_domain(path, tiny_factory()[1], seq_len=64, eval_source=path)


@pytest.fixture
def text_data(tmp_path: Path, tiny_factory: Any) -> Any:
    rows = [{"text": f"Line {i} of a small text about rivers, rain and hills."} for i in range(20)]
    return load_domain(write_jsonl(tmp_path / "text.jsonl", rows), tiny_factory()[1], seq_len=16)


class ScriptedReply(torch.nn.Module):
    """The tiny model, except that ``generate`` appends the same reply tokens to every prompt."""

    def __init__(self, model: Any, reply: list[int]) -> None:
        super().__init__()
        self.inner, self.reply, self.calls = model, reply, []
        self.generation_config = model.generation_config

    def forward(self, **kwargs: Any) -> Any:
        return self.inner(**kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append((input_ids, attention_mask, kwargs))
        reply = torch.tensor(self.reply).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, reply], dim=1)


def hand_loss(model: Any, rows: Any) -> tuple[float, int]:
    """Token-weighted mean of the model's own per-example loss (forward with labels, no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count, count


def test_loss_is_token_weighted_nll(qa_data: Any, text_data: Any, tiny_factory: Any) -> None:
    model, tokenizer = tiny_factory()
    lengths = {len(ids) for ids in qa_data.eval["input_ids"]}
    assert len(lengths) == 2  # padding and weighting both matter
    for data in (qa_data, text_data):
        expected, tokens = hand_loss(model, data.eval)
        result = evaluate_domain(model, data, tokenizer, batch_size=2, generate=False)
        assert result["loss"] == pytest.approx(expected, rel=1e-5)
        assert result["ppl"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
        assert (result["n"], result["tokens"]) == (len(data.eval), tokens)
        assert "exact_match" not in result
    one = qa_data.eval.select([0])
    single = evaluate_domain(
        model, type(qa_data)(**{**vars(qa_data), "eval": one}), tokenizer, generate=False
    )
    with torch.no_grad():
        direct = model(
            input_ids=torch.tensor([one[0]["input_ids"]]), labels=torch.tensor([one[0]["labels"]])
        ).loss.item()
    assert single["loss"] == pytest.approx(direct, rel=1e-5)


def test_generation_metrics_use_the_first_line_of_new_tokens(qa_data: Any, tiny_factory: Any) -> None:
    model, tokenizer = tiny_factory()
    reply = tokenizer(" The Blue, zero!\nignored second line", add_special_tokens=False)["input_ids"]
    scripted = ScriptedReply(model, reply + [tokenizer.eos_token_id])
    result = evaluate_domain(scripted, qa_data, tokenizer, batch_size=8, max_new_tokens=5)
    # prediction "blue zero": no exact match; ROUGE-L vs "zero" = 2/3, vs "red and blue" = 0.4
    assert result["exact_match"] == 0.0
    assert result["rougeL"] == pytest.approx((2 / 3 + 0.4) / 2)
    input_ids, attention_mask, kwargs = scripted.calls[0]
    short, long = (len(p["prompt_ids"]) for p in qa_data.eval_prompts)
    assert short < long and attention_mask[0].tolist() == [0] * (long - short) + [1] * short  # left padded
    assert input_ids[0, long - short :].tolist() == qa_data.eval_prompts[0]["prompt_ids"]
    assert kwargs["max_new_tokens"] == 5 and kwargs["do_sample"] is False
    assert (
        kwargs["pad_token_id"] == tokenizer.pad_token_id and tokenizer.eos_token_id in kwargs["eos_token_id"]
    )
    zero = ScriptedReply(model, tokenizer("Zero\n", add_special_tokens=False)["input_ids"])
    assert evaluate_domain(zero, qa_data, tokenizer)["exact_match"] == 0.5


def test_batched_greedy_generation_matches_one_by_one(qa_data: Any, tiny_factory: Any) -> None:
    model, tokenizer = tiny_factory()
    outputs: dict[int, list[list[int]]] = {}
    generate = model.generate

    def spy(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = generate(input_ids=input_ids, **kwargs)
        outputs.setdefault(input_ids.shape[0], []).extend(out[:, input_ids.shape[1] :].tolist())
        return out

    model.generate = spy
    for batch_size in (1, 2):
        evaluate_domain(model, qa_data, tokenizer, batch_size=batch_size, max_new_tokens=6)
    assert len(outputs[1]) == 2 and all(len(row) <= 6 for row in outputs[1])
    for alone, batched in zip(outputs[1], outputs[2]):
        assert batched[: len(alone)] == alone


def test_evaluation_has_no_side_effects(qa_data: Any, tiny_factory: Any) -> None:
    model, tokenizer = tiny_factory()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    tokenizer.padding_side = "right"
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    evaluate_domain(model, qa_data, tokenizer, max_new_tokens=3)
    assert [m.training for m in model.modules()] == modes
    assert tokenizer.padding_side == "right"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_works_on_a_peft_model(qa_data: Any, text_data: Any, tiny_factory: Any) -> None:
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny_factory()
    expected = evaluate_all(base, [qa_data, text_data], tokenizer, max_new_tokens=4)
    peft_model = get_peft_model(tiny_factory()[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    got = evaluate_all(peft_model, [qa_data, text_data], tokenizer, max_new_tokens=4)
    assert peft_model.training
    assert [set(r) for r in got] == [
        {"loss", "ppl", "n", "tokens", "exact_match", "rougeL"},
        {"loss", "ppl", "n", "tokens"},
    ]
    for mine, ref in zip(got, expected):  # LoRA B starts at zero: the same function as the base
        assert mine == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(
    ("text", "normal"),
    [("The  Cat, sat!", "cat sat"), ("an apple a day", "apple day"), ("Theatre", "theatre"), ("  ", "")],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_exact_match_and_rouge_l_by_hand() -> None:
    assert exact_match("The Paris.", ["paris", "Lutetia"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("", ["", "x"]) == 1.0
    # pred "cat sat on mat" vs ref "cat was on mat": LCS "cat on mat" = 3, P = R = 3/4
    assert rouge_l("The cat sat on the mat", "the cat was on the mat") == pytest.approx(0.75)
    # pred "red green blue" vs ref "blue red": LCS 1 ("red" or "blue"), P = 1/3, R = 1/2, F = 0.4
    assert rouge_l("red green blue", "blue red") == pytest.approx(0.4)
    assert rouge_l("red", "blue") == 0.0 and rouge_l("", "blue") == 0.0 and rouge_l("a", "the") == 1.0


def test_sharded_evaluation_splits_the_batches_evenly():
    """Under ZeRO-3 / FSDP2 each rank scores batch b with b mod ranks == rank; a rank short of one
    runs a dummy (None) so every rank runs the same number of (collective) forwards."""
    from lora_cl.evaluation import _my_batches

    shares = [_my_batches(5, 2, r) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3, None]]
    assert sorted(b for share in shares for b in share if b is not None) == list(range(5))
    assert [_my_batches(1, 3, r) for r in range(3)] == [[0], [None], [None]]
    assert _my_batches(4, 1) == [0, 1, 2, 3] and _my_batches(0, 2, 1) == []
