"""A speech student with a trimmed vocabulary: its tokenizer, weights and token ids are the teacher's restricted to
the kept ids, the teacher's cached targets map onto it renormalized, and the WER filter is applied on reading."""

from __future__ import annotations

import pytest
import torch

from potstill.data.audio import AudioRecord
from potstill.errors import UserError
from potstill.losses import Divergence, per_token_divergence
from potstill.losses.sparse import restrict_targets, sparse_divergence, topk_targets
from potstill.models.vocab import load_id_map
from potstill.models.whisper import decoder_prompt, greedy_decode, input_frames, load_whisper
from potstill.student.speech import init_speech_student
from potstill.teacher.speech import SpeechTargets, keep_clips
from potstill.train.speech import SpeechTrainConfig, for_student, train_speech_student
from speech_helpers import N_MELS, tiny_whisper_dir, write_wav


def _trimmed(tmp_path, text=" the to"):
    teacher_dir = tiny_whisper_dir(tmp_path / "teacher", layers=2, merges=True)
    teacher, processor = load_whisper(teacher_dir)
    ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    student_dir = init_speech_student(teacher_dir, tmp_path / "student", [0, 1], [0, 1], 1.0, corpus_ids=[ids])
    return teacher, processor.tokenizer, ids, student_dir


def test_trimmed_student_is_the_teacher_on_its_ids(tmp_path):
    teacher, teacher_tok, ids, student_dir = _trimmed(tmp_path)
    student, processor = load_whisper(student_dir)
    id_map = load_id_map(student_dir)
    tok = processor.tokenizer
    # Kept: the ids used (" the", " to") and their pieces (" t", " th"), the bytes, the specials; not kept:
    # " thing" and its pieces "in", "ing".
    assert len(id_map) == teacher.config.vocab_size - 3 == student.config.vocab_size
    dropped = set(range(teacher.config.vocab_size)) - set(id_map.tolist())
    assert {teacher_tok.convert_ids_to_tokens(i) for i in dropped} == {"in", "ing", "Ġthing"}
    assert [int(id_map[i]) for i in tok(" the to", add_special_tokens=False).input_ids] == ids
    # Token ids of the config follow the map; the prompt is the teacher's prompt renumbered.
    for name in ("eos_token_id", "decoder_start_token_id"):
        assert int(id_map[getattr(student.config, name)]) == getattr(teacher.config, name)
    assert [int(id_map[i]) for i in student.config.suppress_tokens] == teacher.config.suppress_tokens
    assert [int(id_map[i]) for i in student.config.begin_suppress_tokens] == teacher.config.begin_suppress_tokens
    teacher_prompt = decoder_prompt(teacher, teacher_tok)
    prompt = decoder_prompt(student, tok)
    assert [int(id_map[i]) for i in prompt] == teacher_prompt
    # All layers and the whole window: the student's logits are the teacher's at the kept ids.
    features = torch.randn(1, N_MELS, input_frames(teacher))
    with torch.no_grad():
        theirs = teacher(input_features=features, decoder_input_ids=torch.tensor([teacher_prompt + ids])).logits
        ours = student(input_features=features, decoder_input_ids=torch.tensor([prompt + [0, 1]])).logits
    assert torch.allclose(ours[0, :2], theirs[0, :2, id_map], atol=1e-5)
    out = greedy_decode(student, features, prompt, max_new_tokens=5)[0]
    assert tok.decode(out, skip_special_tokens=True) == teacher_tok.decode([int(id_map[i]) for i in out])


def test_restricted_targets_are_the_teacher_renormalized_over_the_students_ids():
    torch.manual_seed(0)
    teacher_logits, vocab = torch.randn(6, 40) * 3, 40
    id_map = torch.tensor(sorted(torch.randperm(vocab)[:25].tolist()))
    student_logits = torch.randn(6, 25)
    div = Divergence("fkl")
    full = restrict_targets(topk_targets(teacher_logits, vocab), id_map, vocab)  # k = V: nothing in the tail
    expected = per_token_divergence(student_logits, teacher_logits[:, id_map], div)
    assert torch.allclose(sparse_divergence(student_logits, full, div), expected, atol=1e-5)
    # Each row's ids stay distinct (the slots of lost ids get free student ids, with no teacher mass).
    assert full.k == 25 and all(len(set(row.tolist())) == 25 for row in full.ids)
    # Top 8: the kept mass and the tail sum to 1 again.
    some = restrict_targets(topk_targets(teacher_logits, 8), id_map, vocab)
    mass = some.logprobs.exp().sum(-1) + some.tail
    assert torch.allclose(mass, torch.ones(6), atol=1e-5)
    assert some.ids.max() < 25


def test_truncate_is_topk_at_smaller_k():
    logits = torch.randn(3, 5, 50)
    small, big = topk_targets(logits, 8), topk_targets(logits, 32).truncate(8)
    assert torch.equal(small.ids, big.ids) and torch.allclose(small.tail, big.tail, atol=1e-6)
    with pytest.raises(UserError, match="k must be in"):
        big.truncate(40)


def _targets(tmp_path, ids, vocab, wers=None):
    records = [AudioRecord(str(write_wav(tmp_path / f"{i}.wav", 0.8, seed=i)), "x") for i in range(len(ids))]
    tgt = [topk_targets(torch.randn(len(seq) + 1, vocab), 8) for seq in ids]
    return SpeechTargets(records, ids, tgt, wers or [0.0] * len(ids), 0, {})


def test_trimmed_student_trains_on_the_teachers_targets(tmp_path):
    teacher, teacher_tok, ids, student_dir = _trimmed(tmp_path)
    targets = _targets(tmp_path, [ids, ids[:2]], teacher.config.vocab_size)
    mapped = for_student(targets, student_dir)
    id_map = load_id_map(student_dir)
    assert [[int(id_map[i]) for i in seq] for seq in mapped.ids] == targets.ids
    summary = train_speech_student(student_dir, targets, tmp_path / "run", SpeechTrainConfig(epochs=2, batch_size=2))
    assert summary["steps"] == 2
    not_kept = teacher_tok.convert_tokens_to_ids("in")
    lacking = _targets(tmp_path, [[ids[0], not_kept]], teacher.config.vocab_size)
    with pytest.raises(UserError, match="lacks pseudo-label token"):
        for_student(lacking, student_dir)


def test_wer_filter_is_applied_on_reading(tmp_path):
    targets = _targets(tmp_path, [[40], [41], [42]], 64, wers=[0.0, 0.5, 0.1])
    kept = keep_clips(targets, 0.2)
    assert kept.ids == [[40], [42]] and kept.dropped == 1 and kept.meta["max_wer"] == 0.2
    with pytest.raises(UserError, match="WER <= -1.0"):
        keep_clips(targets, -1.0)
