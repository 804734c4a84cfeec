"""On-policy distillation (`train.recipe: on_policy`): the student learns on completions it samples itself.

Off-policy KD trains the student on text it would never write; at generation time it drifts off the teacher's
path where it was never taught (exposure bias). Here, for each micro-batch of prompt/completion rows, with
probability `on_policy.lmbda` the data's completions are replaced by the student's own samples (GKD, Agarwal et
al. 2024), drawn from the current student (HF `generate`: KV cache, left-padded prompts, stop at `<eos>`,
`max_new_tokens`, `temperature`, `top_p`); with `seq_kd` the other micro-batches are completed by the teacher's
samples instead of the data's (sequence-level KD). The prompt is never scored. The teacher then grades the completion:

- `objective: gkd`: the `loss.name` divergence on every completion token (full distributions, through the same
  KD step as off-policy training: fused or dense, online teacher), weighted as `alpha * T^2 * D + (1 - alpha) CE`;
- `objective: rkl_sampled`: reverse KL on the sampled tokens only, by policy gradient with the per-token reward
  `log p_teacher(y_t) - log q_student(y_t)` (`potstill.losses.policy`; Qwen3 / Thinking Machines 2025).

Rollouts happen in `get_batch_samples`, before the step's token count, so the objective stays normalized by the
global count of scored completion tokens of the optimizer step. Their randomness (the lambda draw and the
sampling) comes from a generator seeded by (train.seed, step, micro-batch, rank), so a resumed run samples
exactly what the uninterrupted one did. Logged every logging step: `on_policy_fraction`, `rollout_len` (mean
completion tokens), `rollout_eos_rate` (share that stopped at `<eos>`), `rollout_distinct2` (distinct bigrams /
bigrams: repetition) and, with `rkl_sampled`, `kd` is the sampled reverse KL per token. `on_policy.min_eos_rate` /
`min_distinct2` stop the run when the rollouts collapse (length explosion, repetition), with the reason logged and
in `summary.json` (`stop_reason`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from potstill.config import DistillConfig, OnPolicyConfig
from potstill.data import collate, read_many
from potstill.data.chat import render_chat
from potstill.data.packing import tokenize
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX, KDTerms, scored_mask
from potstill.losses.policy import sampled_reverse_kl
from potstill.teacher.scoring import sampled_teacher_logprobs
from potstill.train.setup import Models, training_args
from potstill.train.trainer import DistillTrainer

logger = logging.getLogger(__name__)

_HEALTH = ("rollouts", "rollout_tokens", "rollout_eos", "bigrams", "distinct_bigrams", "micro", "on_policy")


class PromptDataset(Dataset):
    """One row per prompt/completion record: `<bos> + prompt + completion + <eos>`, right-padded to `seq_len`.

    Item i: `input_ids`, `attention_mask`, `labels` [L] (labels -100 on `<bos>`, the prompt and padding),
    `prompt_len` (0-dim long: tokens before the completion), `domain`. `pad_id` is the padding id it used (the
    tokenizer's pad, else its `<eos>`), which rollouts pad with too.

    Raises:
        UserError: a plain-text record (no prompt), a prompt that leaves less than `max_new_tokens` of `seq_len`.
    """

    def __init__(self, paths: list[str], tokenizer, seq_len: int, max_new_tokens: int, add_bos: bool = True):
        records = render_chat(read_many(paths), tokenizer)
        bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        self.pad_id = pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = []
        for record, doc in zip(records, tokenize(records, tokenizer), strict=True):
            if record.prompt is None:
                raise UserError(f"{record.path}:{record.line}: train.recipe=on_policy needs prompt/completion rows")
            n_prompt = len(bos) + int((~doc.scored).sum())
            if n_prompt + max_new_tokens > seq_len:
                raise UserError(
                    f"{record.path}:{record.line}: prompt of {n_prompt} tokens + on_policy.max_new_tokens "
                    f"{max_new_tokens} exceeds data.seq_len {seq_len}"
                )
            ids = (bos + doc.ids.tolist())[:seq_len]
            labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
            fill = seq_len - len(ids)
            rows.append((ids + [pad] * fill, [1] * len(ids) + [0] * fill, labels + [IGNORE_INDEX] * fill, n_prompt))
        self.input_ids, self.attention_mask, self.labels = (torch.tensor([r[i] for r in rows]) for i in range(3))
        self.prompt_len = torch.tensor([r[3] for r in rows])
        self.domains = [r.domain for r in records]

    def __len__(self) -> int:
        return len(self.prompt_len)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
            "prompt_len": self.prompt_len[i],
            "domain": self.domains[i],
        }


@torch.no_grad()
def rollout(
    model: nn.Module, batch: dict[str, Any], cfg: OnPolicyConfig, pad_id: int, eos_id: int, seed: int
) -> dict[str, Any]:
    """Replace a batch's completions by the student's samples: the same prompts, new completions, new labels.

    Args:
        model: the bare student (eval mode is set for sampling and restored after).
        batch: `input_ids`, `attention_mask` [B, L] (right-padded), `prompt_len` [B].
        cfg: the on_policy section (max_new_tokens, temperature, top_p).
        pad_id, eos_id: the tokenizer's padding and end-of-sequence ids.
        seed: seeds the sampling (the global RNG is left as it was).

    Returns:
        The batch with `input_ids`, `attention_mask`, `labels` [B, L'] (right-padded, L' = longest prompt +
        completion) and `completion_len` [B], `stopped` [B] bool (ended with `<eos>`).
    """
    ids, lens = batch["input_ids"], batch["prompt_len"].tolist()
    width = max(lens)
    prompts = ids.new_full((len(lens), width), pad_id)
    mask = torch.zeros_like(prompts)
    for row, n in enumerate(lens):  # left padding: generation continues right after each prompt
        prompts[row, width - n :], mask[row, width - n :] = ids[row, :n], 1
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[ids.device] if ids.is_cuda else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompts,
            attention_mask=mask,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
    model.train(was_training)
    new = out[:, width:]
    stopped = (new == eos_id).any(dim=1)
    n_new = torch.where(
        stopped, (new == eos_id).int().argmax(dim=1) + 1, torch.full_like(stopped, new.shape[1], dtype=torch.long)
    )
    total = max(n + int(k) for n, k in zip(lens, n_new.tolist(), strict=True))
    seq = ids.new_full((len(lens), total), pad_id)
    labels = torch.full_like(seq, IGNORE_INDEX)
    attn = torch.zeros_like(seq)
    for row, (n, k) in enumerate(zip(lens, n_new.tolist(), strict=True)):
        seq[row, :n], seq[row, n : n + k] = ids[row, :n], new[row, :k]
        labels[row, n : n + k], attn[row, : n + k] = new[row, :k], 1
    return {
        **batch,
        "input_ids": seq,
        "attention_mask": attn,
        "labels": labels,
        "completion_len": n_new,
        "stopped": stopped,
    }


class OnPolicyTrainer(DistillTrainer):
    """`DistillTrainer` whose micro-batches are, with probability lambda, completed by the student first."""

    def __init__(self, *args, on_policy: OnPolicyConfig, pad_id: int, eos_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_policy, self.pad_id, self.eos_id = on_policy, pad_id, eos_id
        self._health = dict.fromkeys(_HEALTH, 0)
        self.stop_reason: str | None = None  # why the run stopped early (on_policy.min_eos_rate / min_distinct2)

    def prepare_step(self, batches: list[dict], device: torch.device) -> list[dict]:
        """Complete the chosen micro-batches by the student (probability lambda each, seeded per step and batch)."""
        student = self.accelerator.unwrap_model(self.model)
        step = self.state.global_step
        out = []
        for i, batch in enumerate(batches):
            seed = ((self.args.seed * 1_000_003 + step) * 4096 + i) * 1024 + self.args.process_index
            self._health["micro"] += 1
            on_policy = torch.rand((), generator=torch.Generator().manual_seed(seed)).item() < self.on_policy.lmbda
            # the student samples the completion, or with seq_kd the teacher does (its vocabulary is the student's)
            writer = student if on_policy else self.teacher.model if self.on_policy.seq_kd else None
            if writer is not None:
                moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch = rollout(writer, moved, self.on_policy, self.pad_id, self.eos_id, seed + 1)
            if on_policy:
                self._note(batch)
            out.append(batch)
        return out

    def _note(self, batch: dict[str, Any]) -> None:
        """Add a rollout batch to the health sums (length, eos, repetition)."""
        h = self._health
        h["on_policy"] += 1
        h["rollouts"] += len(batch["completion_len"])
        h["rollout_tokens"] += int(batch["completion_len"].sum())
        h["rollout_eos"] += int(batch["stopped"].sum())
        for labels in batch["labels"]:
            tokens = labels[labels != IGNORE_INDEX].tolist()
            pairs = list(zip(tokens, tokens[1:], strict=False))
            h["bigrams"] += len(pairs)
            h["distinct_bigrams"] += len(set(pairs))

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        """`gkd`: the KD step of `DistillTrainer`; `rkl_sampled`: policy-gradient reverse KL on the sampled tokens."""
        if self.on_policy.objective == "gkd":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mask = scored_mask(labels)
        targets = labels[:, 1:][mask]
        student = outputs.logits[:, :-1][mask].float()  # [n, V]: the scored positions only
        temperature = self.loss_cfg.temperature
        log_q = F.log_softmax(student / temperature, -1).gather(1, targets[:, None])[:, 0]
        log_p = sampled_teacher_logprobs(self.teacher, inputs, mask, temperature)
        denom = torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch).clamp_min(1)
        ce = F.cross_entropy(student, targets, reduction="sum") / denom
        terms = KDTerms(kd=sampled_reverse_kl(log_q, log_p).sum() / denom, ce=ce, n_tokens=int(mask.sum()))
        return self.finish_loss(model, terms, outputs, return_outputs, num_items_in_batch)

    def _check_collapse(self, logs: dict[str, float]) -> None:
        """Stop training (after this step; the student is saved) when the rollouts collapsed, saying why."""
        cfg, step = self.on_policy, self.state.global_step
        if logs["rollout_eos_rate"] < cfg.min_eos_rate:
            self.stop_reason = (
                f"step {step}: only {logs['rollout_eos_rate']:.0%} of the rollouts ended at <eos>"
                f" (on_policy.min_eos_rate {cfg.min_eos_rate}): length explosion"
            )
        elif logs["rollout_distinct2"] < cfg.min_distinct2:
            self.stop_reason = (
                f"step {step}: rollout distinct bigrams {logs['rollout_distinct2']:.3f} < on_policy.min_distinct2"
                f" {cfg.min_distinct2}: the student repeats itself"
            )
        if self.stop_reason is not None:
            logger.warning("stopping: %s", self.stop_reason)
            self.control.should_training_stop = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the rollouts' health (since the last log) to a training log."""
        h = self._health
        if "loss" in logs and h["micro"]:
            logs["on_policy_fraction"] = h["on_policy"] / h["micro"]
            if h["rollouts"]:
                logs["rollout_len"] = h["rollout_tokens"] / h["rollouts"]
                logs["rollout_eos_rate"] = h["rollout_eos"] / h["rollouts"]
                logs["rollout_distinct2"] = h["distinct_bigrams"] / max(h["bigrams"], 1)
                self._check_collapse(logs)
            self._health = dict.fromkeys(_HEALTH, 0)
        super().log(logs, start_time)


class OnPolicyRecipe:
    """`train.recipe: on_policy` (see the module docstring)."""

    def read(self, cfg: DistillConfig) -> None:
        return None  # the prompts are read with the student's tokenizer, in `trainer`

    def trainer(self, cfg: DistillConfig, models: Models, out: Path, data: None) -> OnPolicyTrainer:
        tok = models.tokenizer
        if tok.eos_token_id is None:
            raise UserError(f"{cfg.model.student}: the student's tokenizer has no <eos>: its samples could never stop")
        if cfg.on_policy.seq_kd and models.teacher.id_map is not None:
            raise UserError(
                f"{cfg.model.student}: on_policy.seq_kd needs the teacher's vocabulary; this student has a trimmed one"
                " (an id map), so the teacher's samples could hold tokens it cannot read"
            )
        dataset = PromptDataset(cfg.data.train, tok, cfg.data.seq_len, cfg.on_policy.max_new_tokens, cfg.data.add_bos)
        stop = models.specials.stop_id if models.specials is not None else tok.eos_token_id
        return OnPolicyTrainer(
            model=models.student,
            args=training_args(cfg),
            train_dataset=dataset,
            data_collator=collate,
            teacher=models.teacher,
            loss_cfg=cfg.loss,
            on_policy=cfg.on_policy,
            pad_id=dataset.pad_id,
            eos_id=stop,
        )

    def finish(self, trainer: OnPolicyTrainer, cfg: DistillConfig, models: Models, out: Path, data: None) -> dict:
        summary = {"objective": cfg.on_policy.objective, "lmbda": cfg.on_policy.lmbda}
        return summary if trainer.stop_reason is None else summary | {"stop_reason": trainer.stop_reason}
