"""Training a speech student: word-level KD on the decoder's tokens + CE on the teacher's pseudo-labels.

The decoder reads `prompt + pseudo-label + <|endoftext|>`; position t predicts token t + 1 (the causal-LM
convention of `losses.kd_terms`), so the labels are that sequence with the prompt masked. The KD term is
the zoo's divergence between the student's and the teacher's distributions at each scored position
(`losses.sparse.sparse_kd_terms` on the cached top-k targets), the loss `losses.combine`:
alpha * T^2 * D + (1 - alpha) * CE. alpha = 0 is the CE-only twin (same data, steps, seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from potstill.data.audio import load_audio, log_mel
from potstill.errors import UserError
from potstill.fileio import atomic_path, write_json_atomic
from potstill.losses import IGNORE_INDEX, Divergence, KDTerms, combine
from potstill.losses.sparse import SparseTargets, restrict_targets, sparse_kd_terms
from potstill.models.vocab import id_map_tokenizer, load_id_map
from potstill.models.whisper import decoder_prompt, input_frames, load_whisper
from potstill.student.speech import trainable_parameters
from potstill.teacher.cache.format import tokenizer_fingerprint
from potstill.teacher.speech import SpeechTargets

DONE = "speech_train.json"


@dataclass(frozen=True)
class SpeechTrainConfig:
    """Budget and objective of one student run.

    Attributes:
        alpha: weight of the KD term (0 = CE-only twin).
        divergence: the zoo's divergence (name, temperature, sparse tail).
        epochs: passes over the kept clips.
        batch_size: clips per step.
        lr: peak AdamW learning rate (linear warm-up over 10% of steps, linear decay to 0).
        seed: shuffling and dropout seed.
        freeze_encoder: train the decoder only, on encoder states computed once per clip.
    """

    alpha: float = 0.5
    divergence: Divergence = Divergence()
    epochs: int = 4
    batch_size: int = 8
    lr: float = 3e-4
    seed: int = 0
    freeze_encoder: bool = True


def decoder_batch(
    prompt: list[int], ids: list[list[int]], targets: list[SparseTargets], eos: int
) -> tuple[torch.Tensor, torch.Tensor, SparseTargets]:
    """Decoder inputs, labels and position-aligned teacher targets of a batch of pseudo-labels.

    Args:
        prompt: forced decoder prefix.
        ids: B pseudo-labels (no prompt, no end token).
        targets: B SparseTargets [len(ids[b]) + 1, k], predicting each id and the end token.
        eos: end token id (also the padding).

    Returns:
        (decoder_input_ids [B, T], labels [B, T] with prompt and padding at -100, SparseTargets [B, T, k] where
        position t holds the teacher's targets for token t + 1; unscored positions hold zeros).
    """
    seqs = [prompt + seq + [eos] for seq in ids]
    length, k = max(map(len, seqs)), targets[0].k
    inputs = torch.full((len(seqs), length), eos, dtype=torch.long)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    top_ids = torch.zeros(len(seqs), length, k, dtype=torch.long)
    logprobs = torch.zeros(len(seqs), length, k)
    tail = torch.zeros(len(seqs), length)
    first = len(prompt) - 1  # the position that predicts the first transcript token
    for b, (seq, tgt) in enumerate(zip(seqs, targets, strict=True)):
        inputs[b, : len(seq)] = torch.tensor(seq)
        labels[b, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
        rows = slice(first, first + tgt.ids.shape[0])
        top_ids[b, rows], logprobs[b, rows], tail[b, rows] = tgt.ids.long(), tgt.logprobs.float(), tgt.tail.float()
    return inputs, labels, SparseTargets(top_ids, logprobs, tail, targets[0].temperature)


def speech_kd_terms(
    student_logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, div: Divergence
) -> KDTerms:
    """KD (on the cached top-k teacher targets) and CE (on the pseudo-labels) terms of decoder logits [B, T, V]."""
    return sparse_kd_terms(student_logits, targets, labels, div)


def student_inputs(processor, model, targets: SpeechTargets, freeze_encoder: bool, chunk: int = 8) -> torch.Tensor:
    """Per kept clip, what the training step feeds the student (computed once per run).

    Returns:
        [N, n_mels, frames] log-mel features in the student's window, or, with a frozen encoder, [N, S, H] its
        encoder states.
    """
    clips = [load_audio(rec.audio) for rec in targets.records]
    features = log_mel(processor.feature_extractor, clips, input_frames(model))
    if not freeze_encoder:
        return features
    with torch.no_grad():
        return torch.cat(
            [model.model.encoder(features[i : i + chunk]).last_hidden_state for i in range(0, len(features), chunk)]
        )


def check_tokenizer(tokenizer, targets: SpeechTargets, student_dir: str | Path) -> None:
    """The pseudo-labels are token ids of the teacher's tokenizer: the student must have the very same one, or a
    trimmed vocabulary whose id map was made from it.

    Raises:
        UserError: the student's tokenizer (or its id map's) differs from the one the targets were made with.
    """
    made_with = targets.meta.get("tokenizer")
    has_map = load_id_map(student_dir) is not None
    student = id_map_tokenizer(student_dir) if has_map else tokenizer_fingerprint(tokenizer)
    if made_with is not None and student != made_with:
        raise UserError(
            f"{student_dir}: its tokenizer is not the teacher's that wrote the pseudo-labels; "
            "make the student from this teacher (init_speech_student) or rebuild the targets"
        )


def for_student(targets: SpeechTargets, student_dir: str | Path) -> SpeechTargets:
    """The targets in the student's token ids: unchanged, or mapped through a trimmed student's id map.

    Raises:
        UserError: a pseudo-label token the trimmed vocabulary lacks (the student was made from other labels).
    """
    id_map = load_id_map(student_dir)
    if id_map is None:
        return targets
    new_id = {int(t): s for s, t in enumerate(id_map.tolist())}
    lacking = next((i for seq in targets.ids for i in seq if i not in new_id), None)
    if lacking is not None:
        raise UserError(
            f"{student_dir}: its trimmed vocabulary lacks pseudo-label token {lacking}; "
            "make the student from these pseudo-labels (init_speech_student(corpus_ids=...))"
        )
    teacher_vocab = 1 + max(int(id_map.max()), *(int(t.ids.max()) for t in targets.targets))
    return replace(
        targets,
        ids=[[new_id[i] for i in seq] for seq in targets.ids],
        targets=[restrict_targets(t, id_map, teacher_vocab) for t in targets.targets],
    )


def train_speech_student(
    student_dir: str | Path, targets: SpeechTargets, out_dir: str | Path, cfg: SpeechTrainConfig
) -> dict:
    """Train the student in `student_dir` on `targets`; write the trained model to `out_dir` (skipped when done).

    Returns:
        The run's summary (config, steps, first and last loss, seconds), also written to out_dir/speech_train.json.
    """
    import json
    import time

    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if (out_dir / DONE).is_file():
        return json.loads((out_dir / DONE).read_text())
    torch.manual_seed(cfg.seed)
    model, processor = load_whisper(student_dir)
    check_tokenizer(processor.tokenizer, targets, student_dir)
    targets = for_student(targets, student_dir)
    model.train()
    inputs_per_clip = student_inputs(processor, model, targets, cfg.freeze_encoder)
    prompt, eos = decoder_prompt(model, processor.tokenizer), model.config.eos_token_id
    params = trainable_parameters(model, cfg.freeze_encoder)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n = len(targets.records)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = per_epoch * cfg.epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    losses, start = [], time.perf_counter()
    with tqdm(total=total, desc=f"train alpha={cfg.alpha} seed={cfg.seed}") as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                inputs, labels, tgt = decoder_batch(
                    prompt, [targets.ids[j] for j in idx], [targets.targets[j] for j in idx], eos
                )
                if cfg.freeze_encoder:
                    out = model(encoder_outputs=(inputs_per_clip[idx],), decoder_input_ids=inputs)
                else:
                    out = model(input_features=inputs_per_clip[idx], decoder_input_ids=inputs)
                logits = out.logits
                terms = speech_kd_terms(logits, tgt, labels, cfg.divergence)
                loss = combine(terms, cfg.alpha, cfg.divergence.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    summary = {
        "alpha": cfg.alpha,
        "divergence": cfg.divergence.name,
        "temperature": cfg.divergence.temperature,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "freeze_encoder": cfg.freeze_encoder,
        "clips": n,
        "steps": total,
        "loss_first": losses[0],
        "loss_last_epoch": sum(losses[-per_epoch:]) / per_epoch,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(Path(tmp) / DONE, summary)
    return summary
