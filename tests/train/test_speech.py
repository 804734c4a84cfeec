"""Speech students: the KD term is the zoo's divergence on decoder logits, the student is the teacher's layers,
training on pseudo-labels lowers the loss, and a run already done is not redone."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.data.audio import AudioRecord
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX, Divergence, per_token_divergence
from potstill.losses.sparse import topk_targets
from potstill.models.whisper import input_frames
from potstill.student.speech import init_speech_student, shrink_whisper, trainable_parameters
from potstill.teacher.speech import SpeechTargets, build_speech_targets, read_speech_targets, save_speech_targets
from potstill.train.speech import DONE, SpeechTrainConfig, decoder_batch, speech_kd_terms, train_speech_student
from speech_helpers import N_MELS, tiny_whisper, tiny_whisper_dir, write_wav

PROMPT = [257, 260]  # <|startoftranscript|> <|notimestamps|> of the tiny tokenizer
EOS = 256


def _teacher_targets(teacher, features, ids, k, temperature=1.0):
    """Per clip, the teacher's top-k targets along `prompt + ids + eos` (rows predicting each id and the end)."""
    out = []
    for b, seq in enumerate(ids):
        tokens = torch.tensor([PROMPT + seq + [EOS]])
        with torch.no_grad():
            logits = teacher(input_features=features[b : b + 1], decoder_input_ids=tokens).logits[0]
        out.append(topk_targets(logits[len(PROMPT) - 1 : len(PROMPT) + len(seq)], k, temperature))
    return out


