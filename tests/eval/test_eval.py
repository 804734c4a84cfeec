"""Metrics against hand computations in float64: ppl, bpb, agreement, KL, token weighting; the tokenizer check."""

import math

import pytest
import torch

from potstill.data import IGNORE_INDEX, Record, pack
from potstill.errors import UserError
from potstill.eval import metrics as eval_metrics
from potstill.eval.metrics import evaluate, evaluate_models
from potstill.teacher.online import OnlineTeacher, check_tokenizers


@pytest.fixture
def two_domains(tiny_tokenizer, tiny_corpus):
    """A small domain (1 text) and a large one (the whole corpus plus a prompt/completion record)."""
    records = [Record(text="tiny domain", domain="small")] + [Record(text=t, domain="big") for t in tiny_corpus]
    records.append(Record(prompt="Q: two plus two?", completion=" A: four.", domain="big"))
    return pack(records, tiny_tokenizer, seq_len=24)


@torch.no_grad()
def _reference(model, dataset, teacher=None) -> dict:
    """Per-domain float64 sums from a plain forward of each sequence: nll, tokens, bytes, agree, kl."""
    sums = {}
    for row in dataset:
        ids, mask = row["input_ids"][None], row["attention_mask"][None]
        logq = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0, :-1].double(), -1)
        targets = row["labels"][1:]
        keep = targets != IGNORE_INDEX
        s = sums.setdefault(row["domain"], dict(nll=0.0, tokens=0, bytes=0, agree=0.0, kl=0.0))
        s["nll"] += float(-logq[keep].gather(1, targets[keep, None]).sum())
        s["tokens"] += int(keep.sum())
        s["bytes"] += int(row["n_bytes"])
        if teacher is not None:
            logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[0, :-1].double(), -1)[keep]
            s["agree"] += float((logp.argmax(-1) == logq[keep].argmax(-1)).sum())
            s["kl"] += float((logp.exp() * (logp - logq[keep])).sum())
    return sums


def test_ppl_and_bpb_match_a_plain_forward(tiny_model, two_domains):
    result = evaluate(tiny_model, two_domains, batch_size=3, progress=False)
    ref = _reference(tiny_model, two_domains)
    for name, s in ref.items():
        got = result["domains"][name]
        assert (got["tokens"], got["bytes"]) == (s["tokens"], s["bytes"])
        assert got["ppl"] == pytest.approx(math.exp(s["nll"] / s["tokens"]), rel=1e-5)
        assert got["bpb"] == pytest.approx(s["nll"] / (math.log(2) * s["bytes"]), rel=1e-5)
    assert "top1_agreement" not in result["overall"] and "kl_to_teacher" not in result["overall"]


