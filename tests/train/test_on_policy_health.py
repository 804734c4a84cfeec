"""On-policy health: the figures of a rollout batch, the teacher's own reference (sampled and greedy, also for a
trimmed student's teacher), the EOS rule relative to the teacher, and the greedy check at the end of a run."""

from __future__ import annotations

import json

import pytest
import torch

from distill_helpers import on_policy_opts
from potstill.config import OnPolicyConfig, load_config
from potstill.data import collate
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX
from potstill.train.on_policy import OnPolicyTrainer, PromptDataset
from potstill.train.recipes import run_distill
from potstill.train.rollouts import health_counts, health_figures, rollout


def _batch(completions: list[list[int]], stopped: list[bool]) -> dict:
    """A rollout-shaped batch: a 2-token prompt (not scored) then each completion, right-padded."""
    width = 2 + max(map(len, completions))
    labels = torch.full((len(completions), width), IGNORE_INDEX)
    for row, tokens in enumerate(completions):
        labels[row, 2 : 2 + len(tokens)] = torch.tensor(tokens)
    return {
        "labels": labels,
        "completion_len": torch.tensor([len(c) for c in completions]),
        "stopped": torch.tensor(stopped),
    }


def test_health_figures_count_stops_repetition_and_loops():
    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5]  # (5, 6, 7) three times: a loop
    plain = [1, 2, 3, 4, 9]
    figures = health_figures(health_counts(_batch([loop, plain], [False, True])))
    assert figures["len"] == 7.5 and figures["eos_rate"] == 0.5 and figures["loop_rate"] == 0.5
    # loop: 9 bigrams, 3 distinct; plain: 4 bigrams, 4 distinct
    assert figures["distinct2"] == pytest.approx(7 / 13)
    twice = health_figures(health_counts(_batch([[5, 6, 7, 5, 6, 7]], [True])))
    assert twice["loop_rate"] == 0.0  # a trigram twice is not yet a loop


def test_a_trimmed_students_teacher_writes_only_the_students_ids(prompts, tiny_tokenizer, make_model):
    """With an id map, the teacher reads the mapped prompt and picks among the student's ids (its distribution
    renormalized over them): the greedy first token is the argmax of the teacher's logits at those ids."""
    ds = PromptDataset([str(prompts)], tiny_tokenizer, seq_len=40, max_new_tokens=6)
    rows = collate([ds[i] for i in range(4)])
    teacher = make_model(seed=1)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    vocab = teacher.get_output_embeddings().weight.shape[0]
    used = set(rows["input_ids"].flatten().tolist()) | {eos, pad}
    id_map = torch.tensor(sorted(used | set(range(0, vocab, 3))))  # student id -> teacher id
    to_student = {int(t): s for s, t in enumerate(id_map)}
    batch = {k: rows[k] for k in ("attention_mask", "prompt_len")}
    batch["input_ids"] = rows["input_ids"].apply_(lambda t: to_student[t])
    cfg = OnPolicyConfig(max_new_tokens=6)
    s_pad, s_eos = to_student[pad], to_student[eos]
    greedy = rollout(teacher, batch, cfg, s_pad, s_eos, seed=0, greedy=True, id_map=id_map)
    sampled = rollout(teacher, batch, cfg, s_pad, s_eos, seed=0, id_map=id_map)
    for out in (greedy, sampled):
        scored = out["labels"][out["labels"] != IGNORE_INDEX]
        assert scored.numel() and int(scored.max()) < len(id_map)  # student ids
    for row in range(4):
        n = int(batch["prompt_len"][row])
        logits = teacher(input_ids=id_map[batch["input_ids"][row, :n]][None]).logits[0, -1]
        assert int(greedy["input_ids"][row, n]) == int(logits[id_map].argmax())
    again = rollout(teacher, batch, cfg, s_pad, s_eos, seed=5, greedy=True, id_map=id_map)
    assert torch.equal(again["input_ids"], greedy["input_ids"])  # greedy: the seed does not matter


def _cfg(pair, prompts, out, *extra):
    opts = on_policy_opts(pair, prompts, out, "loss.name=jsd", "on_policy.lmbda=1.0", *extra)
    return load_config(None, opts, run=True)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_teachers_health_is_logged_beside_the_students_and_the_greedy_check_ends_the_run(
    pair, prompts, tmp_path, monkeypatch
):
    measured = []
    real = OnPolicyTrainer.health_of
    monkeypatch.setattr(
        OnPolicyTrainer,
        "health_of",
        lambda self, model, greedy, id_map=None: measured.append((model, greedy)) or real(self, model, greedy, id_map),
    )
    run = run_distill(_cfg(pair, prompts, tmp_path / "run", "train.max_steps=2", "on_policy.health_prompts=5"))
    logs, summary = _log(run), json.loads((run / "summary.json").read_text())
    figures = ("len", "eos_rate", "distinct2", "loop_rate")
    for entry in logs:
        assert all(0 <= entry[f"rollout_{k}"] <= 6 and 0 <= entry[f"teacher_{k}"] <= 6 for k in figures)
        assert entry["teacher_len"] == logs[0]["teacher_len"]  # measured once
    health = summary["health"]
    assert {k: health[f"teacher_{k}"] for k in figures} == {k: logs[0][f"teacher_{k}"] for k in figures}
    assert all(0 <= health[f"{who}_greedy_{k}"] <= 6 for who in ("teacher", "student") for k in figures)
    # the teacher sampled and greedy once (before the first rollout), the trained student greedy at the end
    assert [greedy for _, greedy in measured] == [False, True, True]
    assert measured[0][0] is measured[1][0] and measured[2][0] is not measured[0][0]


@pytest.mark.parametrize("teacher_rate, stops", [(1.0, True), (0.0, False)])
def test_min_eos_ratio_compares_with_the_teachers_rate(pair, prompts, tmp_path, monkeypatch, teacher_rate, stops):
    """A random tiny student rarely ends in 6 tokens: below half a teacher that always ends, it stops; a teacher that
    never ends stops nothing."""
    monkeypatch.setattr(OnPolicyTrainer, "teacher_reference", lambda self: {"teacher_eos_rate": teacher_rate})
    run = run_distill(_cfg(pair, prompts, tmp_path / "run", "train.max_steps=3", "on_policy.min_eos_ratio=0.5"))
    summary = json.loads((run / "summary.json").read_text())
    assert ("stop_reason" in summary) == stops and summary["global_step"] == (1 if stops else 3)
    if stops:
        assert "against the teacher's 100%" in summary["stop_reason"] and "min_eos_ratio" in summary["stop_reason"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("on_policy.min_eos_ratio=0.5", "on_policy.health_prompts=0"), "needs health_prompts > 0"),
        (("on_policy.min_eos_ratio=1.5",), "on_policy.min_eos_ratio"),
        (
            ("on_policy.min_eos_ratio=0.5", "teacher.source=endpoint", "teacher.endpoint.base_url=http://x/v1",
             "teacher.endpoint.model=m", "on_policy.objective=rkl_sampled"),
            "a teacher in memory",
        ),
    ],
)  # fmt: skip
def test_bad_health_settings_are_one_line_errors(pair, prompts, tmp_path, extra, needle):
    with pytest.raises(UserError, match=needle) as err:
        _cfg(pair, prompts, tmp_path / "bad", *extra)
    assert "\n" not in str(err.value)