@pytest.mark.parametrize("div", [Divergence("fkl"), Divergence("jsd", beta=0.3), Divergence("rkl", temperature=2.0)])
def test_kd_term_equals_zoo_divergence_on_decoder_logits(div):
    teacher, _ = tiny_whisper(seed=0)
    student = shrink_whisper(teacher, [1], [0], audio_seconds=1.0)
    torch.manual_seed(0)
    features = torch.randn(2, N_MELS, input_frames(teacher))
    ids = [[40, 41, 42], [50, 51, 52, 53, 54]]
    vocab = teacher.config.vocab_size
    targets = _teacher_targets(teacher, features, ids, vocab, div.temperature)  # k = V: the full distribution
    inputs, labels, tgt = decoder_batch(PROMPT, ids, targets, EOS)
    logits = student(input_features=features, decoder_input_ids=inputs).logits
    terms = speech_kd_terms(logits, tgt, labels, div)

    # By hand: the scored rows are the positions that predict each transcript token and the end token.
    with torch.no_grad():
        teacher_logits = teacher(input_features=features, decoder_input_ids=inputs).logits
    rows_s, rows_t = [], []
    for b, seq in enumerate(ids):
        span = slice(len(PROMPT) - 1, len(PROMPT) + len(seq))
        rows_s.append(logits[b, span])
        rows_t.append(teacher_logits[b, span])
    expected = per_token_divergence(torch.cat(rows_s), torch.cat(rows_t), div).sum() / (3 + 1 + 5 + 1)
    assert terms.n_tokens == 10
    assert torch.allclose(terms.kd, expected, rtol=1e-4, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(torch.cat(rows_s), torch.tensor([40, 41, 42, EOS, 50, 51, 52, 53, 54, EOS]))
    assert torch.allclose(terms.ce, ce, rtol=1e-5)
    terms.kd.backward()
    assert student.model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_decoder_batch_masks_prompt_and_padding():
    targets = [topk_targets(torch.randn(n + 1, 261), 4) for n in (2, 4)]
    inputs, labels, tgt = decoder_batch(PROMPT, [[40, 41], [50, 51, 52, 53]], targets, EOS)
    assert inputs.tolist() == [PROMPT + [40, 41, EOS, EOS, EOS], PROMPT + [50, 51, 52, 53, EOS]]
    assert labels[0].tolist() == [IGNORE_INDEX] * 2 + [40, 41, EOS] + [IGNORE_INDEX] * 2
    assert torch.equal(tgt.ids[1, 1:6], targets[1].ids)  # position 1 predicts the first transcript token
    assert tgt.ids[0, 4:].eq(0).all()


def test_student_is_teacher_layers_and_shorter_window():
    teacher, _ = tiny_whisper(seed=0, layers=2)
    same = shrink_whisper(teacher, [0, 1], [0, 1], audio_seconds=1.0)
    features = torch.randn(1, N_MELS, input_frames(teacher))
    tokens = torch.tensor([PROMPT + [40, 41]])
    with torch.no_grad():
        assert torch.equal(
            same(input_features=features, decoder_input_ids=tokens).logits,
            teacher(input_features=features, decoder_input_ids=tokens).logits,
        )
    small = shrink_whisper(teacher, [1], [0], audio_seconds=0.5)
    assert small.config.encoder_layers == small.config.decoder_layers == 1
    assert input_frames(small) == 50
    assert torch.equal(small.model.encoder.layers[0].fc1.weight, teacher.model.encoder.layers[1].fc1.weight)
    assert torch.equal(small.model.decoder.layers[0].fc1.weight, teacher.model.decoder.layers[0].fc1.weight)
    assert torch.equal(small.model.encoder.embed_positions.weight, teacher.model.encoder.embed_positions.weight[:25])
    assert small.proj_out.weight.data_ptr() == small.model.decoder.embed_tokens.weight.data_ptr()
    trained = {id(p) for p in trainable_parameters(small, freeze_encoder=True)}
    names = {n for n, p in small.named_parameters() if id(p) in trained}
    assert names and all(n.startswith("model.decoder.layer") for n in names)
    with pytest.raises(UserError, match="encoder_layers must be indices"):
        shrink_whisper(teacher, [2], [0], 1.0)
    with pytest.raises(UserError, match="audio_seconds"):
        shrink_whisper(teacher, [0], [0], 2.0)


@pytest.mark.parametrize("freeze_encoder", [True, False])
def test_training_on_pseudo_labels_lowers_the_loss(tmp_path, freeze_encoder):
    teacher_dir = tiny_whisper_dir(tmp_path / "teacher")
    student_dir = init_speech_student(teacher_dir, tmp_path / "student", [0], [1], audio_seconds=1.0)
    records = [AudioRecord(str(write_wav(tmp_path / f"{i}.wav", 0.8, seed=i)), "x", "synthetic") for i in range(4)]
    ids = [[40 + i, 41, 42] for i in range(4)]
    teacher, _ = tiny_whisper(seed=0)
    features = torch.randn(4, N_MELS, input_frames(teacher))
    targets = SpeechTargets(records, ids, _teacher_targets(teacher, features, ids, 8), [0.0] * 4, 0, {})
    cfg = SpeechTrainConfig(alpha=0.5, epochs=15, batch_size=2, lr=3e-3, freeze_encoder=freeze_encoder)
    summary = train_speech_student(student_dir, targets, tmp_path / "run", cfg)
    assert summary["steps"] == 30
    assert summary["loss_last_epoch"] < 0.7 * summary["loss_first"]
    assert (tmp_path / "run" / DONE).is_file() and (tmp_path / "run" / "config.json").is_file()
    assert train_speech_student(student_dir, targets, tmp_path / "run", cfg) == summary  # done: not redone


def test_student_with_another_tokenizer_is_refused(tmp_path):
    from potstill.teacher.cache.format import tokenizer_fingerprint
    from speech_helpers import tiny_whisper_tokenizer

    student_dir = tiny_whisper_dir(tmp_path / "student")
    tokenizer = tiny_whisper_tokenizer()
    tokenizer.add_tokens(["<|other|>"])
    records = [AudioRecord(str(write_wav(tmp_path / "a.wav", 0.5)), "x")]
    targets = SpeechTargets(records, [[40]], [topk_targets(torch.randn(2, 261), 4)], [0.0], 0, {})
    targets.meta["tokenizer"] = tokenizer_fingerprint(tokenizer)
    with pytest.raises(UserError, match="tokenizer is not the teacher's"):
        train_speech_student(student_dir, targets, tmp_path / "run", SpeechTrainConfig(epochs=1))
    assert not (tmp_path / "run").exists()


# ---- the teacher targets cache: safetensors + a verified manifest, no pickle ----


def _some_targets(tmp_path, temperature=2.0) -> SpeechTargets:
    """Three clips of 2, 0 and 3 transcript ids with random top-4 targets ([len + 1, 4] each)."""
    torch.manual_seed(0)
    ids = [[40, 41], [], [7, 8, 9]]
    records = [AudioRecord(str(tmp_path / f"{i}.wav"), f"text {i}", "synthetic") for i in range(3)]
    targets = [topk_targets(torch.randn(len(seq) + 1, 261), 4, temperature) for seq in ids]
    return SpeechTargets(records, ids, targets, [0.0, 0.5, 1.25], 2, {"k": 4, "temperature": temperature})


def test_speech_targets_round_trip_equal(tmp_path):
    saved = _some_targets(tmp_path)
    save_speech_targets(saved, tmp_path / "targets")
    assert sorted(p.name for p in (tmp_path / "targets").iterdir()) == ["manifest.json", "targets.safetensors"]
    read = read_speech_targets(tmp_path / "targets")
    assert (read.records, read.ids, read.wer, read.dropped, read.meta) == (
        saved.records,
        saved.ids,
        saved.wer,
        saved.dropped,
        saved.meta,
    )
    for a, b in zip(read.targets, saved.targets, strict=True):
        assert a.temperature == b.temperature == 2.0
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs) and torch.equal(a.tail, b.tail)
        assert a.ids.dtype == b.ids.dtype and a.logprobs.dtype == b.logprobs.dtype


