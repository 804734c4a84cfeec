"""`potstill export`: GGUF and ONNX files that load back with the source's logits, and every bad input refused whole.

Tiny random models: a Llama over the byte-level test tokenizer, a Gemma 3 text model (sliding/full layers in an
order Gemma's every-6th rule would not give) over a Gemma-like byte-fallback BPE, and a student pruned from that
Gemma with a trimmed vocabulary. The llama.cpp comparison runs where `xllamacpp` is installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import potstill.export.check as check_module
import potstill.export.gguf as gguf_module
from gemma_tokenizer import gemma_like_tokenizer
from potstill.errors import UserError
from potstill.export import QUANTS, export_model
from potstill.export.check import PROBE, TOLERANCES, relative_logit_error
from potstill.export.runtime import llamacpp_available
from potstill.fileio import is_temp

MORE_TEXTS = [
    "class Teacher:\n    def forward(self, x):\n        return self.head(self.body(x))\n",
    "The student keeps the layers that matter most for the calibration loss.",
]


# weights drawn 10x wider than the default 0.02: attention and logits then depend on every tensor's layout
INIT = {"initializer_range": 0.2}


@pytest.fixture(scope="module")
def texts(tiny_corpus) -> list[str]:
    """The Gemma-like tokenizer's training texts and the student's calibration corpus."""
    return tiny_corpus + MORE_TEXTS * 3


@pytest.fixture(scope="module")
def models(tmp_path_factory, build_model, tiny_tokenizer, texts):
    """{"llama", "gemma", "student"} -> HF directories (hidden 32: every weight row divides into 32-blocks)."""
    from potstill.student.init import init_student

    root = tmp_path_factory.mktemp("export-models")
    build_model(
        tiny_tokenizer, 0, arch="llama", layers=2, kv_heads=1, max_positions=256, save_to=root / "llama", **INIT
    )
    gemma = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
             "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}  # fmt: skip
    tok = gemma_like_tokenizer(texts)
    build_model(tok, 1, arch="gemma3", layers=4, kv_heads=1, max_positions=256, save_to=root / "gemma", **gemma, **INIT)
    init_student(root / "gemma", 3, root / "student", texts[:6], calib_tokens=128, calib_seq_len=16)
    return root


def source_and_back(model_dir, gguf_path):
    """(source logits, logits of the GGUF loaded back by transformers with the source config) on the probe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)(PROBE)["input_ids"]])
    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=source.config)
    with torch.no_grad():
        return source(ids).logits[0].numpy(), back.eval()(ids).logits[0].numpy()


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# Random 32-wide models lose more to 4- and 5-bit weights than trained ones (0.33 measured at q4_0; ONNX
# int8 0.113, docs/export.md): those tests pass --max-error.
MAX_ERROR = {"q4_0": 0.6, "q4_1": 0.6, "q5_0": 0.4, "q5_1": 0.4, "int8": 0.3}


# the common quantizations run by default, the rest with -m slow
GGUF_QUANTS = [
    q if q in ("f32", "f16", "q8_0", "q4_0") else pytest.param(q, marks=pytest.mark.slow) for q in QUANTS["gguf"]
]


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_gguf_every_quant_loads_back_within_tolerance(models, tmp_path, quant):
    out = tmp_path / f"llama-{quant}.gguf"
    tolerance = MAX_ERROR.get(quant, TOLERANCES[quant])
    report = export_model(models / "llama", "gguf", out, quant=quant, max_error=MAX_ERROR.get(quant))
    assert listing(tmp_path) == [out.name] and report["bytes"] == out.stat().st_size
    want, got = source_and_back(models / "llama", out)
    error = relative_logit_error(got, want)  # measured here again, independently of the report
    assert error <= tolerance and error == pytest.approx(report["check"]["relative_logit_error"])
    if quant == "f32":
        np.testing.assert_array_equal(got, want)
    else:
        assert error > 0  # the weights really were stored at lower precision
    if llamacpp_available():
        assert report["check"]["llamacpp"]["relative_logit_error"] <= tolerance


@pytest.mark.parametrize("name", ["gemma", "student"])
@pytest.mark.parametrize("quant", ["f32", "q8_0", pytest.param("q4_0", marks=pytest.mark.slow)])
def test_gguf_gemma_and_trimmed_student(models, tmp_path, name, quant):
    out = tmp_path / f"{name}.gguf"
    tolerance = MAX_ERROR.get(quant, TOLERANCES[quant])
    report = export_model(models / name, "gguf", out, quant=quant, max_error=MAX_ERROR.get(quant))
    want, got = source_and_back(models / name, out)
    assert relative_logit_error(got, want) <= tolerance
    from gguf import GGUFReader

    reader = GGUFReader(out)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    config = json.loads((models / name / "config.json").read_text())
    assert len(tokens.data) == config["vocab_size"]  # the student's trimmed vocabulary, not the teacher's
    pattern = [bool(reader.fields["gemma3.attention.sliding_window_pattern"].parts[i][0])
               for i in reader.fields["gemma3.attention.sliding_window_pattern"].data]  # fmt: skip
    assert pattern == [t == "sliding_attention" for t in config["layer_types"]]
    if llamacpp_available():
        assert report["check"]["llamacpp"]["relative_logit_error"] <= tolerance


def test_wrong_rope_layout_fails_the_check_and_leaves_no_file(models, tmp_path, monkeypatch):
    """The check catches a real layout bug: Llama q/k rows written in HF order instead of llama.cpp's."""
    monkeypatch.setattr(gguf_module, "_interleave_rope_rows", lambda weight, heads: weight)
    with pytest.raises(UserError, match="check failed") as err:
        export_model(models / "llama", "gguf", tmp_path / "bad.gguf", quant="f32")
    assert str(err.value).startswith(f"{tmp_path / 'bad.gguf'}: ")  # the file asked for, not the temporary one
    assert listing(tmp_path) == []


