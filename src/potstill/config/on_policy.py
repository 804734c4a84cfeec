"""`OnPolicyConfig`: the `on_policy` section of `DistillConfig` (rollouts and objective of `train.recipe: on_policy`).

Its own module because the section is large; what a run needs across sections (a teacher that can score new
samples, not a cache; settings that fit together) is checked by `DistillConfig.check_runnable`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from potstill.config.base import Section


class OnPolicyConfig(Section):
    """On-policy distillation (`train.recipe: on_policy`): rollouts from the student, graded by the teacher."""

    lmbda: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="GKD's lambda: the share of micro-batches whose completions the student samples (the rest"
        " train on the data's completions); 1 = fully on-policy",
    )
    objective: Literal["gkd", "rkl_sampled", "rkl_topk", "minillm"] = Field(
        default="gkd",
        description="'gkd' = the loss.name divergence on every completion token (full distributions; TRL's"
        " GKDTrainer uses jsd, beta 0.5); 'rkl_sampled' = reverse KL on the sampled tokens only, by policy"
        " gradient with the per-token reward log p_teacher(y_t) - log q_student(y_t) (Qwen3 / Thinking Machines);"
        " 'rkl_topk' = the full reverse KL over the teacher's top_k tokens (+ loss.sparse_tail) at every sampled"
        " position; 'minillm' = MiniLLM's sequence-level reverse-KL policy gradient (docs/on_policy.md)",
    )
    top_k: int = Field(
        default=64,
        ge=1,
        description="rkl_topk: teacher tokens kept per position (at most the vocabulary; = vocabulary size: the exact"
        " reverse KL); the rest of the mass is one bucket or dropped, as loss.sparse_tail says",
    )
    baseline: Literal["none", "batch", "running"] = Field(
        default="none",
        description="rkl_sampled / minillm: subtracted from the policy-gradient advantage (the value is unchanged):"
        " 'batch' = the micro-batch's mean advantage, 'running' = a running mean over past optimizer steps"
        " (baseline_decay; saved in checkpoints)",
    )
    baseline_decay: float = Field(
        default=0.9, ge=0, lt=1, description="baseline=running: b <- decay b + (1 - decay) mean advantage"
    )
    teacher_mix: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="minillm: sample the student's completions from teacher_mix p_teacher + (1 - teacher_mix)"
        " q_student (MiniLLM used 0.2), with per-token importance weights q / mixture (0 = the student alone)",
    )
    iw_clip: float = Field(default=2.0, gt=0, description="minillm: the largest importance weight")
    length_norm: bool = Field(
        default=True, description="minillm: the future reward is the mean of the future per-token rewards (not the sum)"
    )
    single_step: bool = Field(
        default=True,
        description="minillm: each step's own reward is replaced by the exact reverse KL over the vocabulary at that"
        " step (its gradient in closed form); the policy gradient keeps only the future rewards",
    )
    adaptive: bool = Field(
        default=False,
        description="DistiLLM's adaptive student-generated fraction: lmbda is the starting fraction and rises by"
        " adaptive_step whenever the validation loss on data.eval (every adaptive_every steps) fails to improve by"
        " more than adaptive_threshold (saved in checkpoints)",
    )
    adaptive_every: int = Field(default=50, gt=0, description="adaptive: optimizer steps between validations")
    adaptive_step: float = Field(default=0.1, gt=0, le=1, description="adaptive: how much lmbda rises at a time")
    adaptive_threshold: float = Field(
        default=0.0,
        description="adaptive: lmbda rises when validation loss >= previous validation loss - adaptive_threshold",
    )
    replay_size: int = Field(
        default=0,
        ge=0,
        description="DistiLLM's replay buffer: the student's latest sampled sequences kept (FIFO; saved in"
        " checkpoints); once full, a share replay_ratio of the student's micro-batches reuse them (0 = off)",
    )
    replay_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="share of the student's micro-batches taken from the full replay buffer instead of sampled"
        " fresh; null = DistiLLM's schedule, step / max_steps (rises from 0 to 1 over the run)",
    )
    seq_kd: bool = Field(
        default=False,
        description="the micro-batches the student does not complete are completed by the teacher's samples"
        " (sequence-level KD, GKD's seq_kd) instead of the data's completions",
    )
    max_new_tokens: int = Field(default=32, gt=0, description="tokens the student samples per prompt (at most)")
    stop: list[str] = Field(
        default_factory=list,
        description="stop strings: a rollout also ends with the token that completes one of them (kept and scored;"
        " no <eos> is added); [] = stop at <eos> only",
    )
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling of the rollouts (1 = off)")
    min_eos_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="stop the run (with its reason in the log and summary.json) when, over a logging interval, fewer"
        " rollouts than this share end at <eos>: a length explosion (0 = never)",
    )
    min_distinct2: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="stop the run when the rollouts' distinct bigrams / bigrams over a logging interval fall below"
        " this: the student repeats itself (0 = never)",
    )
    health_prompts: int = Field(
        default=32,
        ge=0,
        description="first N training prompts: the teacher's own health there (logged as teacher_*), the student's"
        " greedy health at the end (summary.json); 0 = off",
    )
    min_eos_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="stop the run when the rollouts' <eos> rate < this x the teacher's own on the health prompts",
    )
