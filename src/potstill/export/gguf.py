"""Write an HF Llama or Gemma 3 causal LM (a potstill student, trimmed vocabulary included) as a GGUF file.

Tensors are named by the `gguf` library's tensor-name maps and quantized by its numpy quantizers (4- and 5-bit files
keep the token embedding and output head at q8_0, `KEEP_8BIT`); hyperparameters and tokenizer metadata use
llama.cpp's key names, so both llama.cpp and transformers (`gguf_file=`) read the file.
Two layout conventions of llama.cpp differ from HF and are applied here:

- Llama: llama.cpp rotates interleaved pairs, HF rotates halves, so the q/k projection rows of each head are
  reordered from `[x_0..x_{d/2-1}, x_{d/2}..x_{d-1}]` to `[x_0, x_{d/2}, x_1, x_{d/2+1}, ...]` (readers undo it).
- Gemma: HF's RMSNorm scales by `1 + w`, llama.cpp by `w`, so every norm weight is written as `1 + w`.

Tokenizers (from the directory's `tokenizer.json`): a byte-level BPE ("gpt2" in GGUF: SmolLM2, Llama 3, the test
tokenizer) or a SentencePiece-style BPE with byte fallback ("llama" in GGUF: Gemma, Llama 2). The SentencePiece
runtime in llama.cpp merges by token score, so each token's score is minus the rank of the merge that makes it; the
merges are written too, for readers that use them (transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from potstill.errors import UserError

# quantization name -> GGMLQuantizationType name (2-D weights); 1-D tensors (norms) always stay F32
GGUF_QUANTS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1",
               "q4_0": "Q4_0", "q4_1": "Q4_1"}  # fmt: skip
# 4- and 5-bit quantizations -> the type of the token embedding and output head (GGUF names below), which stay at
# 8 bits: a tied embedding is also the output head, whose error reaches every logit directly; llama.cpp's quantizer
# likewise keeps them higher. Measured in docs/export.md: less error at q5_0, higher top-1 agreement at q4_0
KEEP_8BIT = {"q5_0": "Q8_0", "q5_1": "Q8_0", "q4_0": "Q8_0", "q4_1": "Q8_0"}
EMBEDDING_TENSORS = ("token_embd", "output")
# HF model_type -> (gguf arch name, whether norms store 1 + w, whether q/k rows are reordered for rope)
ARCHES = {"llama": ("llama", False, True), "gemma3_text": ("gemma3", True, False)}
# token types of llama.cpp's vocabulary
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def check_architecture(config, source: Path) -> None:
    """UserError unless `config` is an architecture (and variant) this writer lays out exactly."""
    kind = config.model_type
    if kind not in ARCHES:
        raise UserError(
            f"{source}: GGUF export does not know architecture {kind!r} "
            f"(supported: {', '.join(sorted(ARCHES))}; Gemma 3 as its text model gemma3_text)"
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{source}: GGUF export supports default RoPE only, config has {rope['rope_type']!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UserError(f"{source}: GGUF export does not support {flag}=true")
    if kind == "gemma3_text":
        if config.query_pre_attn_scalar != config.head_dim:
            raise UserError(
                f"{source}: llama.cpp scales Gemma 3 attention by head_dim ({config.head_dim}); "
                f"query_pre_attn_scalar={config.query_pre_attn_scalar} cannot be written"
            )
        sliding = _rope(config, "sliding_attention")
        if sliding.get("rope_theta", 10000.0) != 10000.0:
            raise UserError(f"{source}: llama.cpp fixes Gemma 3's local RoPE base at 10000, config has {sliding}")


def write_gguf(model, tokenizer, out: Path, quant: str, name: str) -> dict:
    """Write `model` (float32 HF causal LM) and `tokenizer` as GGUF at `out` (not atomic: the caller renames).

    Args:
        model: a Llama or Gemma 3 text model (see `check_architecture`).
        tokenizer: its fast tokenizer (the one saved in its directory).
        out: file to write.
        quant: a key of `GGUF_QUANTS`.
        name: `general.name`.

    Returns:
        {"tensors": {ggml type name: count}} of what was written (types of 2-D weights whose rows do not divide
        into the quantizer's block fall back to F16).
    """
    import gguf

    config = model.config
    arch, norm_plus_one, permute_qk = ARCHES[config.model_type]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config)
    _add_tokenizer(writer, tokenizer, config)
    counts: dict[str, int] = {}
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for hf_name, tensor in _unique_tensors(model):
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise UserError(f"{hf_name}: no GGUF name for this tensor of a {config.model_type} model")
        data = tensor.detach().to(torch.float32).numpy()
        if norm_plus_one and base.endswith("norm"):
            data = data + 1.0
        if permute_qk and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            data = _interleave_rope_rows(data, heads)
        qtype = _tensor_type(data, quant, gguf_name)
        stored = data if qtype.name == "F32" else gguf.quants.quantize(data, qtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", stored, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": counts}


def _rope(config, layer_type: str = "full_attention") -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # Gemma 3: one entry per attention type
        params = params[layer_type]
    return dict(params)


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}.get(
        quant, getattr(LlamaFileType, f"MOSTLY_{GGUF_QUANTS[quant]}", LlamaFileType.MOSTLY_F16)
    )


def _tensor_type(data: np.ndarray, quant: str, gguf_name: str):
    """The ggml type of one tensor: F32 for 1-D, the requested type for 2-D (the embedding and output head of 4- and
    5-bit files at `KEEP_8BIT`'s type; F16 where rows miss the block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim < 2:
        return GGMLQuantizationType.F32
    kept = KEEP_8BIT.get(quant) if gguf_name in EMBEDDING_TENSORS else None
    qtype = GGMLQuantizationType[kept or GGUF_QUANTS[quant]]
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block == 0 else GGMLQuantizationType.F16


def _unique_tensors(model):
    """(name, tensor) of the state dict, a tied output head left out (GGUF readers tie when `output` is absent)."""
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor


def _interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """[heads * d, in] rows of each head from half-split order to interleaved pairs (see the module docstring)."""
    rows, cols = weight.shape
    d = rows // heads
    return weight.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _add_hparams(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_sliding_window(config.sliding_window)
        # per-layer pattern: a pruned student's sliding/full layers need not follow Gemma's every-6th rule
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])


def _add_tokenizer(writer, tokenizer, config) -> None:
    """llama.cpp's tokenizer keys from the fast tokenizer's JSON (see the module docstring)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers, this one is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    if size > config.vocab_size:
        raise UserError(f"tokenizer has {size} tokens, more than the model's vocab_size {config.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]  # ids the embedding has but the tokenizer lacks
    types = [USER_DEFINED] * config.vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        for i, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[i] = BYTE
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(_prepends_space(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_byte_level_pre(spec))
    for i, entry in added.items():
        tokens[i], types[i] = entry["content"], CONTROL if entry.get("special") else USER_DEFINED
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Score of each token for llama.cpp's score-driven merging: minus the rank of the first merge making it."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2), or not (Gemma)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text


def _byte_level_pre(spec: dict) -> str:
    """llama.cpp's name of a byte-level pre-tokenizer: plain GPT-2 splitting, or digits split first (SmolLM)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    raise UserError(f"GGUF export does not know this byte-level pre-tokenizer: {json.dumps(pre)[:200]}")
