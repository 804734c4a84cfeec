"""Rollouts for on-policy distillation: the student's (or a teacher-mixed) completions of a batch's prompts, and
DistiLLM's replay buffer of them.

- `rollout`: Hugging Face `generate` on one model (the bare student, or the teacher for seq-KD): KV cache,
  left-padded prompts, stop at `<eos>` or a stop string, `max_new_tokens`, `temperature`, `top_p`.
- `mixed_rollout`: MiniLLM's teacher-mixed sampling, each token drawn from `mix p_teacher + (1 - mix) q_student`
  at the sampling temperature; a decode loop of our own, since `generate` samples one model: both models keep a
  KV cache, the positions follow the left padding.
- `ReplayBuffer`: the latest sampled sequences (FIFO), drawn back uniformly with replacement; plain lists of ids,
  so it goes into a checkpoint's `trainer_state.json` as it is.
- `health_counts` / `health_figures`: the health of a rollout batch (length, stops, distinct bigrams, loops).

Every function leaves the global RNG as it was: its randomness comes from the `seed` it is given. A rollout batch
is right-padded again (`input_ids`, `attention_mask`, `labels` [B, L']: labels only on the completion, up to and
including `<eos>`, or up to the token that completes a stop string), with `completion_len` [B] and `stopped` [B]
(ended at `<eos>` or a stop string).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from potstill.config import OnPolicyConfig
from potstill.losses import IGNORE_INDEX


def _left_padded(batch: dict[str, Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's prompts ([B, L] right-padded rows, `prompt_len` [B]) as [B, P] left-padded ids and mask."""
    ids, lens = batch["input_ids"], batch["prompt_len"].tolist()
    width = max(lens)
    prompts = ids.new_full((len(lens), width), pad_id)
    mask = torch.zeros_like(prompts)
    for row, n in enumerate(lens):  # left padding: generation continues right after each prompt
        prompts[row, width - n :], mask[row, width - n :] = ids[row, :n], 1
    return prompts, mask


def laid_out(
    batch: dict[str, Any], prompts: list[torch.Tensor], completions: list[torch.Tensor], pad_id: int, eos_id: int
) -> dict[str, Any]:
    """`batch` with its rows replaced by prompt + completion, right-padded, labels on the completions only.

    Args:
        batch: the micro-batch (other keys are kept).
        prompts, completions: per row, 1-D long tensors (a completion ends at its first `<eos>`, if any).
        pad_id, eos_id: padding and end-of-sequence ids.
    """
    total = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    seq = prompts[0].new_full((len(prompts), total), pad_id)
    labels = torch.full_like(seq, IGNORE_INDEX)
    attn = torch.zeros_like(seq)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n, k = len(p), len(c)
        seq[row, :n], seq[row, n : n + k] = p, c
        labels[row, n : n + k], attn[row, : n + k] = c, 1
    return {
        **batch,
        "input_ids": seq,
        "attention_mask": attn,
        "labels": labels,
        "prompt_len": torch.tensor([len(p) for p in prompts]),
        "completion_len": torch.tensor([len(c) for c in completions]),
        "stopped": torch.tensor([bool(len(c)) and int(c[-1]) == eos_id for c in completions]),
    }


def _cut(
    batch: dict[str, Any], new: torch.Tensor, pad_id: int, eos_id: int, stop: list[str], tokenizer=None
) -> dict[str, Any]:
    """Lay out sampled tokens `new` [B, N] after the batch's prompts, each cut after its first `<eos>` or after the
    first token that completes one of the `stop` strings (decoded with `tokenizer`)."""
    stopped = (new == eos_id).any(dim=1)
    n_new = torch.where(stopped, (new == eos_id).int().argmax(dim=1) + 1, new.shape[1]).tolist()
    completions = [new[row, :k] for row, k in enumerate(n_new)]
    if stop:
        completions = [c[: _stop_point(c.tolist(), tokenizer, stop)] for c in completions]
    lens = batch["prompt_len"].tolist()
    prompts = [batch["input_ids"][row, :n] for row, n in enumerate(lens)]
    out = laid_out(batch, prompts, completions, pad_id, eos_id)
    out["stopped"] = out["stopped"] | torch.tensor([len(c) < k for c, k in zip(completions, n_new, strict=True)])
    return out


