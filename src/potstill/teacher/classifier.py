"""Classifier teachers: any model whose output is [batch, classes] logits, behind one small adapter.

`ClassifierTeacher` wraps a plain `torch.nn.Module` (``model(pixels) -> [B, C]``) or a Hugging Face
`AutoModelForImageClassification` (``model(pixel_values=pixels).logits``), frozen, in eval mode. Its fingerprint
(class name + every state-dict tensor) identifies it in a teacher cache. `check_label_space` refuses a student whose
classes are not the teacher's (without a mapping).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from potstill.errors import UserError


def classifier_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Logits of a classifier, whatever its output type.

    Args:
        model: a plain module returning a tensor (or a tuple whose first item is the logits), or an HF image
            classifier (called with `pixel_values=`, output `.logits`).
        pixels: [B, 3, H, W] preprocessed images.

    Returns:
        [B, C] logits.

    Raises:
        UserError: the output is not [B, C] logits.
    """
    if getattr(model, "main_input_name", None) == "pixel_values":  # transformers PreTrainedModel
        out = model(pixel_values=pixels)
    else:
        out = model(pixels)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != pixels.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(
            f"{type(model).__name__}: output {shape} is not [batch, classes] logits for a batch of {len(pixels)}"
        )
    return logits


def module_fingerprint(model: nn.Module) -> str:
    """sha256 of the module's class name and every state-dict entry (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ClassifierTeacher:
    """A frozen classifier teacher.

    Args:
        model: the classifier (plain module or HF image classifier); put in eval mode here.
        name: how caches and reports name it (defaults to the class name).
    """

    def __init__(self, model: nn.Module, name: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.name = name or type(model).__name__
        self._fingerprint: str | None = None

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels -> [B, C] float32 logits."""
        return classifier_logits(self.model, pixels).float()

    @property
    def fingerprint(self) -> str:
        """`module_fingerprint` of the model (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.model)
        return self._fingerprint


def check_label_space(
    student_classes: int, teacher_classes: int, mapping: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor | None:
    """Refuse a student whose classes are not the teacher's, unless a mapping says which teacher class each is.

    Args:
        student_classes: C_s, the student's output width.
        teacher_classes: C_t, the teacher's.
        mapping: optional [C_s] teacher class index of each student class.

    Returns:
        The mapping as a long tensor (teacher logits become `teacher_logits[:, mapping]`), or None when the spaces
        are the same.

    Raises:
        UserError: different widths without a mapping, or a mapping of the wrong length or range.
    """
    if mapping is None:
        if student_classes != teacher_classes:
            raise UserError(
                f"the student has {student_classes} classes, the teacher {teacher_classes}: give a class mapping "
                "(teacher class of each student class) or a student with the teacher's label space"
            )
        return None
    mapping = torch.as_tensor(mapping, dtype=torch.long)
    if mapping.shape != (student_classes,) or not 0 <= int(mapping.min()) <= int(mapping.max()) < teacher_classes:
        raise UserError(
            f"class mapping: needs {student_classes} teacher class indices in [0, {teacher_classes}), "
            f"got {tuple(mapping.shape)} values in [{int(mapping.min())}, {int(mapping.max())}]"
        )
    return mapping
