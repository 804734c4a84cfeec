"""Data: JSONL reading (one-line errors naming file:line) and packing (bos, masks, bytes, domains, padding)."""

import pytest
import torch

from potstill.data import IGNORE_INDEX, Record, collate, load_dataset, pack, read_jsonl
from potstill.data.packing import token_bytes
from potstill.errors import UserError

GOOD = {"text": "fine"}


# ----- reading --------------------------------------------------------------------------------------------------


def test_read_jsonl_records(write_jsonl):
    path = write_jsonl(
        "d.jsonl", [{"text": "héllo", "domain": "code", "id": 7}, "", {"prompt": "Q", "completion": "A"}]
    )
    text, pc = read_jsonl(path)
    assert (text.text, text.domain, text.line, text.path) == ("héllo", "code", 1, str(path))
    assert (pc.prompt, pc.completion, pc.domain, pc.line) == ("Q", "A", "default", 3)
    assert (text.context, text.scored, pc.context, pc.scored) == ("", "héllo", "Q", "A")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('["text"]', "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        ('{"domain": "x"}', 'missing field "text"'),
        ('{"text": 3}', 'field "text" must be a string, got a number'),
        ('{"text": null}', 'field "text" must be a string, got null'),
        ('{"text": "a", "domain": 1}', 'field "domain" must be a string'),
        ('{"text": "a", "domain": ""}', 'field "domain" is empty'),
        ('{"prompt": "a"}', 'missing field "completion"'),
        ('{"completion": "a"}', 'missing field "prompt"'),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "both"),
        ('{"text": "\\ud800"}', "unpaired surrogate"),
    ],
)
def test_bad_line_names_file_and_line(write_jsonl, line, needle):
    path = write_jsonl("bad.jsonl", [GOOD, "", line, GOOD])  # the blank line still counts
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and needle in message and "\n" not in message


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: not valid UTF-8"):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=rf"^{path}: no records"):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


# ----- byte attribution -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "offsets", "expected"),
    [
        ("ab cd", [(0, 2), (2, 5)], [2, 3]),
        ("ab cd", [(0, 2), (3, 5)], [2, 3]),  # a trimmed space goes to the next token
        ("ab  ", [(0, 2)], [4]),  # trailing text nothing covers goes to the last token
        ("é😀", [(0, 1), (1, 2), (1, 2), (1, 2)], [2, 4, 0, 0]),  # a character split into byte tokens counts once
        (" 😀x", [(0, 2), (1, 2), (2, 3)], [5, 0, 1]),  # overlapping spans
        ("", [], []),
    ],
)
def test_token_bytes_by_hand(text, offsets, expected):
    got = token_bytes(text, offsets)
    assert got.tolist() == expected and got.sum() == len(text.encode("utf-8"))


# ----- packing --------------------------------------------------------------------------------------------------


def _texts(n: int, corpus_word: str = "the quick brown fox") -> list[Record]:
    return [Record(text=f"{corpus_word} {i} " * (i % 4 + 1)) for i in range(n)]


def _content(tok, row: dict) -> list[int]:
    """The real tokens of a sequence, without its <bos> and padding."""
    n = int(row["attention_mask"].sum())
    return row["input_ids"][1:n].tolist()