def _stop_point(ids: list[int], tokenizer, stop: list[str]) -> int:
    """The shortest prefix of `ids` whose text holds a stop string (its length), else len(ids).

    Whether a prefix holds one only grows with its length, so a bisection needs about log2(len) decodes.
    """
    if not any(s in tokenizer.decode(ids) for s in stop):
        return len(ids)
    low, high = 0, len(ids)  # the prefix of length `high` holds a stop string, that of length `low` does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if any(s in tokenizer.decode(ids[:mid]) for s in stop) else (mid, high)
    return high


@torch.no_grad()
def rollout(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: OnPolicyConfig,
    pad_id: int,
    eos_id: int,
    seed: int,
    tokenizer=None,
    greedy: bool = False,
    id_map: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Replace a batch's completions by the model's samples: the same prompts, new completions, new labels.

    Args:
        model: the bare student, or the teacher (seq-KD, health) (eval mode is set for sampling and restored after).
        batch: `input_ids`, `attention_mask` [B, L] (right-padded), `prompt_len` [B].
        cfg: the on_policy section (max_new_tokens, temperature, top_p, stop).
        pad_id, eos_id: the tokenizer's padding and end-of-sequence ids.
        seed: seeds the sampling (the global RNG is left as it was).
        tokenizer: decodes the samples for `cfg.stop` (needed only with stop strings).
        greedy: decode greedily instead of sampling (temperature and top_p unused).
        id_map: [V_student] student id -> model id, for a teacher of a trimmed student: the model reads the mapped
            prompt and may only write the student's ids (its distribution renormalized over them, as the losses
            see it); the samples come back as student ids.

    Returns:
        The batch with `input_ids`, `attention_mask`, `labels` [B, L'] (right-padded, L' = longest prompt +
        completion) and `completion_len` [B], `stopped` [B] bool (ended with `<eos>`).
    """
    prompts, mask = _left_padded(batch, pad_id)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    options: dict[str, Any] = {"do_sample": False} if greedy else sampling
    if cfg.stop and id_map is None:  # (stop strings of a mapped model are cut after, on the student's ids)
        options |= {"stop_strings": cfg.stop, "tokenizer": tokenizer}
    ids, pad, eos = prompts, pad_id, eos_id
    if id_map is not None:
        ids, pad, eos = id_map[prompts], int(id_map[pad_id]), int(id_map[eos_id])
        vocab = model.get_output_embeddings().weight.shape[0]
        kept = torch.zeros(vocab, dtype=torch.bool, device=id_map.device).index_fill_(0, id_map, True)
        options["suppress_tokens"] = (~kept).nonzero()[:, 0].tolist()
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[prompts.device] if prompts.is_cuda else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            **options,
        )
    model.train(was_training)
    new = out[:, prompts.shape[1] :]
    if id_map is not None:  # back to student ids (every written id is one of id_map's; padding -> pad_id)
        back = torch.full((vocab,), pad_id, dtype=torch.long, device=new.device)
        back[id_map] = torch.arange(len(id_map), device=new.device)
        new = back[new]
    return _cut(batch, new, pad_id, eos_id, cfg.stop, tokenizer)


HEALTH_COUNTS = ("rollouts", "rollout_tokens", "rollout_eos", "bigrams", "distinct_bigrams", "looped")


def health_counts(batch: dict[str, Any]) -> dict[str, int]:
    """The health sums of a rollout batch (from `rollout`): completions, their tokens, how many stopped, bigrams and
    distinct bigrams (counted within each completion), and how many loop (a trigram occurs >= 3 times in it)."""
    counts = dict.fromkeys(HEALTH_COUNTS, 0)
    counts["rollouts"] = len(batch["completion_len"])
    counts["rollout_tokens"] = int(batch["completion_len"].sum())
    counts["rollout_eos"] = int(batch["stopped"].sum())
    for labels in batch["labels"]:
        tokens = labels[labels != IGNORE_INDEX].tolist()
        pairs = list(zip(tokens, tokens[1:], strict=False))
        counts["bigrams"] += len(pairs)
        counts["distinct_bigrams"] += len(set(pairs))
        trigrams = Counter(zip(tokens, tokens[1:], tokens[2:], strict=False))
        counts["looped"] += int(max(trigrams.values(), default=0) >= 3)
    return counts


def health_figures(counts: dict[str, float]) -> dict[str, float]:
    """`len` (mean tokens per completion), `eos_rate`, `distinct2` (distinct / all bigrams) and `loop_rate` (share of
    completions with a trigram repeated >= 3 times) from summed `health_counts`."""
    n = max(counts["rollouts"], 1)
    return {
        "len": counts["rollout_tokens"] / n,
        "eos_rate": counts["rollout_eos"] / n,
        "distinct2": counts["distinct_bigrams"] / max(counts["bigrams"], 1),
        "loop_rate": counts["looped"] / n,
    }


@torch.no_grad()
def mixed_rollout(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, Any],
    cfg: OnPolicyConfig,
    pad_id: int,
    eos_id: int,
    seed: int,
    tokenizer=None,
) -> dict[str, Any]:
    """`rollout` with each token drawn from `cfg.teacher_mix * p + (1 - cfg.teacher_mix) * q` (MiniLLM).

    Both distributions are softmax(logits / cfg.temperature); there is no nucleus cut (the config requires
    top_p = 1), so the importance weights q / mixture computed at the loss are exact per token.

    Args:
        student: the bare student (eval mode for sampling, restored after).
        teacher: the teacher model, on the same device and over the same vocabulary.
        batch, pad_id, eos_id, seed, tokenizer: as for `rollout` (stop strings cut the samples after the loop).
        cfg: the on_policy section (max_new_tokens, temperature, teacher_mix, stop).
    """
    prompts, mask = _left_padded(batch, pad_id)
    was_training = student.training
    student.eval()
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    caches = [DynamicCache(), DynamicCache()]
    ids, positions = prompts, (mask.cumsum(-1) - 1).clamp_min(0)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    new = []
    for _ in range(cfg.max_new_tokens):
        q, p = (
            torch.softmax(
                model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
                .logits[:, -1]
                .float()
                / cfg.temperature,
                -1,
            )
            for model, cache in zip((student, teacher), caches, strict=True)
        )
        token = torch.multinomial(cfg.teacher_mix * p + (1 - cfg.teacher_mix) * q, 1, generator=generator)[:, 0]
        token = torch.where(done, pad_id, token)
        new.append(token)
        done |= token == eos_id
        if bool(done.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    student.train(was_training)
    return _cut(batch, torch.stack(new, dim=1), pad_id, eos_id, cfg.stop, tokenizer)


class ReplayBuffer:
    """DistiLLM's replay buffer: the latest `size` sampled sequences (first in, first out).

    Args:
        size: capacity in sequences.
        rows: stored rows to start from (`rows` of a saved buffer): [prompt ids, completion ids] per sequence.
    """

    def __init__(self, size: int, rows: list[list[list[int]]] | None = None):
        self.size, self.rows = size, list(rows or [])[-size:] if size else []

    @property
    def full(self) -> bool:
        return self.size > 0 and len(self.rows) >= self.size

    @staticmethod
    def sequences(batch: dict[str, Any]) -> list[list[list[int]]]:
        """A rollout batch's sequences as buffer rows ([prompt ids, completion ids] each)."""
        rows = []
        for row, n in enumerate(batch["prompt_len"].tolist()):
            k = int(batch["completion_len"][row])
            rows.append([batch["input_ids"][row, :n].tolist(), batch["input_ids"][row, n : n + k].tolist()])
        return rows

    def push(self, rows: list[list[list[int]]]) -> None:
        """Store rows (from `sequences`), dropping the oldest beyond `size`."""
        self.rows.extend(rows)
        del self.rows[: max(0, len(self.rows) - self.size)]

    def draw(self, batch: dict[str, Any], pad_id: int, eos_id: int, seed: int) -> dict[str, Any]:
        """`batch` replaced by as many stored sequences, drawn uniformly with replacement (seeded)."""
        n = len(batch["input_ids"])
        picks = torch.randint(len(self.rows), (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        device = batch["input_ids"].device
        prompts = [torch.tensor(self.rows[i][0], device=device) for i in picks]
        completions = [torch.tensor(self.rows[i][1], device=device, dtype=torch.long) for i in picks]
        return laid_out(batch, prompts, completions, pad_id, eos_id)
