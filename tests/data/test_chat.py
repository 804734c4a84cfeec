"""Chat records: parsing, rendering with the student's chat template, packing and on-policy prompt rows."""

from __future__ import annotations

import pytest
import torch

from chat_tokenizers import instruct, with_turn_tokens
from potstill.data import pack, read_jsonl
from potstill.data.chat import holds_chat, render_chat
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX
from potstill.train.on_policy import PromptDataset

CHAT = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"}]}


@pytest.fixture
def chat_tok(tiny_tokenizer):
    return instruct(tiny_tokenizer)


def test_chat_records_are_read_with_their_turns(write_jsonl):
    path = write_jsonl("chat.jsonl", [CHAT, {"prompt": "a", "completion": "b"}])
    chat, plain = read_jsonl(path)
    assert chat.messages == (("user", "the cat"), ("assistant", "sat on a mat")) and chat.prompt is None
    assert plain.messages is None and holds_chat([str(path)])
    assert not holds_chat([str(write_jsonl("plain.jsonl", [{"prompt": "a", "completion": "b"}]))])


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "at least 2 turns"),
        ({"messages": "hi"}, "at least 2 turns"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "assistant's turn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
            'messages[1]: missing field "content"',
        ),
        ({"messages": [{"role": "user", "content": "x"}, ["assistant", "y"]]}, "messages[1] must be an object"),
        ({**CHAT, "prompt": "p", "completion": "c"}, 'both "messages" and "prompt"'),
    ],
)
def test_bad_chat_rows_are_one_line_errors_with_file_and_line(write_jsonl, row, needle):
    path = write_jsonl("bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and needle in str(err.value) and "\n" not in str(err.value)


def test_render_applies_the_template_and_ends_at_the_end_of_turn(write_jsonl, chat_tok):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"]]}, {"text": "kept"}]
    chat, text = render_chat(read_jsonl(write_jsonl("c.jsonl", rows)), chat_tok)
    assert (
        chat.prompt
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.completion == "sat on a mat<|im_end|>" and chat.templated and chat.messages is None
    assert text.text == "kept" and not text.templated


def test_packed_chat_rows_score_the_answer_and_end_of_turn_without_eos(write_jsonl, chat_tok):
    ds = pack(read_jsonl(write_jsonl("c.jsonl", [CHAT])), chat_tok, seq_len=64)
    ids, labels = ds.input_ids[0], ds.labels[0]
    scored = labels[labels != IGNORE_INDEX].tolist()
    answer = chat_tok("sat on a mat", add_special_tokens=False)["input_ids"]
    assert scored == answer + [chat_tok.convert_tokens_to_ids("<|im_end|>")]  # no <eos> after the turn
    text = chat_tok.apply_chat_template([CHAT["messages"][0]], add_generation_prompt=True, tokenize=False)
    prompt = chat_tok(text, add_special_tokens=False)["input_ids"]
    assert prompt[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == chat_tok.bos_token_id and ids[1 : 1 + len(prompt)].tolist() == list(prompt)


def test_template_bos_is_not_doubled(write_jsonl, tiny_tokenizer):
    tok = instruct(tiny_tokenizer, template="{{ bos_token }}" + instruct(tiny_tokenizer).chat_template)
    ds = pack(read_jsonl(write_jsonl("c.jsonl", [CHAT])), tok, seq_len=64)
    assert ds.input_ids[0, 0] == tok.bos_token_id and ds.input_ids[0, 1] != tok.bos_token_id


def test_on_policy_prompt_rows_from_chat_records(write_jsonl, chat_tok):
    ds = PromptDataset([str(write_jsonl("c.jsonl", [CHAT, CHAT]))], chat_tok, seq_len=64, max_new_tokens=8)
    item = ds[0]
    n = int(item["prompt_len"])
    prompt = chat_tok.decode(item["input_ids"][1:n])
    assert prompt.endswith("<|im_start|>assistant\n") and "sat on" not in prompt
    assert torch.all(item["labels"][:n] == IGNORE_INDEX)
    assert chat_tok.decode(item["labels"][item["labels"] != IGNORE_INDEX]) == "sat on a mat<|im_end|>"


def test_chat_rows_need_a_template(write_jsonl, tiny_tokenizer):
    path = write_jsonl("c.jsonl", [{"text": "x"}, CHAT])
    with pytest.raises(UserError, match=r"c.jsonl:2: a chat record, but the student's tokenizer has no chat template"):
        pack(read_jsonl(path), with_turn_tokens(tiny_tokenizer), seq_len=64)


def test_a_template_that_cannot_render_a_record_names_it(write_jsonl, tiny_tokenizer):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    tok = instruct(tiny_tokenizer, template=strict + "{{ m['content'] }}<|im_end|>{% endfor %}")
    path = write_jsonl("c.jsonl", [{"messages": [{"role": "system", "content": "s"}, *CHAT["messages"]]}])
    with pytest.raises(UserError, match=r"c.jsonl:1: the chat template cannot render this record \(no system\)"):
        pack(read_jsonl(path), tok, seq_len=64)


def test_a_cut_answer_scores_no_end_token_and_an_ended_one_does(write_jsonl, chat_tok):
    cut = {**CHAT, "cut": True}
    rows = [cut, {"prompt": "the cat", "completion": " sat on a", "cut": True}, {"prompt": "a", "completion": " b"}]
    answer = chat_tok("sat on a mat", add_special_tokens=False)["input_ids"]
    scored = []
    for i, row in enumerate(rows):  # one row per pack: packing would put the three in one sequence
        labels = pack(read_jsonl(write_jsonl(f"c{i}.jsonl", [row])), chat_tok, seq_len=64).labels[0]
        scored.append(labels[labels != IGNORE_INDEX].tolist())
    assert scored[0] == answer  # neither <|im_end|> nor <eos> after the cut answer
    assert scored[1] == chat_tok(" sat on a", add_special_tokens=False)["input_ids"]
    assert scored[2][-1] == chat_tok.eos_token_id  # a row without "cut" still ends with its <eos>
    (rendered,) = render_chat(read_jsonl(write_jsonl("d.jsonl", [cut])), chat_tok)
    assert rendered.completion == "sat on a mat" and rendered.cut


def test_cut_must_be_a_boolean(write_jsonl):
    path = write_jsonl("bad.jsonl", [{**CHAT, "cut": "yes"}])
    with pytest.raises(UserError, match=rf'^{path}:1: field "cut" must be true or false, got a string$'):
        read_jsonl(path)