def test_overall_is_pooled_not_mean_of_domains(tiny_model, two_domains):
    result = evaluate(tiny_model, two_domains, progress=False)
    ref = _reference(tiny_model, two_domains)
    nll, tokens, nbytes = (sum(s[k] for s in ref.values()) for k in ("nll", "tokens", "bytes"))
    overall = result["overall"]
    assert (overall["tokens"], overall["bytes"]) == (tokens, nbytes)
    assert tokens == int((two_domains.labels != IGNORE_INDEX).sum()) and nbytes == int(two_domains.n_bytes.sum())
    assert overall["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert overall["bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    mean_of_means = sum(d["bpb"] for d in result["domains"].values()) / 2
    assert abs(overall["bpb"] - mean_of_means) > 1e-3 * overall["bpb"]


def test_model_agrees_with_itself(tiny_model, two_domains):
    result = evaluate(tiny_model, two_domains, teacher=OnlineTeacher(tiny_model), progress=False)
    for metrics in [result["overall"], *result["domains"].values()]:
        assert metrics["top1_agreement"] == 1.0
        assert metrics["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_and_kl_with_another_teacher(make_model, two_domains):
    student, teacher = make_model(seed=0), make_model(seed=1)
    result = evaluate(student, two_domains, teacher=OnlineTeacher(teacher), progress=False)
    ref = _reference(student, two_domains, teacher)
    agree, kl, tokens = (sum(s[k] for s in ref.values()) for k in ("agree", "kl", "tokens"))
    assert result["overall"]["top1_agreement"] == pytest.approx(agree / tokens, abs=1e-12)
    assert result["overall"]["kl_to_teacher"] == pytest.approx(kl / tokens, rel=1e-4)
    assert 0 < result["overall"]["kl_to_teacher"] and result["overall"]["top1_agreement"] < 1


def test_several_students_share_one_teacher_pass(make_model, two_domains):
    """evaluate_models == one evaluate per student, with one teacher forward per batch instead of one per student."""
    students = {"a": make_model(seed=0), "b": make_model(seed=2)}
    teacher = OnlineTeacher(make_model(seed=1))
    calls = []
    teacher.model.base_model.register_forward_hook(lambda *_: calls.append(1))
    together = evaluate_models(students, two_domains, teacher=teacher, batch_size=4, progress=False)
    n_batches = math.ceil(len(two_domains) / 4)
    assert len(calls) == n_batches
    for name, model in students.items():
        alone = evaluate(model, two_domains, teacher=teacher, batch_size=4, progress=False)
        assert together[name] == alone
    assert together["a"]["overall"]["kl_to_teacher"] != together["b"]["overall"]["kl_to_teacher"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: a final logit softcap, applied per block
def test_nll_in_vocabulary_blocks_equals_the_full_logits(build_model, tiny_tokenizer, two_domains, monkeypatch, arch):
    """Without a teacher the NLL is computed over blocks of the head (log-sum-exp merged): the same ppl and bpb as
    the plain forward's full logits, with many blocks and a partial last one."""
    kw = {"final_logit_softcapping": 2.0} if arch == "gemma2" else {}
    model = build_model(tiny_tokenizer, 4, arch=arch, **kw)
    monkeypatch.setattr(eval_metrics, "_VOCAB_BLOCK", 7)
    assert len(tiny_tokenizer) % 7 and len(tiny_tokenizer) > 10 * 7
    blocked = evaluate(model, two_domains, batch_size=4, progress=False)
    monkeypatch.setattr(eval_metrics, "_VOCAB_BLOCK", len(tiny_tokenizer))
    whole = evaluate(model, two_domains, batch_size=4, progress=False)
    ref = _reference(model, two_domains)
    for name, s in ref.items():
        for result in (blocked, whole):
            assert result["domains"][name]["bpb"] == pytest.approx(s["nll"] / (math.log(2) * s["bytes"]), rel=1e-6)
        assert blocked["domains"][name]["ppl"] == pytest.approx(whole["domains"][name]["ppl"], rel=1e-6)


def test_frozen_model_is_scored_without_running_its_head(tiny_model, two_domains):
    """The scored hidden states come from the decoder alone: the model's own head never runs (for a frozen model
    `logits_to_keep=1` made torch copy the whole head once per sequence), and freezing changes no number."""
    before = evaluate(tiny_model, two_domains, batch_size=4, progress=False)
    calls = []
    tiny_model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    tiny_model.requires_grad_(False)
    assert evaluate(tiny_model, two_domains, batch_size=4, progress=False) == before
    assert not calls


def test_batch_size_does_not_change_results_and_mode_restored(tiny_model, two_domains):
    tiny_model.train()
    one = evaluate(tiny_model, two_domains, batch_size=1, progress=False)
    assert tiny_model.training
    many = evaluate(tiny_model, two_domains, batch_size=7, progress=False)
    assert one["overall"]["ppl"] == pytest.approx(many["overall"]["ppl"], rel=1e-5)


def test_check_tokenizers(tiny_tokenizer, make_tokenizer):
    check_tokenizers(tiny_tokenizer, make_tokenizer())  # an equal tokenizer built again passes
    with pytest.raises(UserError, match="tokenizers differ: 300 vs 280 tokens"):
        check_tokenizers(tiny_tokenizer, make_tokenizer(vocab_size=280))
    other_bos = make_tokenizer()
    other_bos.bos_token = "<unk>"
    with pytest.raises(UserError, match="bos_token '<bos>' vs '<unk>'"):
        check_tokenizers(tiny_tokenizer, other_bos)


def test_check_tokenizers_with_id_map(tiny_tokenizer):
    n = len(tiny_tokenizer)
    check_tokenizers(tiny_tokenizer, tiny_tokenizer, torch.arange(n))
    swapped = torch.arange(n)
    swapped[[10, 11]] = swapped[[11, 10]]
    with pytest.raises(UserError, match="student id 10 .* maps to teacher id 11"):
        check_tokenizers(tiny_tokenizer, tiny_tokenizer, swapped)
    with pytest.raises(UserError, match=f"{n - 1} entries for {n} student tokens"):
        check_tokenizers(tiny_tokenizer, tiny_tokenizer, torch.arange(n - 1))
    with pytest.raises(UserError, match="outside the teacher"):
        check_tokenizers(tiny_tokenizer, tiny_tokenizer, torch.arange(n) + 1)


def test_cross_tokenizer_teacher_metrics_on_aligned_positions(build_model):
    """KL / agreement with a teacher of another tokenizer, on the positions aligned one to one: with one tokenizer on
    both sides every scored position aligns and the figures equal the same-tokenizer ones; with two families a
    share of the positions aligns and the KL is positive."""
    from potstill.teacher.cross import CrossTokenizerTeacher
    from xtok_tokenizers import TEXTS, byte_level_bpe, metaspace_bpe

    tok = byte_level_bpe()
    # one row (no text cut by packing), ASCII (a token ending inside a character joins a group of two)
    dataset = pack([Record(text=t, domain="d") for t in TEXTS if t.isascii()], tok, 128)
    student, teacher = build_model(tok, 0, hidden=32), build_model(tok, 1, hidden=48)
    same = evaluate(student, dataset, OnlineTeacher(teacher), progress=False)["overall"]
    aligned = evaluate(student, dataset, CrossTokenizerTeacher(teacher, tok, tok), progress=False)["overall"]
    assert aligned["aligned_share"] == 1.0 and "aligned_share" not in same
    assert aligned["kl_to_teacher"] == pytest.approx(same["kl_to_teacher"], rel=1e-4)
    assert aligned["top1_agreement"] == pytest.approx(same["top1_agreement"])
    other = build_model(metaspace_bpe(), 2, hidden=48)
    cross = evaluate(student, dataset, CrossTokenizerTeacher(other, tok, metaspace_bpe()), progress=False)["overall"]
    assert 0 < cross["aligned_share"] < 0.95 and cross["kl_to_teacher"] > 0 and cross["bpb"] == same["bpb"]
