"""Token bytes, shared vocabulary and the teacher's tokenization of a student batch (data/tokenbytes, crossbatch)."""

from __future__ import annotations

import pytest
import torch

from potstill.data.crossbatch import CrossTokenizer, _utf8_cut
from potstill.data.packing import pack
from potstill.data.sources import Record
from potstill.data.tokenbytes import shared_vocab, special_map, token_byte_table
from potstill.errors import UserError
from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe

HARD = [
    "Hello wörld",
    "  two spaces, a tab\tand\nnew lines\n\n",
    "東京 and 😀 (never seen by the tokenizers)",
    "naïve café\r\n",
    "x",
]


@pytest.mark.parametrize("make", [byte_level_bpe, metaspace_bpe])
@pytest.mark.parametrize("text", HARD)
def test_table_spells_every_tokenization_back(make, text):
    tok = make()
    table = token_byte_table(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text.encode()


def test_table_special_tokens_and_spellings():
    a, m = byte_level_bpe(), metaspace_bpe()
    ta, tm = token_byte_table(a), token_byte_table(m)
    assert ta[a.bos_token_id] is None and tm[m.eos_token_id] is None and tm[m.pad_token_id] is None
    assert tm[m.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    assert tm[m.convert_tokens_to_ids("▁")] == b" " and ta[a.convert_tokens_to_ids("Ġ")] == b" "
    assert ta[a.convert_tokens_to_ids("Ċ")] == b"\n"


def test_shared_vocab_pairs_write_the_same_bytes():
    a, m = byte_level_bpe(), metaspace_bpe()
    s_ids, t_ids = shared_vocab(a, m)
    ta, tm = token_byte_table(a), token_byte_table(m)
    specials = special_map(a, m)
    assert specials[a.bos_token_id] == m.bos_token_id and specials[a.eos_token_id] == m.eos_token_id
    assert (
        a.bos_token_id != m.bos_token_id and a.eos_token_id != m.eos_token_id
    )  # other ids: mapped by role, not by id or string
    for s, t in zip(s_ids.tolist(), t_ids.tolist(), strict=True):
        assert ta[s] == tm[t] or specials.get(s) == t
    # the space is shared through "▁", not through the byte-fallback "<0x20>"
    assert t_ids[s_ids == a.convert_tokens_to_ids("Ġ")].item() == m.convert_tokens_to_ids("▁")
    assert len(set(t_ids.tolist())) == len(t_ids)


def test_same_tokenizer_shares_everything():
    a = byte_level_bpe()
    s_ids, t_ids = shared_vocab(a, a)
    assert s_ids.tolist() == t_ids.tolist() == list(range(len(a)))


def test_slow_tokenizer_is_refused_with_a_hint():
    class Slow:  # what a slow (Python) tokenizer lacks: a backend tokenizer and offsets
        name_or_path = "slow-tok"
        is_fast = False

    with pytest.raises(UserError, match="slow-tok: the teacher's tokenizer is a slow one.*tokenizer.json"):
        CrossTokenizer(byte_level_bpe(), Slow())
    with pytest.raises(UserError, match="slow-tok: cross-tokenizer work needs a fast tokenizer"):
        token_byte_table(Slow())


def test_utf8_cut():
    euro = "€".encode()  # 3 bytes
    assert _utf8_cut(b"abc") == (0, 0)
    assert _utf8_cut(euro[1:] + b"ab" + euro[:2]) == (2, 2)
    assert _utf8_cut(b"ab" + euro) == (0, 0)


def _groups_bytes(align, table_s, table_t, s_ids, t_ids):
    """Per group: (student bytes, teacher bytes) (specials as their ids)."""
    out = {}
    for side, group, ids, table in (
        (0, align.s_group, s_ids, table_s),
        (1, align.t_group, t_ids, table_t),
    ):
        for g, i in zip(group.tolist(), ids.tolist(), strict=True):
            entry = out.setdefault(g, [b"", b""])
            entry[side] += table[i] if table[i] is not None else b"<%d>" % side
    return out


@pytest.mark.parametrize("pair", ["bytelevel->metaspace", "metaspace->bytelevel"])
def test_teacher_batch_groups_write_the_same_bytes(pair):
    a, m = byte_level_bpe(), metaspace_bpe()
    student, teacher = (a, m) if pair.startswith("byte") else (m, a)
    data = pack([Record(text=t) for t in TEXTS + HARD], student, seq_len=32)
    ids, mask, labels = data.input_ids[:6], data.attention_mask[:6], data.labels[:6]
    cross = CrossTokenizer(student, teacher)
    t_ids, t_mask, align = cross.teacher_batch(ids, mask, labels)
    ts, tt = token_byte_table(student), token_byte_table(teacher)
    # the teacher reads the same text: its fed tokens spell each row's bytes
    for b in range(ids.shape[0]):
        s_text = b"".join(ts[i] for i in ids[b][mask[b] > 0].tolist() if ts[i] is not None)
        t_text = b"".join(tt[i] for i in t_ids[b][t_mask[b] > 0].tolist() if tt[i] is not None)
        assert s_text == t_text
    # every group holds the same bytes on both sides; specials pair by role
    for g, (s_bytes, t_bytes) in _groups_bytes(align, ts, tt, align.s_ids, align.t_ids).items():
        assert s_bytes.replace(b"<0>", b"") == t_bytes.replace(b"<1>", b""), g
    # rows, ids and flags index what they claim
    flat_s, flat_t = ids.reshape(-1), t_ids.reshape(-1)
    ok_t = align.t_ok
    assert (flat_t[align.t_rows[ok_t] + 1] == align.t_ids[ok_t]).all()
    assert (flat_s[align.s_rows + 1] == align.s_ids)[align.s_ok].all()
    assert align.s_ok.sum() == (labels[:, 1:] != -100).sum()


def test_window_cut_inside_a_character_is_a_placeholder():
    """A student row starting with the last bytes of a character (byte tokens): the teacher reads the valid middle,
    the cut bytes are in groups that are not scored."""
    m, a = metaspace_bpe(), byte_level_bpe()
    full = m("😀 ok", add_special_tokens=False)["input_ids"]
    assert m.convert_ids_to_tokens(full[:4]) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    row = torch.tensor([[m.bos_token_id, *full[2:]]])
    cross = CrossTokenizer(m, a)
    t_ids, _, align = cross.teacher_batch(row, None, row.clone())
    assert a.decode(t_ids[0].tolist(), skip_special_tokens=True) == " ok"
    scored, _ = align.scored_groups()
    cut = align.s_group[1:3]  # the two cut byte tokens
    assert not scored[cut].any() and scored[align.s_group[-1]]
