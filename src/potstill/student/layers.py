"""Pruning a teacher's depth for a student: layer importance on calibration text, and the student's weights.

A layer's importance is the increase of the calibration loss (next-token CE on the corpus) when that layer alone
is skipped. `build_student` copies the kept layers (and the embedding / head rows of a trimmed vocabulary) exactly.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from potstill.errors import UserError

log = logging.getLogger(__name__)

# Config fields holding one entry per decoder layer: subset them with the layers.
_PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def calibration_batches(
    corpus_ids: Sequence[Sequence[int]], tokenizer, n_tokens: int, seq_len: int, seed: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Windows of `seq_len` teacher ids ([bos] + text, documents joined by eos), drawn at random from the corpus.

    Returns:
        List of [B, seq_len] long tensors, about `n_tokens` tokens in all.
    """
    stream: list[int] = []
    for ids in corpus_ids:
        stream.extend(ids)
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    body = seq_len - 1
    n_windows = len(stream) // body
    if n_windows == 0:
        raise UserError(f"corpus: {len(stream)} tokens, fewer than one calibration window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=gen)[: max(1, n_tokens // seq_len)].sort().values.tolist()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows = torch.tensor([bos + stream[w * body : (w + 1) * body][: seq_len - len(bos)] for w in picks])
    return list(windows.split(batch_size))


@torch.no_grad()
def layer_scores(model: nn.Module, batches: Sequence[torch.Tensor], keep_ids: list[int] | None) -> tuple[list, float]:
    """Importance of each decoder layer: calibration CE with the layer skipped minus the full model's CE.

    The layers before the skipped one are not rerun: one full pass records each layer's input, and the run
    without layer i starts at layer i+1 from that input (half the cost of rerunning everything). The head is
    restricted to `keep_ids` (the student's vocabulary) when given: cheaper, and the loss the student trains on.
    The model may be a low-precision copy (see `init_student`'s `calib_dtype`); the CE is summed in float64.

    Returns:
        (scores [n_layers] floats, the full model's CE in nats/token).
    """
    n_layers = model.config.num_hidden_layers
    head_ids = torch.arange(model.config.vocab_size) if keep_ids is None else torch.tensor(keep_ids)
    head = model.get_output_embeddings().weight[head_ids]  # [V_keep, H], gathered once
    position = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    position[head_ids] = torch.arange(len(head_ids))
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def nll(hidden: torch.Tensor, ids: torch.Tensor) -> float:
        """Summed next-token CE (nats) of final hidden states [B, T, H]; every target is in `head_ids`."""
        logits = (hidden[:, :-1] @ head.T).float()  # [B, T-1, V_keep]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), position[ids[:, 1:]].flatten(), reduction="none")
        return float(ce.double().sum())

    totals, base, count = torch.zeros(n_layers, dtype=torch.float64), 0.0, 0
    t0 = time.perf_counter()
    for ids in batches:
        out = model.base_model(input_ids=ids, use_cache=False, output_hidden_states=True)
        base += nll(out.last_hidden_state, ids)
        count += ids[:, 1:].numel()
        for skip in range(n_layers):
            rest = list(range(skip + 1, n_layers))
            first = model.base_model.layers[rest[0]] if rest else model.base_model.norm
            with only_layers(model, rest), _input_replaced(first, out.hidden_states[skip]):
                totals[skip] += nll(model.base_model(input_ids=ids, use_cache=False).last_hidden_state, ids)
    base /= count
    scores = (totals / count - base).tolist()
    log.info("layer scores (%d tokens, %.1f s): %s", count, time.perf_counter() - t0, [round(x, 3) for x in scores])
    return scores, base


@contextmanager
def _input_replaced(module: nn.Module, hidden: torch.Tensor) -> Iterator[None]:
    """Make `module` receive `hidden` as its hidden-states input (first positional or `hidden_states=`)."""

    def hook(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def only_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[None]:
    """Temporarily run `model` with only the given decoder layers (no KV cache: layer_idx is not renumbered)."""
    body, cfg = model.base_model, model.config
    saved = body.layers, cfg.num_hidden_layers, {k: getattr(cfg, k, None) for k in _PER_LAYER_KEYS}
    body.layers = nn.ModuleList(saved[0][i] for i in layers)
    _subset_config(cfg, layers)
    try:
        yield
    finally:
        body.layers, cfg.num_hidden_layers = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is not None:
                setattr(cfg, key, value)


def _subset_config(cfg, layers: Sequence[int]) -> None:
    n = cfg.num_hidden_layers
    for key in _PER_LAYER_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, [value[i] for i in layers])
    cfg.num_hidden_layers = len(layers)


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over 0..n_layers-1, first and last included when keep >= 2."""
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


# ----- model -----------------------------------------------------------------------------------------------------


def build_student(teacher: nn.Module, layers: Sequence[int], id_map: torch.Tensor | None) -> nn.Module:
    """A fresh model of the teacher's class with the given layers (renumbered 0..N-1) and vocabulary rows.

    Args:
        teacher: the teacher causal LM.
        layers: teacher layer indices to keep, ascending.
        id_map: [V_student] teacher ids to keep as the vocabulary, or None for the full vocabulary.

    Returns:
        The student (eval mode); tied embeddings stay tied.
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    _subset_config(cfg, layers)
    if id_map is not None:
        cfg.vocab_size = len(id_map)
        _remap_token_ids(cfg, id_map)
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    target = student.state_dict()
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match:
            old = int(match.group(2))
            if old not in new_index:
                continue
            key = f"{match.group(1)}{new_index[old]}{match.group(3)}"
        if id_map is not None and key in target and value.shape != target[key].shape:
            value = value[id_map]  # embedding / untied head rows
        state[key] = value
    result = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or ())
    if [k for k in result.missing_keys if k not in tied] or result.unexpected_keys:
        raise RuntimeError(f"weight copy failed: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if id_map is not None:
        _remap_token_ids(student.generation_config, id_map)
    return student.eval()


def _remap_token_ids(cfg, id_map: torch.Tensor) -> None:
    """Rewrite `*_token_id` fields (int or list) from teacher ids to student ids; dropped ids become None."""
    new_id = {int(old): new for new, old in enumerate(id_map.tolist())}
    for key, value in list(vars(cfg).items()):
        if not key.endswith("_token_id") or value is None:
            continue
        if isinstance(value, list):
            setattr(cfg, key, [new_id[v] for v in value if v in new_id] or None)
        else:
            setattr(cfg, key, new_id.get(value))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
