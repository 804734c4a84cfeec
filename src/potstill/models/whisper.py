"""Whisper models in HF form: opening a directory, the decoder prompt, and greedy decoding.

A Whisper directory holds `WhisperForConditionalGeneration` weights with their tokenizer and feature extractor
(`models.ct2whisper.convert_ct2_whisper` writes one from a CTranslate2 model; potstill's speech students are
saved the same way). `greedy_decode` is the one decoding loop of teacher pseudo-labels and evaluation: the
prompt `<|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>`, the config's suppressed tokens at
every step and its begin-suppressed tokens at the first step, argmax until `<|endoftext|>` (the rules of
CTranslate2 / faster-whisper greedy search without timestamps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from potstill.errors import UserError


def load_whisper(path: str | Path):
    """(model in eval mode, processor) of a Whisper directory.

    Raises:
        UserError: the directory is missing or its config is not a Whisper model.
    """
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as err:
        raise UserError(f"{config}: not JSON ({err})") from None
    if model_type != "whisper":
        raise UserError(f"{path}: not a Whisper model (config.json model_type is {model_type!r}, expected 'whisper')")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from potstill.models.load import quiet_hf_progress

    with quiet_hf_progress():
        model = WhisperForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(path)


def decoder_prompt(model, tokenizer) -> list[int]:
    """The forced decoder prefix: start of transcript (+ English, transcribe on a multilingual model), no timestamps."""
    prompt = [model.config.decoder_start_token_id]
    if getattr(model.generation_config, "is_multilingual", False):
        prompt += tokenizer.convert_tokens_to_ids(["<|en|>", "<|transcribe|>"])
    return prompt + [tokenizer.convert_tokens_to_ids("<|notimestamps|>")]


def input_frames(model) -> int:
    """Mel frames the encoder takes (2 per position: conv2 has stride 2); 3000 = 30 s for the original models."""
    return 2 * model.config.max_source_positions


@torch.no_grad()
def greedy_decode(
    model, features: torch.Tensor, prompt: list[int], max_new_tokens: int = 96, return_logits: bool = False
):
    """Greedy transcripts (token ids without prompt and end token) of a batch of log-mel features.

    Args:
        model: WhisperForConditionalGeneration.
        features: [B, n_mels, input_frames(model)] log-mel features.
        prompt: the forced decoder prefix (`decoder_prompt`).
        max_new_tokens: cap on generated tokens per clip.
        return_logits: also return each clip's decoding distributions.

    Returns:
        B lists of token ids; with return_logits also B tensors [len(ids) + 1, V] of the logits (suppressed
        tokens at -inf) that chose each id and the end token (fewer rows when the cap cut the clip).
    """
    config = model.config
    batch = features.shape[0]
    encoded = model.model.encoder(features).last_hidden_state
    eos = config.eos_token_id
    suppress = torch.tensor(list(config.suppress_tokens or []), dtype=torch.long)
    begin = torch.tensor(list(config.begin_suppress_tokens or []), dtype=torch.long)
    tokens = torch.tensor([prompt] * batch)
    out: list[list[int]] = [[] for _ in range(batch)]
    steps: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    past, step_input = None, tokens
    limit = min(max_new_tokens, config.max_target_positions - len(prompt))
    for step in range(limit):
        result = model.model.decoder(
            input_ids=step_input, encoder_hidden_states=encoded, past_key_values=past, use_cache=True
        )
        past = result.past_key_values
        logits = model.proj_out(result.last_hidden_state[:, -1])
        logits[:, suppress] = -torch.inf
        if step == 0:
            logits[:, begin] = -torch.inf
        nxt = logits.argmax(-1)
        for b in range(batch):
            if done[b]:
                continue
            if return_logits:
                steps[b].append(logits[b].clone())
            if nxt[b].item() != eos:
                out[b].append(nxt[b].item())
        done |= nxt == eos
        if done.all():
            break
        step_input = nxt[:, None]
    if return_logits:
        return out, [torch.stack(rows) for rows in steps]
    return out
