"""A teacher with another tokenizer than the student's: it reads the student's text through its own tokenizer.

`CrossTokenizerTeacher.targets_for(inputs)` turns the student's batch into the teacher's tokenization of the same
text (`potstill.data.crossbatch`), runs the frozen teacher on it, and returns `CrossTargets`: its final hidden states
and head (logits are computed in chunks by the loss, never [tokens x 262k] at once), the alignment of both
tokenizations and the shared vocabulary. The loss is `potstill.losses.align.cross_tokenizer_terms`.
`same_tokenizer` says whether a pair needs it at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from potstill.data.crossbatch import CrossTokenizer
from potstill.errors import UserError
from potstill.losses.align import CrossTargets
from potstill.losses.fused import TeacherHead
from potstill.models.heads import head_of
from potstill.teacher.online import check_tokenizers


def same_tokenizer(student_tok, teacher_tok) -> bool:
    """Whether both tokenizers give every string the same ids (same vocabulary, id by id, and special tokens)."""
    same_specials = all(
        getattr(student_tok, name) == getattr(teacher_tok, name) for name in ("bos_token", "eos_token", "unk_token")
    )
    return same_specials and student_tok.get_vocab() == teacher_tok.get_vocab()


def shares_ids(student_tok, teacher_tok, id_map) -> bool:
    """Whether the student's ids are the teacher's: one tokenizer, or a trimmed vocabulary (`id_map`, student id ->
    teacher id) cut from this teacher's (each id the same token string). Otherwise KD goes through both tokenizers."""
    if id_map is None:
        return same_tokenizer(student_tok, teacher_tok)
    try:
        check_tokenizers(student_tok, teacher_tok, id_map, specials=False)
    except UserError:
        return False
    return True


class CrossTokenizerTeacher:
    """A frozen teacher (eval mode, no grad) scoring a student batch through its own tokenizer.

    Args:
        model: the teacher, a causal LM with a plain linear head (soft-capping allowed).
        student_tok, teacher_tok: the two fast tokenizers.

    Raises:
        UserError: a slow teacher tokenizer, or a teacher head that is not a plain linear layer.
    """

    def __init__(self, model: nn.Module, student_tok, teacher_tok):
        head = head_of(model)
        if head is None:
            raise UserError(
                f"{getattr(model.config, '_name_or_path', 'teacher')}: cross-tokenizer KD computes the teacher's logits"
                " in chunks from its hidden states, which needs a plain linear output head (no bias, no logit scale)"
            )
        self.model = model.eval()
        self.model.requires_grad_(False)
        limit = getattr(model.config, "max_position_embeddings", None)
        self.tokens = CrossTokenizer(student_tok, teacher_tok, max_length=limit)

    @torch.no_grad()
    def targets_for(self, inputs: dict[str, Any]) -> CrossTargets:
        """The teacher's side of a student batch.

        Args:
            inputs: `input_ids`, `attention_mask`, `labels` [B, L] of the student.

        Returns:
            CrossTargets with teacher hidden states [B * Lt, H] on the batch's device.
        """
        ids, mask, align = self.tokens.teacher_batch(
            inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
        )
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        weight, softcap = head_of(self.model)  # looked up per batch: the trainer may have moved the model
        device = inputs["input_ids"].device
        return CrossTargets(
            teacher=TeacherHead(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight.detach(), softcap=softcap),
            align=align,
            student_shared=self.tokens.student_shared.to(device),
            teacher_shared=self.tokens.teacher_shared.to(device),
        )