def _truncate(d):
    path = d / "targets.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_bit(d):
    path = d / "targets.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data: the safetensors header still parses
    path.write_bytes(bytes(data))


def _edit_manifest(d):
    path = d / "manifest.json"
    path.write_text(path.read_text().replace('"dropped": 2', '"dropped": 0'))


def _foreign_manifest(d):
    (d / "manifest.json").write_text('{"format": "something else"}')


def _old_pickle(d):
    import shutil

    shutil.rmtree(d)
    d.write_bytes(b"\x80\x04pickled")  # a teacher_targets.pt of older potstill versions


@pytest.mark.parametrize(
    ("damage", "named", "words"),
    [
        (_truncate, "targets.safetensors", "truncated"),
        (_flip_bit, "targets.safetensors", "altered"),
        (_edit_manifest, "manifest.json", "checksum mismatch"),
        (_foreign_manifest, "targets", "not a potstill speech targets"),
        (_old_pickle, "targets", "not a potstill speech targets"),
    ],
)
def test_damaged_speech_targets_are_refused_in_one_line(tmp_path, damage, named, words):
    out = save_speech_targets(_some_targets(tmp_path), tmp_path / "targets")
    damage(out)
    with pytest.raises(UserError) as err:
        read_speech_targets(out)
    message = str(err.value)
    assert "\n" not in message and words in message and message.startswith(str(out))
    assert message.split(":")[0].endswith(named)


def test_builder_reuses_matching_targets_rebuilds_other_meta_and_refuses_damage(tmp_path, monkeypatch):
    import potstill.teacher.speech as speech

    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    runs = []

    def transcribe(model, processor, records, **_):  # a random tiny teacher never ends: fixed transcripts
        runs.append(len(records))
        ids = [[40 + i, 41] for i in range(len(records))]
        return ids, [torch.randn(len(seq) + 1, model.config.vocab_size) for seq in ids]

    monkeypatch.setattr(speech, "transcribe", transcribe)
    teacher_dir = tiny_whisper_dir(tmp_path / "teacher")
    records = [AudioRecord(str(write_wav(tmp_path / f"{i}.wav", 0.5, seed=i)), "(", "synthetic") for i in range(2)]
    out = tmp_path / "targets"
    built = build_speech_targets(teacher_dir, records, out, k=4, max_wer=float("inf"))
    assert built.ids == [[40, 41], [41, 41]] and all(t.k == 4 for t in built.targets) and runs == [2]
    reused = build_speech_targets(teacher_dir, records, out, k=4, max_wer=float("inf"))
    assert runs == [2] and reused.ids == built.ids  # the teacher did not run again
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(reused.targets, built.targets, strict=True))
    rebuilt = build_speech_targets(teacher_dir, records, out, k=3, max_wer=float("inf"))  # other meta: rebuilt
    assert runs == [2, 2] and read_speech_targets(out).meta["k"] == 3 and all(t.k == 3 for t in rebuilt.targets)
    _flip_bit(out)
    with pytest.raises(UserError, match="targets.safetensors: missing, truncated or altered"):
        build_speech_targets(teacher_dir, records, out, k=3, max_wer=float("inf"))


def test_no_pickle_loads_in_src_or_benchmarks():
    from pathlib import Path

    root = Path(__file__).parents[2]
    hits = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("src", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "weights_only=False" in line
    ]
    assert not hits, f"pickle loads of user files: {hits}"


def test_cache_verify_and_info_read_a_speech_targets_directory(tmp_path, run_main):
    """`potstill cache verify` / `cache info` recognise speech teacher targets (not "not a teacher cache manifest")."""
    out = save_speech_targets(_some_targets(tmp_path), tmp_path / "targets")
    verify = run_main("cache", "verify", out)
    assert verify.returncode == 0, verify.stderr
    assert (
        verify.stdout.startswith("ok: speech teacher targets, 3 clips, 8 target rows") and "k=4, T=2.0" in verify.stdout
    )
    info = run_main("cache", "info", out)
    assert info.returncode == 0 and json.loads(info.stdout)["records"] == "3 clips"
