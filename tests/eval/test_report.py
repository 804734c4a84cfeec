"""report.json / report.md / plots from plain dicts, and the size/latency bench on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from potstill.eval.bench import latency_ms_per_token, param_count
from potstill.eval.report import gap_closed, render_markdown, summarize, write_report
from report_inputs import demo_results, eval_result


def test_gap_closed_formula():
    assert gap_closed(1.4, 1.2, 1.0) == pytest.approx(0.5)
    assert gap_closed(1.4, 1.5, 1.0) == pytest.approx(-0.25)  # KD worse than CE: negative
    assert gap_closed(1.0, 0.9, 1.0) is None  # no gap to close
    assert gap_closed(1.005, 0.9, 1.0) is None  # a gap below MIN_GAP_BPB: the ratio would divide by noise
    assert gap_closed(1.01, 1.0, 1.0) == pytest.approx(1.0)


def test_summary_ratios_and_targets():
    s = summarize(demo_results())
    r = s["ratios"]
    assert r["param_ratio"] == pytest.approx(0.15)
    assert r["speedup"] == pytest.approx(5.0)
    assert r["gap_closed_by_domain"] == {"code": pytest.approx(0.5), "docs": pytest.approx(0.4)}
    assert r["gap_closed"] == pytest.approx((1.35 - 1.15) / (1.35 - 0.9))
    assert s["models"]["student_kd"]["top1_agreement"] == 0.6
    assert "top1_agreement" not in s["models"]["teacher"]
    assert all(s["targets"].values())


def test_a_domain_where_ce_reaches_the_teacher_has_no_gap_closed():
    results = demo_results()
    results["models"]["student_ce"]["eval"] = eval_result({"code": 1.4, "docs": 0.803}, agree=0.5)  # CE at the teacher
    s = summarize(results)
    assert s["ratios"]["gap_closed_by_domain"] == {"code": pytest.approx(0.5), "docs": None}
    md = render_markdown(s)
    assert "| docs | 0.800 | 1.100 | 0.803 | n/a |" in md and "no gap to close" in md
    assert "no gap to close" not in render_markdown(summarize(demo_results()))


def test_kd_losing_one_domain_fails_that_target():
    s = summarize(demo_results(kd_code=1.5))
    assert s["kd_better_than_ce"]["by_domain"] == {"code": False, "docs": True}
    assert not s["targets"]["kd_better_every_domain"]


def test_write_report_files(tmp_path: Path):
    md = write_report(tmp_path, demo_results())
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_kd", "student_ce"}
    for plot in report["plots"]:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["plots"]) == 3
    text = md.read_text()
    assert "5.0x faster" in text and "15%" in text  # speed-up and size ratio in words
    assert "| code | 1.000 | 1.200 | 1.400 | 50% |" in text
    assert not list(tmp_path.glob(".*tmp*"))


def test_report_says_when_the_teacher_ran_in_bfloat16():
    plain = render_markdown(summarize(demo_results()))
    results = demo_results()
    results["settings"]["distill"] = {"model": {"teacher_dtype": "bfloat16"}}
    low = render_markdown(summarize(results))
    assert "bfloat16" not in plain and "The teacher ran in bfloat16" in low


@pytest.fixture(scope="module")
def tiny_model(build_model):
    """A tied-embedding Llama (hidden 32, 2 layers, 2 heads) over ids 0-299; 0/1/2 = pad/bos/eos (_ByteTokenizer)."""
    return build_model(
        vocab_size=300, tie_word_embeddings=True, max_positions=None, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )


def test_param_count_counts_tied_weights_once(tiny_model):
    emb = tiny_model.get_input_embeddings().weight
    assert tiny_model.get_output_embeddings().weight is emb
    naive = sum(p.numel() for _, p in tiny_model.named_parameters(remove_duplicate=False))
    assert param_count(tiny_model) == naive - emb.numel()


class _ByteTokenizer:
    """Enough of a tokenizer for `generate`: bytes -> ids 3..258, with <bos>."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text: str, return_tensors: str = "pt") -> dict:
        ids = [1] + [b + 3 for b in text.encode()]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def test_latency_generates_exact_token_count(tiny_model, monkeypatch):
    calls = []
    real = tiny_model.generate

    def spy(**kw):
        out = real(**kw)
        calls.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(tiny_model, "generate", spy)
    ms = latency_ms_per_token(tiny_model, _ByteTokenizer(), "def f(x):", new_tokens=6, warmup=2, runs=3)
    assert ms > 0
    assert calls == [8, 8, 8]  # warm-up + timed tokens, end-of-sequence never stops it early


def test_latency_grows_with_model_cost(build_model):
    torch.manual_seed(0)

    def model(hidden, layers):  # both drawn from the one seed above
        return build_model(
            seed=None, vocab_size=300, hidden=hidden, intermediate=4 * hidden, layers=layers, heads=4,
            max_positions=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip

    tok = _ByteTokenizer()
    small = latency_ms_per_token(model(32, 1), tok, "x", new_tokens=8, warmup=2, runs=3)
    big = latency_ms_per_token(model(256, 4), tok, "x", new_tokens=8, warmup=2, runs=3)
    assert big > small
