"""Token-level KD of an image-to-text decoder (captioning / VQA): the text path's objective on [B, T, V] logits.

`fit_captioner` trains a `TinyCaptioner` on (image, `<bos> prompt answer <eos>`) examples with
`losses.kd_terms` (shifted labels: only answer tokens and `<eos>` are scored; every term divided once by the
scored-token count) and `losses.combine`: alpha * T^2 * D(teacher || student) + (1 - alpha) * CE. alpha = 0 is the
CE-only twin (and how the teacher itself is trained). Teacher logits are computed once (`teacher_logits`) over the
padded training examples; the divergence is any loss of the zoo.
"""

from __future__ import annotations

import torch

from potstill.errors import UserError
from potstill.losses import Divergence, combine, kd_terms
from potstill.models.captioner import TinyCaptioner
from potstill.train.loop import fit_loop


@torch.inference_mode()
def teacher_logits(
    teacher: TinyCaptioner, pixels: torch.Tensor, image: torch.Tensor, ids: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """The teacher's logits [N, T, V] (float32) on padded examples ids [N, T] of images pixels[image]."""
    teacher.eval()
    parts = [
        teacher(pixels[image[i : i + batch_size]], ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)
    ]
    return torch.cat(parts).float()


def fit_captioner(
    model: TinyCaptioner,
    pixels: torch.Tensor,
    image: torch.Tensor,
    ids: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    div: Divergence,
    alpha: float,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train for `steps` AdamW steps (learning rate decayed linearly to 0) on seeded shuffled mini-batches.

    Args:
        model: the student (or a teacher being trained, alpha = 0).
        pixels: [M, 3, S, S] images in [0, 1].
        image: [N] image index of each example.
        ids: [N, T] `<bos> prompt answer <eos>` ids, right-padded.
        labels: [N, T] unshifted labels, -100 on `<bos>`, prompt and padding.
        teacher: [N, T, V] teacher logits on the same ids, or None (alpha must be 0).
        div: the zoo's divergence and temperature.
        alpha: weight of the KD term.
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak AdamW learning rate.
        seed: seed of the batch order (the initial weights are the caller's).
        progress: show a progress bar.

    Returns:
        The loss of each step.

    Raises:
        UserError: a KD weight without teacher logits, or shapes that do not match.
    """
    if alpha > 0 and teacher is None:
        raise UserError(f"captioning KD: alpha={alpha} needs teacher logits")
    if (
        labels.shape != ids.shape
        or image.shape != ids.shape[:1]
        or (teacher is not None and teacher.shape != (*ids.shape, model.config.vocab_size))
    ):
        raise UserError(
            f"captioning KD: ids {tuple(ids.shape)}, labels {tuple(labels.shape)}, image {tuple(image.shape)} and "
            f"teacher {None if teacher is None else tuple(teacher.shape)} do not fit a vocabulary of "
            f"{model.config.vocab_size}"
        )
    model.train()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        length = int((labels[idx] != -100).nonzero()[:, 1].max()) + 1  # drop columns that are padding everywhere
        logits = model(pixels[image[idx]], ids[idx, :length])
        targets = None if teacher is None or alpha == 0 else teacher[idx, :length]
        return combine(kd_terms(logits, targets, labels[idx, :length], div), alpha, div.temperature)

    history = fit_loop(model.parameters(), len(ids), batch_loss, steps=steps, batch_size=batch_size, lr=lr,
                       weight_decay=0.01, decay=True, seed=seed, desc="captioning KD", progress=progress)  # fmt: skip
    model.eval()
    return history
