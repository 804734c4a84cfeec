"""Where on-policy training can teach "stop here": the `<eos>` of a sampled completion and the teacher's `<eos>`
probability at every completion position, also when the padding id is the `<eos>` id (SmolLM2's tokenizer)."""

from __future__ import annotations

import pytest
import torch

from potstill.config import LossConfig, OnPolicyConfig
from potstill.losses import IGNORE_INDEX, scored_mask
from potstill.teacher.online import OnlineTeacher
from potstill.train.on_policy import PromptDataset, rollout
from potstill.train.step import kd_micro_step


@pytest.mark.parametrize("fused", [True, False])
def test_eos_is_scored_padding_is_not_and_the_teachers_eos_is_in_every_target(
    prompts, tiny_tokenizer, make_model, monkeypatch, fused
):
    """With pad id == eos id, a sample that ended is scored up to and including its `<eos>` and not on the padding
    `generate` wrote after it (the same id); a sample cut by `max_new_tokens` is scored on all its tokens; and the gkd
    term is the divergence over the whole vocabulary at each of these positions, the teacher's `<eos>` included."""
    ds = PromptDataset([str(prompts)], tiny_tokenizer, seq_len=40, max_new_tokens=6)
    batch = {key: torch.stack([ds[i][key] for i in range(2)]) for key in ("input_ids", "attention_mask", "prompt_len")}
    student, teacher = make_model(seed=3), make_model(seed=4)
    eos, a, b = tiny_tokenizer.eos_token_id, 40, 41
    new = torch.tensor([[a, b, eos, eos, eos, eos], [a, b, a, b, a, b]])  # as generate pads with pad_token_id = eos
    monkeypatch.setattr(student, "generate", lambda input_ids, **kwargs: torch.cat([input_ids, new], dim=1))
    out = rollout(student, batch, OnPolicyConfig(max_new_tokens=6), eos, eos, seed=0)
    assert out["completion_len"].tolist() == [3, 6] and out["stopped"].tolist() == [True, False]
    n0 = int(batch["prompt_len"][0])
    assert out["labels"][0, n0 : n0 + 3].tolist() == [a, b, eos]
    assert (out["labels"][0, n0 + 3 :] == IGNORE_INDEX).all() and (out["attention_mask"][0, n0 + 3 :] == 0).all()
    assert (out["input_ids"][0, n0 + 3 :] == eos).all()  # the padding carries the <eos> id, unscored

    terms, _ = kd_micro_step(student, student, out, OnlineTeacher(teacher), LossConfig(name="fkl", fused=fused), 1.0, 9)
    assert terms.n_tokens == 9
    with torch.no_grad():
        mask = scored_mask(out["labels"])
        log_q, log_p = (
            m(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1][mask].log_softmax(-1)
            for m in (student, teacher)
        )
    per_id = log_p.exp() * (log_p - log_q)  # [9, V]: forward KL terms at the 9 scored positions
    torch.testing.assert_close(terms.kd.detach(), per_id.sum() / 9, rtol=1e-5, atol=1e-6)
    without_eos = torch.cat([per_id[:, :eos], per_id[:, eos + 1 :]], dim=1).sum() / 9
    assert abs(terms.kd.item() - without_eos.item()) > 100 * 1e-5 * terms.kd.item()  # the <eos> terms count
