"""Captioning and VQA metrics on held-out images: exact match, chrF (sacrebleu), per task.

`score_answers` compares generated answers with the references, pooled per task ("caption", "vqa"): exact match is
the fraction of answers equal to the reference (after whitespace normalization; for VQA it is the answer accuracy),
chrF is sacrebleu's corpus chrF (character n-grams up to 6, beta 2) over the task's answers.
"""

from __future__ import annotations

from collections.abc import Sequence


def score_answers(hyps: Sequence[str], refs: Sequence[str], tasks: Sequence[str]) -> dict[str, dict]:
    """{task: {"items", "exact_match", "chrf"}} of hypotheses against references."""
    from sacrebleu.metrics import CHRF

    out = {}
    for task in sorted(set(tasks)):
        pairs = [
            (" ".join(h.split()), " ".join(r.split())) for h, r, t in zip(hyps, refs, tasks, strict=True) if t == task
        ]
        h, r = [p[0] for p in pairs], [p[1] for p in pairs]
        out[task] = {
            "items": len(pairs),
            "exact_match": sum(a == b for a, b in pairs) / len(pairs),
            "chrf": CHRF().corpus_score(h, [r]).score,
        }
    return out
