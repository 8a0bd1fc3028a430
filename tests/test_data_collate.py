"""Tokenised records, the book's collate function and its prompt mask (chapter 7.3-7.4)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from instructune.data.collate import collate, make_collate
from instructune.data.dataset import TokenizedRecord, tokenize_records
from instructune.data.prompts import format_example
from instructune.tokenization.gpt2 import GPT2Tokenizer
from instructune.tokenization.hf import HFTokenizer


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_the_books_worked_example():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=50256)
    assert inputs.dtype == torch.long and inputs.device.type == "cpu"
    assert inputs.tolist() == [
        [0, 1, 2, 3, 4],
        [5, 6, 50256, 50256, 50256],
        [7, 8, 9, 50256, 50256],
    ]
    assert targets.tolist() == [
        [1, 2, 3, 4, 50256],
        [6, 50256, -100, -100, -100],
        [8, 9, 50256, -100, -100],
    ]


def test_tokenized_records_already_end_with_the_end_token():
    # The same batch as the book's, as TokenizedRecords that carry their end token (50256).
    items = [
        TokenizedRecord([0, 1, 2, 3, 4, 50256], 2),
        TokenizedRecord([5, 6, 50256], 1),
        TokenizedRecord([7, 8, 9, 50256], 1),
    ]
    book = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=50256)
    ours = collate(items, pad_id=50256)
    assert torch.equal(book[0], ours[0]) and torch.equal(book[1], ours[1])


def test_end_token_stays_a_target_when_pad_differs_from_eos():
    # SmolLM2-like: end token 2, pad 0. Masking is by position, so the end token is kept.
    inputs, targets = collate([TokenizedRecord([5, 6, 2], 1), TokenizedRecord([7, 2], 1)], pad_id=0)
    assert inputs.tolist() == [[5, 6], [7, 2]]
    assert targets.tolist() == [[6, 2], [2, -100]]
    # pad == end token and an end token inside the text: still by position.
    _, targets = collate([TokenizedRecord([5, 2, 6, 2], 1), TokenizedRecord([9, 2], 1)], pad_id=2)
    assert targets.tolist() == [[2, 6, 2], [2, -100, -100]]


def test_max_length_truncates_inputs_and_targets():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6]], pad_id=50256, max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_custom_ignore_index_and_partial():
    fn = make_collate(pad_id=9, ignore_index=-1)
    assert isinstance(fn, partial)
    _, targets = fn([[1, 2, 3], [4]])
    assert targets.tolist() == [[2, 3, 9], [9, -1, -1]]


def test_mask_prompt_supervises_from_the_first_response_token():
    # prompt = [10, 11, 12], response = [20, 21], end = 2
    item = TokenizedRecord([10, 11, 12, 20, 21, 2], prompt_len=3)
    other = TokenizedRecord([13, 22, 2], prompt_len=1)
    inputs, targets = collate([item, other], pad_id=2, mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 20, 21], [13, 22, 2, 2, 2]]
    assert targets.tolist() == [[-100, -100, 20, 21, 2], [22, 2, -100, -100, -100]]
    first = next(j for j, t in enumerate(targets[0].tolist()) if t != -100)
    assert inputs[0, first + 1].item() == 20  # the first supervised target is the response start
    with pytest.raises(ValueError, match="TokenizedRecord"):
        collate([[1, 2]], pad_id=0, mask_prompt=True)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


def test_tokenize_records_gpt2(gpt2, fixtures):
    records = json.loads((fixtures / "instructions-40.json").read_text())
    items = tokenize_records(records, gpt2)
    assert len(items) == 40
    for record, item in zip(records, items, strict=True):
        prompt, response = format_example(record)
        assert item.ids[-1] == 50256
        assert item.ids[: item.prompt_len] == gpt2.encode(prompt)
        assert gpt2.decode(item.ids[item.prompt_len : -1]) == response
    inputs, targets = collate(items[:4], pad_id=gpt2.pad_id, mask_prompt=True)
    for row, item in enumerate(items[:4]):
        supervised = [t for t in targets[row].tolist() if t != -100]
        assert supervised == item.ids[item.prompt_len :]


def test_tokenize_records_with_bos_and_chat_template(fixtures):
    base = HFTokenizer.from_directory(fixtures / "tiny-tokenizer")
    tok = HFTokenizer(
        base.raw,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        add_bos=True,
        chat_template=base.chat_template,
    )
    record = {"instruction": "What is 9 times 7?", "input": "", "output": "63."}
    [item] = tokenize_records([record], tok, "chat")
    prompt, response = format_example(record, "chat", chat_template=tok.chat_template)
    assert item.ids[0] == tok.bos_id and item.ids.count(tok.bos_id) == 1
    assert item.ids[-1] == tok.eos_id == 2
    assert item.prompt_len == 1 + len(tok.encode(prompt))
    assert tok.decode(item.ids[item.prompt_len : -1]) == response
    # A template that renders BOS text itself does not get a second one.
    bos_template = "{{ '<|endoftext|>' }}" + base.chat_template
    [item2] = tokenize_records([record], tok, "chat", chat_template=bos_template)
    assert item2.ids[0] == tok.bos_id and item2.ids.count(tok.bos_id) == 1


def test_book_data_lengths(gpt2, shared_data):
    records = json.loads((shared_data / "instruction-data.json").read_text())
    items = tokenize_records(records, gpt2)
    lengths = [len(i) for i in items]
    # Every record fits GPT-2's 1,024-token context, as the book's training relies on.
    assert max(lengths) < 1024 and min(lengths) > 30
