"""Several teachers (`model.teachers`, docs/teachers.md): routing, weights, equivalences, DDK, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_helpers import ddk_opts, read_log, read_mixing
from potstill.config import LossConfig, load_config
from potstill.data import collate, load_dataset
from potstill.losses import combine, kd_terms
from potstill.teacher.cross import CrossTokenizerTeacher
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.several import TeacherSet
from potstill.train.recipes import run_distill
from potstill.train.step import kd_micro_step
from xtok_tokenizers import metaspace_bpe


@pytest.fixture(scope="module")
def multi_dir(ddk_dir, build_model):
    """ddk_dir (student, teacher, 3 domains) + a second teacher of the same tokenizer, one of another tokenizer
    family, and one with a context of 8 positions."""
    tok = AutoTokenizer.from_pretrained(ddk_dir / "student")
    build_model(tok, 2, hidden=48, max_positions=64, save_to=ddk_dir / "teacher_b")
    build_model(tok, 3, hidden=48, max_positions=8, save_to=ddk_dir / "teacher_short")
    build_model(metaspace_bpe(), 4, hidden=48, max_positions=128, save_to=ddk_dir / "teacher_x")
    return ddk_dir


def _teachers(root, *entries: str) -> list[str]:
    return ["model.teacher=null", f"model.teachers=[{', '.join(entries)}]"]


def _model(root, name):
    return AutoModelForCausalLM.from_pretrained(root / name)


def _batch(domains: list[str], seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (len(domains), seq), generator=g)
    labels = ids.clone()
    for row in range(len(domains)):
        labels[row, : 1 + row] = -100  # ragged: each row scores a different number of positions
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "domain": domains}


def _rows(batch: dict, rows: list[int]) -> dict:
    return {k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in batch.items()}


def test_routes_share_weights_and_take_ce_once():
    ts = TeacherSet([None] * 3, ["a", "b", "c"], [1.0, 3.0, 2.0], [["x"], None, ["y"]])
    assert ts.shares("x") == {0: 0.25, 1: 0.75} and ts.shares("y") == {1: 0.6, 2: 0.4} and ts.shares("z") == {1: 1}
    routes = ts.routes(["x", "y", "z", "x"])
    rows_of = {(r.teacher, r.share): r.rows for r in routes}
    assert rows_of == {(0, 0.25): [0, 3], (1, 0.75): [0, 3], (1, 0.6): [1], (1, 1.0): [2], (2, 0.4): [1]}
    ce_rows = sorted(i for r in routes if r.ce for i in r.rows)
    assert ce_rows == [0, 1, 2, 3]  # every row's CE exactly once
    ts.check_domains(["x", "y", "z"])


def test_routing_table_errors_name_the_entry_or_domain():
    ts = TeacherSet([None] * 2, ["a", "b"], [1.0, 0.0], [["code"], ["prose", "poetry"]])
    with pytest.raises(Exception, match=r"model.teachers.1.domains: 'poetry' is not a domain of the training data"):
        ts.check_domains(["code", "prose"])
    with pytest.raises(Exception, match=r"no teacher with a positive weight distills domain 'prose'"):
        ts.check_domains(["code", "prose", "poetry"])


@pytest.mark.parametrize("fused", [True, False])
def test_one_teacher_in_the_list_is_the_single_teacher(multi_dir, fused):
    student = _model(multi_dir, "student")
    loss = LossConfig(name="jsd", temperature=2.0, fused=fused)
    batch = _batch(["prose", "digits", "code"])
    single = OnlineTeacher(_model(multi_dir, "teacher"))
    listed = TeacherSet([single], ["t"], [2.5], [None])
    got = [kd_micro_step(student, student, batch, t, loss, 0.5, 20)[0] for t in (single, listed)]
    assert got[1].kd.item() == pytest.approx(got[0].kd.item(), rel=1e-5)
    assert got[1].ce.item() == pytest.approx(got[0].ce.item(), rel=1e-5)


def test_routed_teachers_sum_their_terms_on_their_rows(multi_dir):
    """prose -> A, digits and code -> B: kd = A's term on the prose rows + B's on the others (same normalizer)."""
    student = _model(multi_dir, "student")
    a, b = OnlineTeacher(_model(multi_dir, "teacher")), OnlineTeacher(_model(multi_dir, "teacher_b"))
    loss = LossConfig(name="fkl", temperature=2.0)
    batch = _batch(["digits", "prose", "code", "prose"])
    ts = TeacherSet([a, b], ["a", "b"], [1.0, 1.0], [["prose"], ["digits", "code"]])
    both, _ = kd_micro_step(student, student, batch, ts, loss, 0.5, 30)
    part_a, _ = kd_micro_step(student, student, _rows(batch, [1, 3]), a, loss, 0.5, 30)
    part_b, _ = kd_micro_step(student, student, _rows(batch, [0, 2]), b, loss, 0.5, 30)
    assert both.kd.item() == pytest.approx((part_a.kd + part_b.kd).item(), rel=1e-5)
    assert both.ce.item() == pytest.approx((part_a.ce + part_b.ce).item(), rel=1e-5)
    assert both.stats["kd/t0"] == pytest.approx(part_a.kd.item(), rel=1e-5)
    # and the same gradient (the fused loss computes it in the forward for each route's planned weights)
    (grad_both,) = torch.autograd.grad(combine(both, 0.5, 2.0), student.lm_head.weight)
    (grad_parts,) = torch.autograd.grad(combine(part_a, 0.5, 2.0) + combine(part_b, 0.5, 2.0), student.lm_head.weight)
    torch.testing.assert_close(grad_both, grad_parts, rtol=1e-5, atol=1e-7)


def test_summed_forward_kl_has_the_mixed_distributions_gradient(multi_dir):
    """fkl: sum_k w_k KL(p_k || q) = KL(sum_k w_k p_k || q) + const, so both give the student the same gradient."""
    student = _model(multi_dir, "student")
    a, b = OnlineTeacher(_model(multi_dir, "teacher")), OnlineTeacher(_model(multi_dir, "teacher_b"))
    loss = LossConfig(name="fkl", temperature=1.0)
    batch = _batch(["prose", "code"])
    ts = TeacherSet([a, b], ["a", "b"], [1.0, 3.0], [None, None])
    summed, _ = kd_micro_step(student, student, batch, ts, loss, 1.0, None, plan_weights=False)
    (grad_summed,) = torch.autograd.grad(summed.kd, student.lm_head.weight)
    ids = batch["input_ids"]
    mixture = torch.logsumexp(
        torch.stack(
            [math.log(0.25) + F.log_softmax(a.logits(ids), -1), math.log(0.75) + F.log_softmax(b.logits(ids), -1)]
        ),
        dim=0,
    )
    mixed = kd_terms(student(input_ids=ids).logits, mixture, batch["labels"], loss_div(loss))
    (grad_mixed,) = torch.autograd.grad(mixed.kd, student.lm_head.weight)
    torch.testing.assert_close(grad_summed, grad_mixed, rtol=1e-4, atol=1e-6)
    assert summed.kd.item() > mixed.kd.item()  # the constant: the teachers' own spread around their mixture


def loss_div(loss: LossConfig):
    from potstill.train.step import divergence

    return divergence(loss)


def test_run_with_a_same_and_a_cross_tokenizer_teacher(multi_dir, tmp_path):
    """prose and digits from a teacher of the student's tokenizer, code from one of another family: both terms
    are logged per teacher, and the trained student is closer to both on a fixed batch than it started."""
    opts = ddk_opts(multi_dir, tmp_path / "run", "data.mixing=null", "train.max_steps=10", "loss.alpha=1.0",
                    "train.logging_steps=5", "train.lr=0.01", "train.batch_size=4",
                    *_teachers(multi_dir, f"{{path: {multi_dir / 'teacher'}, domains: [prose, digits]}}",
                               f"{{path: {multi_dir / 'teacher_x'}, domains: [code]}}"))  # fmt: skip
    out = run_distill(load_config(None, opts))
    for entry in read_log(out):
        assert entry["kd/t0"] > 0 and 0 < entry["xtok_one_to_one/t1"] <= entry["xtok_coverage/t1"] <= 1
    s_tok, x_tok = (AutoTokenizer.from_pretrained(multi_dir / n) for n in ("student", "teacher_x"))
    members = [
        OnlineTeacher(_model(multi_dir, "teacher")),
        CrossTokenizerTeacher(_model(multi_dir, "teacher_x"), s_tok, x_tok),
    ]
    ts = TeacherSet(members, ["a", "x"], [1.0, 1.0], [["prose", "digits"], ["code"]])
    data = load_dataset([multi_dir / "eval.jsonl"], s_tok, 16, True)  # held-out rows of the three domains
    batch = collate([data[i] for i in range(len(data))])
    before, after = (
        kd_micro_step(m, m, batch, ts, LossConfig(), 1.0, None)[0].stats
        for m in (_model(multi_dir, "student"), AutoModelForCausalLM.from_pretrained(out / "student"))
    )
    assert after["kd/t0"] < before["kd/t0"] and after["kd/t1"] < before["kd/t1"]


@pytest.mark.slow
def test_ddk_measures_each_domain_against_its_own_teacher(multi_dir, tmp_path):
    def teacher_figures(name, *extra):
        opts = ddk_opts(multi_dir, tmp_path / name, "train.max_steps=2", "data.mixing.gap=bpb", *extra)
        return read_mixing(run_distill(load_config(None, opts)))[0]["teacher"]

    alone_a = teacher_figures("a")
    alone_b = teacher_figures("b", f"model.teacher={multi_dir / 'teacher_b'}")
    routed = teacher_figures(
        "routed",
        *_teachers(multi_dir, f"{{path: {multi_dir / 'teacher'}, domains: [prose]}}",
                   f"{{path: {multi_dir / 'teacher_b'}, domains: [digits, code]}}"),
    )  # fmt: skip
    assert routed["prose"] == pytest.approx(alone_a["prose"])
    assert routed["digits"] == pytest.approx(alone_b["digits"]) and routed["code"] == pytest.approx(alone_b["code"])
    both = (f"{{path: {multi_dir / 'teacher'}}}", f"{{path: {multi_dir / 'teacher_b'}, weight: 3}}")
    mixed = teacher_figures("mixed", *_teachers(multi_dir, *both))
    assert mixed["code"] == pytest.approx(0.25 * alone_a["code"] + 0.75 * alone_b["code"])


@pytest.mark.parametrize(
    ("entries", "extra", "needles"),
    [
        (("{path: T, domains: [poetry]}",), (), ("model.teachers.0.domains", "'poetry' is not a domain")),
        (("{path: T, domains: [prose]}",), (), ("no teacher with a positive weight distills domain 'digits'",)),
        (("{path: T, weight: -1}",), (), ("model.teachers.0.weight", ">= 0")),
        (("{path: T, weight: 0}", "{path: B, weight: 0}"), (), ("weights sum to zero",)),
        (("{path: T}", "{path: S}"), (), ("model.teachers.1", "context length 8 < data.seq_len 16")),
        (("{path: T}",), ("teacher.source=cache", "teacher.cache=x"), ("model.teachers", "teacher.source=cache")),
        (("{path: T}", "{path: B}"), ("data.mixing.mode=ddk", "data.mixing.gap=kl"), ("gap=kl", "several teachers")),
    ],
)
def test_bad_teacher_lists_are_one_line(multi_dir, tmp_path, distill_error, entries, extra, needles):
    paths = {"T": multi_dir / "teacher", "B": multi_dir / "teacher_b", "S": multi_dir / "teacher_short"}
    entries = [e.replace("path: T", f"path: {paths['T']}").replace("path: B", f"path: {paths['B']}")
               .replace("path: S", f"path: {paths['S']}") for e in entries]  # fmt: skip
    extra = extra or ("data.mixing=null",)
    line = distill_error(
        *ddk_opts(multi_dir, tmp_path / "run", "train.max_steps=1", *_teachers(multi_dir, *entries)), *extra
    )
    assert all(n in line for n in needles), line
    assert not (tmp_path / "run" / "student").exists()
