"""The online teacher: a frozen model that scores the student's batch, optionally through a restricted head.

When the student has a trimmed vocabulary (see `potstill.student.init`), the student's token ids map
to teacher ids through `id_map` ([V_student] long tensor). The teacher then reads `id_map[input_ids]`
and computes logits only for the kept ids: `h @ W_head[id_map].T`. A softmax over those logits is the
teacher distribution *renormalized over the student's vocabulary*: the mass the teacher puts on
tokens the student cannot emit is dropped (documented bias; on the demo corpus it is small because the
kept vocabulary covers every token the corpus uses). This also skips most of the cost of a 262k head.
"""

from __future__ import annotations

import torch
from torch import nn


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
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits for a batch of *student* token ids.

        Args:
            input_ids: [B, T] student ids.
            attention_mask: [B, T] or None.

        Returns:
            [B, T, V_student] float32 logits (V_student = teacher vocab when there is no id map).
        """
        if self.id_map is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        hidden = self.model.base_model(input_ids=self.id_map[input_ids], attention_mask=attention_mask)
        logits = torch.nn.functional.linear(hidden.last_hidden_state, self._head, self._bias).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits
