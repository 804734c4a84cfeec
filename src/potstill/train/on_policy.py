"""On-policy distillation (`train.recipe: on_policy`): the student learns on completions it samples itself.

Off-policy KD trains the student on text it would never write; at generation time it drifts off the teacher's
path where it was never taught (exposure bias). Here, for each micro-batch of prompt/completion rows, with
probability lambda the data's completions are replaced by the student's own samples (GKD, Agarwal et al. 2024;
`potstill.train.rollouts`: HF `generate` with a KV cache, left-padded prompts, stop at `<eos>` or a stop string;
MiniLLM's teacher-mixed sampler); with `seq_kd` the other micro-batches are completed by the teacher's samples
instead of the data's (sequence-level KD). The prompt is never scored. The teacher then grades the completion:

- `objective: gkd`: the `loss.name` divergence on every completion token (full distributions, through the same
  KD step as off-policy training: fused or dense, online teacher), weighted as `alpha * T^2 * D + (1 - alpha) CE`;
- `objective: rkl_topk`: the reverse KL over the teacher's top-k tokens (+ a rest bucket or renormalized,
  `loss.sparse_tail`) at every completion token (`losses.sparse`; exact at k = vocabulary);
- `objective: rkl_sampled`: reverse KL on the sampled tokens only, by policy gradient with the per-token reward
  `log p_teacher(y_t) - log q_student(y_t)` (`potstill.losses.policy`; Qwen3 / Thinking Machines 2025);
- `objective: minillm`: MiniLLM's sequence-level policy gradient (length-normalized future reward, single-step
  decomposition, importance weights for teacher-mixed samples; `losses.policy.minillm_surrogate`).

The two policy-gradient objectives take a baseline (`on_policy.baseline`: none, the micro-batch's mean advantage,
or a running mean). DistiLLM (Ko et al. 2024): with `adaptive`, lambda rises when the validation loss on
`data.eval` stalls; with `replay_size`, the student's samples go into a replay buffer that later micro-batches
reuse. Lambda, the last validation loss, the running baseline and the buffer are an `OnPolicyState`, saved in
every checkpoint.

Rollouts happen in `get_batch_samples`, before the step's token count, so the objective stays normalized by the
global count of scored completion tokens of the optimizer step. Their randomness (the lambda draw, the replay
draw and the sampling) comes from generators seeded by (train.seed, step, the micro-batch's place in the global
batch), so a resumed run samples exactly what the uninterrupted one did, and N ranks what one process with N times
the grad_accum does. What is carried across steps is the same on every rank: the replay buffer takes every rank's
fresh samples at the end of a step, the running baseline moves once per optimizer step by the mean advantage over
all ranks, and the logged health figures are sums over ranks.

Logged every logging step: `on_policy_fraction`, `rollout_len`
(mean completion tokens of fresh samples), `rollout_eos_rate` (share that stopped at `<eos>` or a stop string),
`rollout_distinct2` (distinct bigrams / bigrams: repetition), `rollout_loop_rate`, beside them the teacher's own
`teacher_*` figures on the first `health_prompts` training prompts (measured once), the reward and advantage
statistics of the policy-gradient objectives, `replay_fraction`, and `lmbda` / `val_loss` with `adaptive`.
`on_policy.min_eos_rate` / `min_distinct2` stop the run when the rollouts collapse (length explosion, repetition),
with the reason logged and in `summary.json` (`stop_reason`); `min_eos_ratio` compares the `<eos>` rate with the
teacher's. At the end, the student's greedy answers to the health prompts go into `summary.json` (`health`): sampled
rollouts hide greedy loops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from potstill.config import DistillConfig, OnPolicyConfig
from potstill.data import collate, read_many
from potstill.data.chat import render_chat
from potstill.data.packing import tokenize
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX, KDTerms, kd_weights, scored_mask
from potstill.losses.divergences import rkl
from potstill.losses.policy import minillm_surrogate, sampled_reverse_kl
from potstill.losses.sparse import SparseTargets, topk_targets
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.scoring import EndpointScorer, sampled_teacher_logprobs
from potstill.train.rollouts import HEALTH_COUNTS, ReplayBuffer, health_counts, health_figures, mixed_rollout, rollout
from potstill.train.setup import Models, training_args
from potstill.train.step import kd_micro_step, loss_terms, student_head, student_outputs
from potstill.train.trainer import DistillTrainer

logger = logging.getLogger(__name__)

_HEALTH = (
    *HEALTH_COUNTS,
    *("micro", "on_policy", "replayed", "pg_tokens", "reward_sum", "reward_sq", "advantage_sum", "advantage_sq"),
)


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


class OnPolicyState(TrainerCallback, ExportableState):
    """What an on-policy run carries from step to step, stored in every checkpoint's `trainer_state.json`, so a
    resumed run continues exactly: the student-generated fraction (lambda; DistiLLM's adaptive schedule moves it),
    the last validation loss, the running baseline, and the replay buffer's sequences.

    Args:
        lmbda: the current share of micro-batches the student completes.
        previous_val: the last validation loss (adaptive), or None.
        baseline: the running mean advantage (baseline=running), or None before the first batch.
        replay_size: the replay buffer's capacity (0 = none).
        replay: its sequences, oldest first ([prompt ids, completion ids] each).
    """

    def __init__(
        self,
        lmbda: float,
        previous_val: float | None = None,
        baseline: float | None = None,
        replay_size: int = 0,
        replay: list | None = None,
    ):
        self.lmbda, self.previous_val, self.baseline = lmbda, previous_val, baseline
        self.buffer = ReplayBuffer(replay_size, replay)

    def state(self) -> dict:
        args = {"lmbda": self.lmbda, "previous_val": self.previous_val, "baseline": self.baseline}
        return {"args": args | {"replay_size": self.buffer.size, "replay": self.buffer.rows}, "attributes": {}}


class OnPolicyTrainer(DistillTrainer):
    """`DistillTrainer` whose micro-batches are, with probability lambda, completed by the student first.

    Args:
        on_policy: the on_policy config section.
        pad_id, eos_id: padding id and the id rollouts stop at.
        val_data: held-out prompt/completion rows (`PromptDataset`) for the adaptive fraction, or None.
        tokenizer: the student's tokenizer (stop strings are matched on decoded samples).
    """

    def __init__(
        self, *args, on_policy: OnPolicyConfig, pad_id: int, eos_id: int, val_data=None, tokenizer=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.on_policy, self.pad_id, self.eos_id, self.val_data = on_policy, pad_id, eos_id, val_data
        self.tokenizer = tokenizer  # decodes rollouts for on_policy.stop
        self.add_callback(OnPolicyState(on_policy.lmbda, replay_size=on_policy.replay_size))
        self._health = dict.fromkeys(_HEALTH, 0)
        self._advantages = torch.zeros(2, dtype=torch.float64)  # this step's [sum, count] before the baseline
        self.add_callback(_StepEnd(self))
        self._val: float | None = None  # the validation loss measured since the last log
        self.stop_reason: str | None = None  # why the run stopped early (on_policy.min_eos_rate / min_distinct2)
        self.reference: dict[str, float] | None = None  # the teacher's health, measured before the first rollout

    @property
    def carried(self) -> OnPolicyState:
        """The run's `OnPolicyState` (looked up: restoring a checkpoint replaces the callback object)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, OnPolicyState))

    def prepare_step(self, batches: list[dict], device: torch.device) -> list[dict]:
        """Complete the chosen micro-batches by the student, fresh or from the replay buffer (seeded per step and
        micro-batch); with `adaptive`, first validate and raise lambda when the validation loss stalls."""
        cfg, state, step = self.on_policy, self.carried, self.state.global_step
        if cfg.adaptive and step % cfg.adaptive_every == 0:
            self._adapt(state)
        student = self.accelerator.unwrap_model(self.model)
        # DistiLLM: a share `ratio` of the student's micro-batches replays stored samples once the buffer is full
        ratio = cfg.replay_ratio if cfg.replay_ratio is not None else step / max(self.state.max_steps, 1)
        out, fresh = [], []
        for i, batch in enumerate(batches):
            # seeded by the micro-batch's place in the global batch (rank r's i-th is the (i * world + r)-th, as
            # accelerate deals batches round-robin), so N ranks draw what one process with N x grad_accum does;
            # (x 1024: a single process keeps the seeds of earlier versions, which added the rank there)
            micro = i * self.args.world_size + self.args.process_index
            seed = ((self.args.seed * 1_000_003 + step) * 4096 + micro) * 1024
            self._health["micro"] += 1
            draw = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
            on_policy = draw < state.lmbda
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if on_policy and state.buffer.full and draw >= state.lmbda * (1 - ratio):
                batch = state.buffer.draw(moved, self.pad_id, self.eos_id, seed + 2)
                self._health["on_policy"] += 1
                self._health["replayed"] += 1
            elif on_policy:
                if self.reference is None:
                    self.reference = self.teacher_reference()
                if cfg.teacher_mix > 0:
                    teacher = self.teacher.model
                    batch = mixed_rollout(
                        student, teacher, moved, cfg, self.pad_id, self.eos_id, seed + 1, self.tokenizer
                    )
                else:
                    batch = rollout(student, moved, cfg, self.pad_id, self.eos_id, seed + 1, self.tokenizer)
                self._note(batch)
                fresh.append((micro, state.buffer.sequences(batch) if state.buffer.size else []))
            elif cfg.seq_kd:  # the teacher writes the completion (its vocabulary is the student's)
                batch = rollout(self.teacher.model, moved, cfg, self.pad_id, self.eos_id, seed + 1, self.tokenizer)
            out.append(batch)
        if state.buffer.size:
            self._store(fresh)
        return out

    def _store(self, fresh: list[tuple[int, list]]) -> None:
        """Add this step's fresh samples of every rank to the replay buffer, in global micro-batch order: all ranks
        keep the same buffer (the one rank 0's checkpoints save), the one a single process would hold."""
        if self.args.world_size > 1:
            fresh = gather_object(fresh)
        for _, rows in sorted(fresh, key=lambda item: item[0]):
            self.carried.buffer.push(rows)

    def _adapt(self, state: OnPolicyState) -> None:
        """DistiLLM: raise lambda by `adaptive_step` when the validation loss did not improve by the threshold."""
        cfg = self.on_policy
        self._val = val = self.validation_loss()
        if state.previous_val is not None and val >= state.previous_val - cfg.adaptive_threshold:
            state.lmbda = min(1.0, state.lmbda + cfg.adaptive_step)
            logger.info("step %d: validation loss %.4g: lambda -> %.2f", self.state.global_step, val, state.lmbda)
        state.previous_val = val

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The `loss.name` divergence per token from the teacher on `val_data`'s own completions (teacher-forced)."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        loader = DataLoader(self.val_data, batch_size=self.args.per_device_train_batch_size, collate_fn=collate)
        for batch in loader:
            moved = {k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            terms, _ = kd_micro_step(model, model, moved, self.teacher, self.loss_cfg, None, None, plan_weights=False)
            total, count = total + float(terms.kd) * terms.n_tokens, count + terms.n_tokens
        model.train(was_training)
        return total / max(count, 1)

    def _note(self, batch: dict[str, Any]) -> None:
        """Add a fresh rollout batch to the health sums (length, eos, repetition)."""
        self._health["on_policy"] += 1
        for key, value in health_counts(batch).items():
            self._health[key] += value

    def health_of(self, model: nn.Module, greedy: bool, id_map: torch.Tensor | None = None) -> dict[str, float]:
        """`health_figures` of `model`'s completions of the first `on_policy.health_prompts` training prompts, at
        the rollouts' settings (sampled, seeded by train.seed, or greedy); `id_map` for a trimmed student's teacher."""
        cfg, device = self.on_policy, self.args.device
        rows = [self.train_dataset[i] for i in range(min(cfg.health_prompts, len(self.train_dataset)))]
        counts = dict.fromkeys(HEALTH_COUNTS, 0)
        size = self.args.per_device_train_batch_size
        for start in range(0, len(rows), size):
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in collate(rows[start : start + size]).items()
            }
            seed = (self.args.seed * 1_000_003 + start) * 1024 + 3  # (not a training rollout's seed: those end in 0-2)
            done = rollout(model, batch, cfg, self.pad_id, self.eos_id, seed, self.tokenizer, greedy, id_map)
            for key, value in health_counts(done).items():
                counts[key] += value
        return health_figures(counts)

    def teacher_reference(self) -> dict[str, float]:
        """The teacher's own health on the health prompts (`teacher_len`, `teacher_eos_rate`, `teacher_distinct2`,
        `teacher_loop_rate` sampled as the student samples; `teacher_greedy_*` greedy), once: what a student that
        imitates it would show. {} when off (health_prompts 0) or when the teacher cannot sample here (endpoint)."""
        if not self.on_policy.health_prompts or not isinstance(self.teacher, OnlineTeacher):
            return {}
        teacher, id_map = self.teacher.model, self.teacher.id_map
        sampled, greedy = (self.health_of(teacher, g, id_map) for g in (False, True))
        logger.info(
            "teacher health on %d prompts: sampled %s, greedy %s", self.on_policy.health_prompts, sampled, greedy
        )
        return {f"teacher_{k}": v for k, v in sampled.items()} | {f"teacher_greedy_{k}": v for k, v in greedy.items()}

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        """`gkd`: the KD step of `DistillTrainer`; `rkl_topk`: reverse KL on the teacher's top-k support;
        `rkl_sampled` / `minillm`: the policy-gradient reverse KL on the sampled tokens."""
        objective = self.on_policy.objective
        if objective == "gkd":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if objective == "rkl_topk":
            terms, outputs = self._topk_terms(model, inputs, num_items_in_batch)
        else:
            terms, outputs = self._policy_terms(model, inputs, num_items_in_batch)
        return self.finish_loss(model, terms, outputs, return_outputs, num_items_in_batch)

    def _topk_terms(self, model: nn.Module, inputs: dict[str, Any], num_items) -> tuple[KDTerms, Any]:
        """KL(q || p) over the teacher's top-k ids (+ the rest as one bucket, or renormalized: loss.sparse_tail)."""
        loss = self.loss_cfg.model_copy(update={"name": "rkl"})
        dense = self.is_fsdp_enabled or self.is_deepspeed_enabled
        head = None if dense else student_head(self.accelerator.unwrap_model(model), loss)
        ids, mask, k = inputs["input_ids"], inputs["attention_mask"], self.on_policy.top_k
        if isinstance(self.teacher, EndpointScorer):  # its top-k, most probable first, at temperature 1
            full = self.teacher.score(ids, mask).targets
            kept = full.logprobs[..., :k]
            tail = (-torch.expm1(torch.logsumexp(kept, dim=-1))).clamp_min(0.0)
            targets = SparseTargets(ids=full.ids[..., :k], logprobs=kept, tail=tail)
        else:
            targets = topk_targets(self.teacher.logits(ids, mask), k, loss.temperature)
        outputs = student_outputs(model, inputs, fused=head is not None)
        alpha = self.alpha
        weights = kd_weights(alpha, loss.temperature) if alpha is not None and not self._measuring(model) else None
        return loss_terms(outputs, inputs["labels"], targets, head, loss, num_items, weights), outputs

    def _policy_terms(self, model: nn.Module, inputs: dict[str, Any], num_items) -> tuple[KDTerms, Any]:
        """`rkl_sampled` or `minillm` on one micro-batch (dense: the student's logits at the scored positions)."""
        cfg, labels = self.on_policy, inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mask = scored_mask(labels)
        targets = labels[:, 1:][mask]
        student = outputs.logits[:, :-1][mask].float()  # [n, V]: the scored positions only
        temperature = self.loss_cfg.temperature
        log_q = F.log_softmax(student / temperature, -1).gather(1, targets[:, None])[:, 0]
        state = self.carried
        baseline = {"none": 0.0, "batch": "batch", "running": state.baseline or 0.0}[cfg.baseline]
        token_rkl = None
        if cfg.objective == "minillm" and cfg.single_step:  # the exact reverse KL at each step needs p over V
            teacher = self.teacher.logits(inputs["input_ids"], inputs["attention_mask"])[:, :-1][mask].float()
            log_p = F.log_softmax(teacher / temperature, -1).gather(1, targets[:, None])[:, 0]
            token_rkl = rkl(student, teacher, temperature)
        else:
            log_p = sampled_teacher_logprobs(self.teacher, inputs, mask, temperature)
        if cfg.objective == "rkl_sampled":
            per_token, advantage = sampled_reverse_kl(log_q, log_p, baseline)
        else:  # on [B, T - 1] grids, where the rewards run along each completion

            def grid(x: torch.Tensor) -> torch.Tensor:
                return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)

            kl = None if token_rkl is None else grid(token_rkl)
            per_grid, adv_grid = minillm_surrogate(
                grid(log_q), grid(log_p), mask, kl, cfg.teacher_mix, cfg.iw_clip, cfg.length_norm, baseline
            )
            per_token, advantage = per_grid[mask], adv_grid[mask]
        if model.training:
            self._note_rewards(log_p - log_q.detach(), advantage, baseline)
        denom = torch.as_tensor(mask.sum() if num_items is None else num_items).clamp_min(1)
        ce = F.cross_entropy(student, targets, reduction="sum") / denom
        return KDTerms(kd=per_token.sum() / denom, ce=ce, n_tokens=int(mask.sum())), outputs

    def _note_rewards(self, reward: torch.Tensor, advantage: torch.Tensor, baseline: float | str) -> None:
        """Add a micro-batch's rewards and advantages to the health sums and to this step's advantages."""
        h, n = self._health, reward.numel()
        h["pg_tokens"] += n
        h["reward_sum"] += float(reward.sum())
        h["reward_sq"] += float((reward**2).sum())
        h["advantage_sum"] += float(advantage.sum())
        h["advantage_sq"] += float((advantage**2).sum())
        if self.on_policy.baseline == "running" and n:  # the advantages before the baseline
            self._advantages += torch.tensor([float(advantage.sum()) + float(baseline) * n, n], dtype=torch.float64)

    def end_step(self) -> None:
        """After each optimizer step (before the Trainer logs and saves): move the running baseline by the step's
        mean advantage over all ranks, so every rank holds the value rank 0's checkpoint saves."""
        if self.on_policy.baseline != "running":
            return
        sums = self._advantages.to(self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        total, n = sums.tolist()
        self._advantages.zero_()
        if n:
            state, decay = self.carried, self.on_policy.baseline_decay
            state.baseline = total / n if state.baseline is None else decay * state.baseline + (1 - decay) * total / n

    def _check_collapse(self, logs: dict[str, float]) -> None:
        """Stop training (after this step; the student is saved) when the rollouts collapsed, saying why."""
        cfg, step = self.on_policy, self.state.global_step
        teacher_rate = (self.reference or {}).get("teacher_eos_rate")
        if logs["rollout_eos_rate"] < cfg.min_eos_rate:
            self.stop_reason = (
                f"step {step}: only {logs['rollout_eos_rate']:.0%} of the rollouts ended at <eos>"
                f" (on_policy.min_eos_rate {cfg.min_eos_rate}): length explosion"
            )
        elif teacher_rate is not None and logs["rollout_eos_rate"] < cfg.min_eos_ratio * teacher_rate:
            self.stop_reason = (
                f"step {step}: only {logs['rollout_eos_rate']:.0%} of the rollouts ended at <eos>, against the"
                f" teacher's {teacher_rate:.0%} (on_policy.min_eos_ratio {cfg.min_eos_ratio}): length explosion"
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
        """Add the rollouts' health, rewards and schedule (since the last log) to a training log."""
        if "loss" in logs and self.args.world_size > 1:  # every rank's rollouts (all ranks log together)
            sums = self.accelerator.reduce(
                torch.tensor([float(v) for v in self._health.values()], dtype=torch.float64, device=self.args.device),
                reduction="sum",
            )
            self._health = dict(zip(_HEALTH, sums.tolist(), strict=True))
        h = self._health
        if "loss" in logs and h["micro"]:
            logs["on_policy_fraction"] = h["on_policy"] / h["micro"]
            if self.on_policy.replay_size:
                logs["replay_fraction"] = h["replayed"] / h["micro"]
            if self.on_policy.adaptive:
                logs["lmbda"] = self.carried.lmbda
                if self._val is not None:
                    logs["val_loss"], self._val = self._val, None
            if h["pg_tokens"]:
                logs.update(_moments("reward", h["reward_sum"], h["reward_sq"], h["pg_tokens"]))
                logs.update(_moments("advantage", h["advantage_sum"], h["advantage_sq"], h["pg_tokens"]))
                if self.on_policy.baseline == "running":
                    logs["baseline"] = self.carried.baseline
            if h["rollouts"]:
                logs.update({f"rollout_{k}": v for k, v in health_figures(h).items()})
                logs.update(self.reference or {})  # the teacher's, beside the student's
                self._check_collapse(logs)
            self._health = dict.fromkeys(_HEALTH, 0)
        super().log(logs, start_time)


class _StepEnd(TrainerCallback):
    """Calls `OnPolicyTrainer.end_step` at the end of each optimizer step (on every rank)."""

    def __init__(self, trainer: OnPolicyTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_step()


def _moments(name: str, total: float, squares: float, count: int) -> dict[str, float]:
    """`{name}_mean` and `{name}_std` from a sum, a sum of squares and a count."""
    mean = total / count
    return {f"{name}_mean": mean, f"{name}_std": max(squares / count - mean * mean, 0.0) ** 0.5}


class OnPolicyRecipe:
    """`train.recipe: on_policy` (see the module docstring)."""

    def read(self, cfg: DistillConfig) -> None:
        return None  # the prompts are read with the student's tokenizer, in `trainer`

    def trainer(self, cfg: DistillConfig, models: Models, out: Path, data: None) -> OnPolicyTrainer:
        tok, op = models.tokenizer, cfg.on_policy
        if tok.eos_token_id is None:
            raise UserError(f"{cfg.model.student}: the student's tokenizer has no <eos>: its samples could never stop")
        for wanted, key in ((op.seq_kd, "on_policy.seq_kd"), (op.teacher_mix > 0, "on_policy.teacher_mix")):
            if wanted and models.teacher.id_map is not None:
                raise UserError(
                    f"{cfg.model.student}: {key} needs the teacher's vocabulary; this student has a trimmed one"
                    " (an id map), so the teacher's samples could hold tokens it cannot read"
                )
        for who, model in (("student", models.student), ("teacher", getattr(models.teacher, "model", None))):
            context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if context and cfg.data.seq_len > context:  # prompt + samples would run past the positions it knows
                raise UserError(
                    f"data.seq_len: {cfg.data.seq_len} is longer than the {who}'s context of {context} tokens"
                    " (max_position_embeddings); prompts + on_policy.max_new_tokens must fit in it"
                )
        vocab = models.student.get_output_embeddings().weight.shape[0]
        if op.objective == "rkl_topk" and op.top_k > vocab:
            raise UserError(f"on_policy.top_k: {op.top_k} is more than the student's vocabulary of {vocab} tokens")
        dataset = PromptDataset(cfg.data.train, tok, cfg.data.seq_len, op.max_new_tokens, cfg.data.add_bos)
        val = PromptDataset(cfg.data.eval, tok, cfg.data.seq_len, 0, cfg.data.add_bos) if op.adaptive else None
        stop = models.specials.stop_id if models.specials is not None else tok.eos_token_id
        return OnPolicyTrainer(
            model=models.student,
            args=training_args(cfg),
            train_dataset=dataset,
            data_collator=collate,
            teacher=models.teacher,
            loss_cfg=cfg.loss,
            on_policy=op,
            pad_id=dataset.pad_id,
            eos_id=stop,
            val_data=val,
            tokenizer=tok,
        )

    def finish(self, trainer: OnPolicyTrainer, cfg: DistillConfig, models: Models, out: Path, data: None) -> dict:
        summary = {"objective": cfg.on_policy.objective, "lmbda": trainer.carried.lmbda}
        if trainer.reference is not None and cfg.on_policy.health_prompts:  # the student sampled in this run
            student = trainer.accelerator.unwrap_model(trainer.model)
            greedy = {f"student_greedy_{k}": v for k, v in trainer.health_of(student, greedy=True).items()}
            summary["health"] = trainer.reference | greedy
        return summary if trainer.stop_reason is None else summary | {"stop_reason": trainer.stop_reason}
