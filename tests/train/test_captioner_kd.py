"""Captioning / VQA KD: the tiny image-to-text model, the token-level KD loop, the same-tokenizer refusal."""

from __future__ import annotations

import pytest
import torch

from potstill.data.scenes import encode_example, make_scenes, pad_batch, scene_tokenizer
from potstill.errors import UserError
from potstill.losses import Divergence, kd_terms
from potstill.models.captioner import CaptionerConfig, TinyCaptioner, check_same_vocab
from potstill.train.captioner import fit_captioner, teacher_logits


@pytest.fixture(scope="module")
def data():
    tok = scene_tokenizer()
    pixels, examples = make_scenes(16, seed=0, size=32, questions_per_scene=1)
    enc = [encode_example(tok, e) for e in examples]
    ids, labels = pad_batch([i for i, _ in enc], 0), pad_batch([lab for _, lab in enc], -100)
    return tok, pixels, ids, labels, torch.tensor([e.scene for e in examples])


def _model(tok, width=32, seed=0, layers=1):
    torch.manual_seed(seed)
    return TinyCaptioner(
        CaptionerConfig(tok.get_vocab_size(), width, (8, 16), layers, 2, image_size=32), tok.get_vocab()
    )


def test_logits_are_causal(data):
    tok, pixels, ids, _, image = data
    model = _model(tok).eval()
    logits = model(pixels[image[:4]], ids[:4])
    assert logits.shape == (4, ids.shape[1], tok.get_vocab_size())
    changed = ids[:4].clone()
    changed[:, 5:] = 7  # later tokens do not change earlier positions' predictions
    torch.testing.assert_close(model(pixels[image[:4]], changed)[:, :5], logits[:, :5])


def test_ce_training_fits_and_is_seeded(data):
    tok, pixels, ids, labels, image = data
    runs = []
    for _ in range(2):
        model = _model(tok)
        runs.append(fit_captioner(model, pixels, image, ids, labels, None, Divergence(), 0.0, steps=20, batch_size=8,
                                  lr=3e-3, progress=False))  # fmt: skip
    assert runs[0] == runs[1]
    assert sum(runs[0][-5:]) / 5 < 0.75 * sum(runs[0][:5]) / 5


def test_kd_moves_the_student_toward_the_teacher(data):
    tok, pixels, ids, labels, image = data
    teacher = _model(tok, width=48, seed=1, layers=2)
    logits = teacher_logits(teacher, pixels, image, ids)
    div = Divergence("fkl", temperature=2.0)

    def kl(model):
        with torch.no_grad():
            return float(kd_terms(model(pixels[image], ids), logits, labels, div).kd)

    student = _model(tok)
    before = kl(student)
    history = fit_captioner(student, pixels, image, ids, labels, logits, div, 1.0, steps=30, batch_size=8, lr=3e-3,
                            progress=False)  # fmt: skip
    assert kl(student) < 0.5 * before
    assert history[0] == pytest.approx(4 * before, rel=0.5)  # alpha T^2 D at the first step


def test_generate_answers_with_vocabulary_ids(data):
    tok, pixels, ids, _, image = data
    model = _model(tok)
    out = model.generate(pixels[:2], [ids[0, :3].tolist(), ids[1, :3].tolist()], max_new=4)
    assert len(out) == 2 and all(len(o) <= 4 and all(0 <= t < tok.get_vocab_size() for t in o) for o in out)


def test_bad_inputs_are_one_line(data):
    tok, pixels, ids, labels, image = data
    other = dict(tok.get_vocab())
    other["giraffe"] = other.pop("circle")
    student = TinyCaptioner(CaptionerConfig(len(other), 32, (8, 16), image_size=32), other)
    with pytest.raises(UserError, match="tokenizer is not the teacher's") as err:
        check_same_vocab(_model(tok), student)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="needs teacher logits"):
        fit_captioner(_model(tok), pixels, image, ids, labels, None, Divergence(), 0.5, steps=1, progress=False)
    with pytest.raises(UserError, match="do not fit"):
        fit_captioner(_model(tok), pixels, image, ids, labels[:, :-1], None, Divergence(), 0.0, steps=1, progress=False)
