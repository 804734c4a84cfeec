"""The online teacher: a frozen model that scores the student's batch, optionally through a restricted head.

When the student has a trimmed vocabulary (see `potstill.student.init`), the student's token ids map
to teacher ids through `id_map` ([V_student] long tensor). The teacher then reads `id_map[input_ids]`
and computes logits only for the kept ids: `h @ W_head[id_map].T`. A softmax over those logits is the
teacher distribution *renormalized over the student's vocabulary*: the mass the teacher puts on
tokens the student cannot emit is dropped (documented bias; on the demo corpus it is small because the
kept vocabulary covers every token the corpus uses). This also skips most of the cost of a 262k head.

`check_tokenizers` is the one check that a teacher's token ids mean what the student's mean; every command
that pairs a student with a teacher calls it before scoring anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from potstill.errors import UserError
from potstill.losses.fused import TeacherHead
from potstill.models.heads import linear_head, softcap_of

_SPECIAL = ("bos_token", "eos_token", "unk_token")
_HINT = "use the teacher's tokenizer, or a student made from this teacher by `potstill student init`"


def check_tokenizers(student_tok, teacher_tok, id_map: torch.Tensor | None = None, specials: bool = True) -> None:
    """Refuse a student/teacher pair whose token ids do not denote the same tokens.

    Without an id map both tokenizers must have the same vocabulary (token -> id, added tokens included).
    With one (a student with a trimmed vocabulary), it needs one entry per student token, each pointing at
    the teacher token with the same string. In both cases `<bos>`, `<eos>` and `<unk>` must be the same
    tokens (padding is never scored, so the pad token may differ).

    Args:
        student_tok: the student's HF tokenizer.
        teacher_tok: the teacher's HF tokenizer.
        id_map: optional [V_student] long tensor, student id -> teacher id.
        specials: also compare `<bos>`, `<eos>`, `<unk>` (a training run compares them, with the chat template and
            a stop-token mapping, in `potstill.models.specials.check_specials` instead).

    Raises:
        UserError: one line naming the first difference found.
    """
    if id_map is None:
        _check_same_vocab(student_tok.get_vocab(), teacher_tok.get_vocab())
    else:
        _check_id_map(student_tok, teacher_tok, id_map)
    for name in _SPECIAL if specials else ():
        student, teacher = getattr(student_tok, name), getattr(teacher_tok, name)
        if student != teacher:
            raise UserError(f"student and teacher tokenizers differ: {name} {student!r} vs {teacher!r}; {_HINT}")


def _check_same_vocab(student: dict[str, int], teacher: dict[str, int]) -> None:
    if student == teacher:
        return
    token = next((t for t, i in student.items() if teacher.get(t) != i), None)
    token = token if token is not None else next(t for t in teacher if t not in student)
    raise UserError(
        f"student and teacher tokenizers differ: {len(student)} vs {len(teacher)} tokens, {token!r} is id "
        f"{student.get(token)} vs {teacher.get(token)}; {_HINT}"
    )


def _check_id_map(student_tok, teacher_tok, id_map: torch.Tensor) -> None:
    n_student, n_teacher = len(student_tok), len(teacher_tok)
    if id_map.ndim != 1 or len(id_map) != n_student:
        raise UserError(f"the student's id map has {id_map.numel()} entries for {n_student} student tokens; {_HINT}")
    if n_student and not 0 <= int(id_map.min()) <= int(id_map.max()) < n_teacher:
        raise UserError(f"the student's id map points outside the teacher's {n_teacher} tokens; {_HINT}")
    student = student_tok.convert_ids_to_tokens(list(range(n_student)))
    teacher = teacher_tok.convert_ids_to_tokens(id_map.tolist())
    bad = next((i for i, (s, t) in enumerate(zip(student, teacher, strict=True)) if s != t), None)
    if bad is not None:
        raise UserError(
            f"student id {bad} {student[bad]!r} maps to teacher id {int(id_map[bad])} {teacher[bad]!r}; {_HINT}"
        )


class OnlineTeacher:
    """A frozen teacher (eval mode, no grad) that returns logits over the student's vocabulary.

    Args:
        model: a transformers causal LM (already on the right device and dtype).
        id_map: optional [V_student] long tensor, student id -> teacher id.
    """

    def __init__(self, model: nn.Module, id_map: torch.Tensor | None = None):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.id_map = None if id_map is None else id_map.to(self._device()).long()
        self._head = None
        if self.id_map is not None:
            head = model.get_output_embeddings()
            self._head = head.weight.detach()[self.id_map]  # [V_student, H]
            self._bias = None if getattr(head, "bias", None) is None else head.bias.detach()[self.id_map]
        self._softcap = softcap_of(model)
        self._fusable = linear_head(model) is not None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def head_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TeacherHead | None:
        """The teacher as final hidden states + head, for the fused loss (its logits are then computed per chunk).

        Args:
            input_ids: [B, T] student ids.
            attention_mask: [B, T] or None.

        Returns:
            TeacherHead with hidden [B, T, H] (final norm applied) and weight [V_student, H] (rows restricted by
            the id map), or None when the teacher's head is not a plain linear layer (use `logits` then).
        """
        return self.with_layers(input_ids, attention_mask, fused=True)[0] if self._fusable else None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits for a batch of *student* token ids.

        Args:
            input_ids: [B, T] student ids.
            attention_mask: [B, T] or None.

        Returns:
            [B, T, V_student] float32 logits (V_student = teacher vocab when there is no id map).
        """
        return self.with_layers(input_ids, attention_mask, fused=False)[0]

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """(weight [V_student, H], bias [V_student] or None, softcap or None): the head over the student's ids."""
        if self._head is not None:
            return self._head, self._bias, self._softcap
        head = self.model.get_output_embeddings()
        return head.weight.detach(), None if head.bias is None else head.bias.detach(), self._softcap

    @torch.no_grad()
    def with_layers(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        fused: bool = True,
        layers: Sequence[int] = (),
    ) -> tuple[TeacherHead | torch.Tensor, list[torch.Tensor]]:
        """One teacher forward: its targets and the outputs of some decoder layers (intermediate-layer KD).

        Args:
            input_ids: [B, T] student ids.
            attention_mask: [B, T] or None.
            fused: return a `TeacherHead` when the head is a plain linear layer, else logits.
            layers: decoder layers (0-based) whose outputs to return.

        Returns:
            (TeacherHead with hidden [B, T, H], or logits [B, T, V_student] float32; one [B, T, H] state per layer).
        """
        want = bool(layers)
        ids = input_ids if self.id_map is None else self.id_map[input_ids]
        if self.id_map is None and not (fused and self._fusable):
            out = self.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=want)
            return out.logits.float(), [out.hidden_states[i + 1] for i in layers]
        out = self.model.base_model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=want)
        states = [out.hidden_states[i + 1] for i in layers]
        hidden = out.last_hidden_state
        weight, bias, _ = self.head()
        if fused and self._fusable:
            return TeacherHead(hidden=hidden, weight=weight, bias=bias, softcap=self._softcap), states
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits, states