def test_bos_every_window_labels_and_padding(tiny_tokenizer):
    ds = pack(_texts(12), tiny_tokenizer, seq_len=16)
    assert len(ds) > 3
    assert (ds.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert (ds.labels[:, 0] == IGNORE_INDEX).all()
    real = ds.attention_mask.bool()
    # text: every real token after <bos> is scored, padding never is
    assert torch.equal(ds.labels[:, 1:][real[:, 1:]], ds.input_ids[:, 1:][real[:, 1:]])
    assert (ds.labels[~real] == IGNORE_INDEX).all()
    assert real[:-1].all(), "only the last window may be padded"
    assert not real[-1].all() and (ds.input_ids[-1][~real[-1]] == tiny_tokenizer.pad_token_id).all()


def test_windows_concatenate_to_the_documents(tiny_tokenizer):
    records = _texts(7)
    ds = pack(records, tiny_tokenizer, seq_len=12)
    content = [t for row in ds for t in _content(tiny_tokenizer, row)]
    eos = tiny_tokenizer.eos_token_id
    expected = [t for r in records for t in tiny_tokenizer(r.text, add_special_tokens=False)["input_ids"] + [eos]]
    assert content == expected


def test_drop_last(tiny_tokenizer):
    records = _texts(12)
    kept, dropped = pack(records, tiny_tokenizer, 16), pack(records, tiny_tokenizer, 16, drop_last=True)
    assert len(dropped) == len(kept) - 1 and dropped.attention_mask.bool().all()
    assert torch.equal(dropped.input_ids, kept.input_ids[:-1])


def test_without_bos(tiny_tokenizer):
    ds = pack(_texts(6), tiny_tokenizer, seq_len=10, add_bos=False)
    assert (ds.input_ids[:, 0] != tiny_tokenizer.bos_token_id).all()
    assert (ds.labels[:, 0] == IGNORE_INDEX).all()  # nothing predicts the first token
    assert (ds.labels[:, 1:][ds.attention_mask[:, 1:].bool()] != IGNORE_INDEX).all()


def test_exact_bytes_with_non_ascii(tiny_tokenizer, tiny_corpus):
    texts = [Record(text=t) for t in tiny_corpus]
    records = texts + [Record(prompt="Frage: ", completion="Grüße aus 東京 😀")]
    for recs, seq_len in ((texts, 5), (texts, 13), (records, 64)):  # windows that cut characters and whole ones
        ds = pack(recs, tiny_tokenizer, seq_len)
        assert ds.truncated == 0
        assert int(ds.n_bytes.sum()) == sum(len(r.scored.encode("utf-8")) for r in recs)


def test_window_bytes_match_scored_ascii_text(tiny_tokenizer):
    ds = pack(_texts(9), tiny_tokenizer, seq_len=11)
    for row in ds:
        scored = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
        text = tiny_tokenizer.decode([t for t in scored if t != tiny_tokenizer.eos_token_id])
        assert int(row["n_bytes"]) == len(text.encode("utf-8"))


def test_completion_only_labels_and_whole_records(tiny_tokenizer):
    records = [Record(prompt=f"Question {i}: what is {i} + {i}?", completion=f" It is {2 * i}.") for i in range(6)]
    ds = pack(records, tiny_tokenizer, seq_len=48)
    assert ds.truncated == 0
    docs = {r.prompt + r.completion for r in records}
    completions = {r.completion for r in records}
    seen = []
    for row in ds:
        pieces = tiny_tokenizer.decode(_content(tiny_tokenizer, row)).split("<eos>")
        assert pieces[-1] == "" and set(pieces[:-1]) <= docs, "a record was split across windows"
        seen += pieces[:-1]
        scored = tiny_tokenizer.decode(row["labels"][row["labels"] != IGNORE_INDEX].tolist()).split("<eos>")
        assert set(scored[:-1]) <= completions, "only completions (and their <eos>) are scored"
    assert sorted(seen) == sorted(docs)
    assert int(ds.n_bytes.sum()) == sum(len(r.completion.encode()) for r in records)


def test_too_long_record_is_truncated_not_split(tiny_tokenizer):
    long = Record(prompt="a long prompt " * 20, completion=" and a long answer" * 20)
    ds = pack([Record(prompt="Q:", completion=" A"), long], tiny_tokenizer, seq_len=16)
    assert ds.truncated == 1 and len(ds) == 2
    row = ds[1]
    assert row["attention_mask"].all()
    completion_ids = tiny_tokenizer(long.completion, add_special_tokens=False)["input_ids"]
    scored = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
    assert scored == completion_ids[: len(scored)] and len(scored) == 15  # the completion alone fills the window


def test_domains_never_mixed_and_ordered(tiny_tokenizer):
    letters, digits = "abc de", "123 45"
    records = [Record(text=(letters if i % 3 else digits) * (i + 1), domain="w" if i % 3 else "n") for i in range(9)]
    ds = pack(records, tiny_tokenizer, seq_len=10)
    assert ds.domain_names == ["n", "w"]
    assert ds.domains == sorted(ds.domains)  # one contiguous block per domain
    for row in ds:
        text = tiny_tokenizer.decode(_content(tiny_tokenizer, row)).replace("<eos>", "")
        assert set(text) <= set(digits if row["domain"] == "n" else letters)


def test_deterministic_and_collate(tiny_tokenizer):
    records = _texts(8) + [Record(text="x y z", domain="other")]
    a, b = pack(records, tiny_tokenizer, 16), pack(records, tiny_tokenizer, 16)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and a.domains == b.domains
    batch = collate([a[0], a[len(a) - 1]])
    assert batch["input_ids"].shape == (2, 16) and batch["n_bytes"].shape == (2,)
    assert batch["domain"] == ["default", "other"]


def test_load_dataset_reads_files(tiny_tokenizer, write_jsonl):
    first = write_jsonl("a.jsonl", [{"text": "one two three", "domain": "a"}])
    second = write_jsonl("b.jsonl", [{"text": "four five", "domain": "b"}])
    ds = load_dataset([first, second], tiny_tokenizer, seq_len=32)
    assert ds.domain_names == ["a", "b"] and int(ds.n_bytes.sum()) == len("one two three") + len("four five")


def test_tokenizer_without_bos(make_tokenizer):
    tok = make_tokenizer()
    tok.bos_token = None
    with pytest.raises(UserError, match="no <bos>"):
        pack(_texts(2), tok, 16)
    ds = pack(_texts(2), tok, 16, add_bos=False)
    assert len(ds) > 1 and not (ds.input_ids == tok.convert_tokens_to_ids("<bos>")).any()