def test_tolerance_exceeded_is_an_error_and_keeps_the_old_file(models, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    monkeypatch.setitem(check_module.TOLERANCES, "q8_0", 1e-9)
    with pytest.raises(UserError, match="more than the 1e-09 this quantization allows"):
        export_model(models / "llama", "gguf", out, quant="q8_0", overwrite=True)
    assert out.read_bytes() == b"old" and listing(tmp_path) == ["m.gguf"]


def test_overwrite_replaces(models, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    export_model(models / "llama", "gguf", out, quant="q8_0", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF" and listing(tmp_path) == ["m.gguf"]


@pytest.fixture
def bad_inputs(models, tmp_path, build_model, tiny_tokenizer):
    """Model directories the export refuses: another architecture, no tokenizer."""
    build_model(tiny_tokenizer, 0, arch="gemma2", save_to=tmp_path / "gemma2")
    build_model(None, 0, arch="llama", vocab_size=300, save_to=tmp_path / "no-tokenizer")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["gemma2", "--format", "gguf"], ["'gemma2'", "supported: gemma3_text, llama"]),
        (["gemma2", "--format", "onnx"], ["'gemma2'", "supported: gemma3_text, llama"]),
        (["llama", "--format", "onnx", "--quant", "q4_0"], ["--quant", "onnx", "f32, int8"]),
        (["llama", "--format", "gguf", "--quant", "q4_k_m"], ["--quant", "gguf", "q8_0"]),
        (["llama", "--format", "tflite"], ["--format", "gguf, onnx"]),
        (["no-tokenizer", "--format", "gguf"], ["no-tokenizer", "no tokenizer"]),
        (["missing", "--format", "gguf"], ["missing", "not a model directory"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, needles, bad_inputs, models, run_main, assert_one_line_error):
    model = models / "llama" if args[0] == "llama" else bad_inputs / args[0]
    out = bad_inputs / "out" / "model.file"
    out.parent.mkdir()
    assert_one_line_error(run_main("export", model, *args[1:], "--out", out), *needles)
    assert listing(out.parent) == []


def test_existing_out_is_refused_untouched(models, tmp_path, run_main, assert_one_line_error):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    assert_one_line_error(
        run_main("export", models / "llama", "--format", "gguf", "--out", out), "exists", "--overwrite"
    )
    assert out.read_bytes() == b"mine" and not any(is_temp(p.name) for p in tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "student"])
@pytest.mark.parametrize("quant", QUANTS["onnx"])
def test_onnx_loads_back_within_tolerance(models, tmp_path, name, quant):
    """About a minute per export on 2 cores (the dynamo exporter), hence slow."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.export.runtime import OnnxModel

    out = tmp_path / f"{name}.onnx"
    report = export_model(models / name, "onnx", out, quant=quant, max_error=MAX_ERROR.get(quant))
    assert listing(tmp_path) == [out.name] and report["kv_cache"] is False
    source = AutoModelForCausalLM.from_pretrained(models / name).eval()
    text = PROBE + " and a longer tail than the traced example had"  # the sequence axis is dynamic
    ids = AutoTokenizer.from_pretrained(models / name)(text)["input_ids"]
    with torch.no_grad():
        want = source(torch.tensor([ids])).logits[0].numpy()
    error = relative_logit_error(OnnxModel(out).logits(ids), want)
    assert error <= MAX_ERROR.get(quant, TOLERANCES[quant])
    assert (error < 1e-5) == (quant == "f32")


def test_partial_utf8_ids_are_the_multibyte_byte_tokens(texts):
    tok = gemma_like_tokenizer(texts)
    partial = check_module.partial_utf8_ids(tok)
    byte_ids = {tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(0x80, 0x100)}
    assert set(partial) == byte_ids


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_4bit_keeps_the_embedding_at_8bit_and_errs_less(models, tmp_path, monkeypatch, name):
    """q4_0 with the embedding (tied: also the output head) at q8_0 vs every 2-D weight at q4_0, side by side."""
    from gguf import GGUFReader

    errors, sizes = {}, {}
    for kind in ("q8_0", "mixed", "all-q4_0"):
        if kind == "all-q4_0":
            monkeypatch.setattr(gguf_module, "KEEP_8BIT", {})
        out = tmp_path / f"{kind}.gguf"
        report = export_model(models / name, "gguf", out, quant="q4_0" if kind != "q8_0" else "q8_0", max_error=10)
        types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        head = {n: t for n, t in types.items() if n in ("token_embd.weight", "output.weight")}
        rest = {t for n, t in types.items() if n not in head and not n.endswith("norm.weight")}
        assert rest == {kind.removeprefix("all-").upper() if kind != "mixed" else "Q4_0"}
        assert set(head.values()) == {"Q4_0" if kind == "all-q4_0" else "Q8_0"}
        tied = json.loads((models / name / "config.json").read_text()).get("tie_word_embeddings", False)
        assert ("output.weight" in head) != tied  # a tied head is the embedding, written once
        errors[kind] = relative_logit_error(*reversed(source_and_back(models / name, out)))
        assert errors[kind] == pytest.approx(report["check"]["relative_logit_error"])
        if llamacpp_available():  # llama.cpp loads and runs the mixed file too
            assert np.isfinite(report["check"]["llamacpp"]["relative_logit_error"])
        sizes[kind] = out.stat().st_size
    assert errors["q8_0"] < errors["mixed"] < errors["all-q4_0"]
    assert sizes["all-q4_0"] < sizes["mixed"] < sizes["q8_0"]
