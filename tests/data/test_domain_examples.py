"""load_domain: text blocks, chat-templated Q/A pairs, held-out splits, errors, and trl compatibility."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import write_jsonl

from lora_cl.data.examples import DomainDataError, load_domain, pad_collate

SENTENCES = [f"Note {i}: the river rises after rain in the hills near town {i}." for i in range(40)]
QA = [(f"What is {i} plus {i}?", f"{2 * i}.") for i in range(20)]




@pytest.fixture
def tokenizer(tiny_factory: Any) -> Any:
    return tiny_factory()[1]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "notes.jsonl", [{"text": s} for s in SENTENCES])


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    rows = [{"prompt": p, "completion": c} for p, c in QA]
    rows[0]["answers"] = ["0.", "zero"]
    return write_jsonl(tmp_path / "sums.jsonl", rows)


def is_subsequence(items: list[Any], seq: list[Any]) -> bool:
    rest = iter(seq)
    return all(any(x == y for y in rest) for x in items)


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_text_blocks_eos_between_records_and_seeded_split(text_file: Path, tokenizer: Any) -> None:
    data = load_domain(str(text_file), tokenizer, seq_len=16, eval_examples=100)
    stream = []
    for i, s in enumerate(SENTENCES):
        stream += ([tokenizer.eos_token_id] if i else []) + tokenizer(s, add_special_tokens=False)[
            "input_ids"
        ]
    blocks = [stream[i : i + 16] for i in range(0, len(stream) - 15, 16)]
    assert data.name == "notes" and data.kind == "text" and data.eval_prompts == []
    assert all(row["labels"] == row["input_ids"] and len(row["input_ids"]) == 16 for row in data.train)
    train, held = list(data.train["input_ids"]), list(data.eval["input_ids"])
    assert len(held) == max(1, len(blocks) // 10) and len(train) + len(held) == len(blocks)
    assert sorted(train + held) == sorted(blocks)  # every block once, none in both splits
    assert is_subsequence(train, blocks)  # original order kept
    assert tokenizer.eos_token_id in sum(train, [])
    assert len(data.fingerprint) == 16 and int(data.fingerprint, 16) >= 0
    again = load_domain(str(text_file), tokenizer, seq_len=16, eval_examples=100)
    assert again.fingerprint == data.fingerprint
    assert load_domain(str(text_file), tokenizer, seq_len=16, seed=1).fingerprint != data.fingerprint


def test_train_and_eval_examples_are_seeded_nested_choices(text_file: Path, tokenizer: Any) -> None:
    full = load_domain(str(text_file), tokenizer, seq_len=8)
    few = load_domain(str(text_file), tokenizer, seq_len=8, train_examples=5, eval_examples=2)
    more = load_domain(str(text_file), tokenizer, seq_len=8, train_examples=10, eval_examples=2)
    other = load_domain(str(text_file), tokenizer, seq_len=8, train_examples=5, seed=3)
    all_train = list(full.train["input_ids"])
    assert len(few.train) == 5 and len(few.eval) == 2
    assert len(full.eval) == (len(full.train) + len(full.eval)) // 10  # all held-out blocks (< 16)
    picked = list(few.train["input_ids"])
    assert is_subsequence(picked, all_train)  # in source order
    assert is_subsequence(picked, list(more.train["input_ids"]))  # a larger choice contains it
    assert list(other.train["input_ids"]) != picked  # the seed matters
    assert load_domain(str(text_file), tokenizer, seq_len=8, train_examples=5).train["input_ids"] == picked
    assert few.raw_train["text"] == [tokenizer.decode(b) for b in picked]


def test_qa_labels_mask_the_chat_prompt(qa_file: Path, tokenizer: Any, tmp_path: Path) -> None:
    held_out = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "What is 1 plus 2?", "completion": "3."}])
    data = load_domain(str(qa_file), tokenizer, seq_len=64, eval_source=str(held_out))
    assert data.kind == "qa" and len(data.train) == len(QA) and len(data.eval) == 1
    end = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for (prompt, completion), row in zip(QA, data.train):
        prompt_ids = template_ids(tokenizer, [{"role": "user", "content": prompt}])
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + end
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["labels"] == [-100] * len(prompt_ids) + completion_ids
    assert data.eval_prompts == [
        {
            "prompt_ids": template_ids(tokenizer, [{"role": "user", "content": "What is 1 plus 2?"}]),
            "answers": ["3."],
        }
    ]
    assert data.raw_train[0] == {
        "prompt": [{"role": "user", "content": QA[0][0]}],
        "completion": [{"role": "assistant", "content": QA[0][1]}],
    }


def test_qa_seeded_split_keeps_answers(qa_file: Path, tokenizer: Any) -> None:
    data = load_domain(str(qa_file), tokenizer, seq_len=64)
    assert len(data.train) == 18 and len(data.eval) == 2 == len(data.eval_prompts)
    by_prompt = {tuple(template_ids(tokenizer, [{"role": "user", "content": p}])): c for p, c in QA}
    for item in data.eval_prompts:
        completion = by_prompt[tuple(item["prompt_ids"])]
        assert item["answers"] == (["0.", "zero"] if completion == "0." else [completion])
    train_prompts = {tuple(row["input_ids"][: row["labels"].count(-100)]) for row in data.train}
    assert not train_prompts & {tuple(p["prompt_ids"]) for p in data.eval_prompts}


def test_chat_records_use_the_last_assistant_turn(tmp_path: Path, tokenizer: Any) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 3)
    data = load_domain(str(path), tokenizer, seq_len=64)
    prompt_ids = template_ids(tokenizer, chat[:-1])
    row = data.train[0]
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert row["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert tokenizer.decode(row["labels"][len(prompt_ids) :]) == "Hello.<|im_end|>\n"
    assert data.eval_prompts[0]["answers"] == ["Hello."]
    assert data.raw_train[0] == {"prompt": chat[:-1], "completion": [chat[-1]]}


def test_long_prompt_is_cut_on_the_left(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "word " * 200 + "END?", "completion": "Yes."}] * 2
    )
    data = load_domain(str(path), tokenizer, seq_len=32)
    row = data.train[0]
    completion = tokenizer("Yes.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert len(row["input_ids"]) == 32 and row["input_ids"][-len(completion) :] == completion
    assert row["labels"] == [-100] * (32 - len(completion)) + completion
    assert "assistant" in tokenizer.decode(row["input_ids"])  # the prompt's end survives the cut
    assert len(data.eval_prompts[0]["prompt_ids"]) == 32


def test_no_chat_template_falls_back_to_question_answer(qa_file: Path, tokenizer: Any) -> None:
    tokenizer.chat_template = None
    data = load_domain(
        str(qa_file), tokenizer, seq_len=64, eval_source=str(qa_file)
    )  # no split: row 0 = QA[0]
    prompt_ids = tokenizer(f"Question: {QA[0][0]}\nAnswer:")["input_ids"]
    completion_ids = tokenizer(" " + QA[0][1], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert data.train[0]["labels"] == [-100] * len(prompt_ids) + completion_ids
    assert data.train[0]["input_ids"] == prompt_ids + completion_ids
    assert data.raw_train[0] == {"prompt": f"Question: {QA[0][0]}\nAnswer:", "completion": " " + QA[0][1]}


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([], {}, r"domain 'bad' \(.*bad.jsonl\) has no examples: add examples"),
        (
            [{"text": "short"}, {"text": "text"}],
            {},
            r"has 3 tokens, fewer than seq_len=128: lower data.seq_len",
        ),
        ([{"prompt": "a?", "completion": "b"}], {}, r"has 1 examples; .* needs at least 2: .*eval_source"),
        ([{"messages": [{"role": "user", "content": "hi"}]}] * 2, {}, r"must end with an assistant turn"),
        (
            [{"prompt": "a?", "completion": "b"}] * 2,
            {"eval_examples": 0},
            r"eval_examples must be at least 1",
        ),
    ],
)
def test_errors_name_the_domain_and_the_fix(
    tmp_path: Path, tokenizer: Any, rows: list[dict[str, Any]], kwargs: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DomainDataError, match=message) as info:
        load_domain(str(path), tokenizer, **kwargs)
    assert "'bad'" in str(info.value) and str(path) in str(info.value)


def test_pad_collate_right_pads_and_drops_other_columns(tokenizer: Any) -> None:
    collate = pad_collate(tokenizer, pad_to_multiple_of=4)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "x": 1},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    pad = tokenizer.pad_token_id
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad], [8, pad, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]


def sft_dataset(tiny_factory: Any, data: Any, seq_len: int, out: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = tiny_factory()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = SFTConfig(
        output_dir=str(out),
        max_steps=1,
        max_length=seq_len,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.raw_train, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1
    return trainer.train_dataset


def test_sft_trainer_tokenizes_raw_text_as_our_blocks(
    text_file: Path, tiny_factory: Any, tmp_path: Path
) -> None:
    data = load_domain(str(text_file), tiny_factory()[1], seq_len=16, train_examples=6)
    prepared = sft_dataset(tiny_factory, data, 16, tmp_path)
    # trl re-tokenizes the decoded block and appends eos, which the max_length cut drops again.
    assert prepared["input_ids"] == data.train["input_ids"]
    assert prepared["labels"] == data.train["labels"]


def test_sft_trainer_masks_the_prompt_like_we_do(qa_file: Path, tiny_factory: Any, tmp_path: Path) -> None:
    data = load_domain(str(qa_file), tiny_factory()[1], seq_len=64, train_examples=6)
    prepared = sft_dataset(tiny_factory, data, 64, tmp_path)
    # trl renders prompt + completion through the chat template and masks the common prefix with
    # the prompt-only rendering: the same tokens and the same -100 positions as ours.
    assert prepared["input_ids"] == data.train["input_ids"]
    assert prepared["labels"] == data.train["labels"]


@pytest.mark.slow
def test_real_debian_domains(tokenizer: Any) -> None:
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing dependency: debian:kjv and qa:capitals are built from Debian packages; "
                    f"{missing} not found")
    text = load_domain("debian:kjv", tokenizer, seq_len=128, train_examples=32)
    qa = load_domain("qa:capitals", tokenizer, seq_len=128, train_examples=32)
    assert (text.name, text.kind, len(text.train), len(text.eval)) == ("kjv", "text", 32, 16)
    assert all(len(ids) == 128 for ids in text.train["input_ids"])
    assert (qa.name, qa.kind, len(qa.train), len(qa.eval)) == ("capitals", "qa", 32, 16)
    assert all(-100 in labels and labels[-1] != -100 for labels in qa.train["labels"])
    assert len(qa.eval_prompts) == 16 and all(p["answers"] for p in qa.eval_prompts)
