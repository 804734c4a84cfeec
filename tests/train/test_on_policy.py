"""On-policy distillation: the sampled-reverse-KL surrogate, rollouts, the recipe's runs, exact resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_helpers import interrupted_run, on_policy_opts
from potstill.config import OnPolicyConfig, load_config
from potstill.errors import UserError
from potstill.losses import IGNORE_INDEX
from potstill.losses.policy import sampled_reverse_kl
from potstill.train.on_policy import PromptDataset, rollout
from potstill.train.recipes import run_distill


def test_surrogate_is_the_reverse_kl_and_its_gradient_in_expectation():
    """Averaged over the student's own distribution, the per-token surrogate has the value KL(q || p) and the
    gradient of KL(q || p) (the score-function term vanishes), in float64."""
    torch.manual_seed(0)
    z_q = torch.randn(7, dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(7, dtype=torch.float64), -1)
    log_q = torch.log_softmax(z_q, -1)
    exact = (log_q.exp() * (log_q - log_p)).sum()
    (g_exact,) = torch.autograd.grad(exact, z_q, retain_graph=True)
    expected = (log_q.exp().detach() * sampled_reverse_kl(log_q, log_p)[0]).sum()
    (g_expected,) = torch.autograd.grad(expected, z_q)
    torch.testing.assert_close(expected, exact.detach())
    torch.testing.assert_close(g_expected, g_exact)
    assert exact.item() > 0.1  # distinct distributions: the check is not trivially 0 == 0


def test_rollout_keeps_the_prompt_scores_only_the_new_tokens_and_is_seeded(prompts, tiny_tokenizer, make_model):
    ds = PromptDataset([str(prompts)], tiny_tokenizer, seq_len=40, max_new_tokens=6)
    batch = {key: torch.stack([ds[i][key] for i in range(4)]) for key in ("input_ids", "attention_mask", "prompt_len")}
    model, cfg = make_model(seed=3), OnPolicyConfig(max_new_tokens=6, temperature=1.5)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    state = torch.random.get_rng_state()
    out = rollout(model, batch, cfg, pad, eos, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    again = rollout(model, batch, cfg, pad, eos, seed=7)
    assert torch.equal(out["input_ids"], again["input_ids"])  # same seed, same samples
    other = rollout(model, batch, cfg, pad, eos, seed=8)
    assert not torch.equal(out["input_ids"], other["input_ids"])
    for row in range(4):
        n, k = int(batch["prompt_len"][row]), int(out["completion_len"][row])
        assert 1 <= k <= 6
        assert torch.equal(out["input_ids"][row, :n], batch["input_ids"][row, :n])  # the prompt, unchanged
        assert (out["labels"][row, :n] == IGNORE_INDEX).all() and (out["labels"][row, n + k :] == IGNORE_INDEX).all()
        assert torch.equal(out["labels"][row, n : n + k], out["input_ids"][row, n : n + k])  # the samples, scored
        assert out["attention_mask"][row].sum() == n + k
        new = out["input_ids"][row, n : n + k].tolist()
        assert (eos in new) == bool(out["stopped"][row]) and (eos not in new[:-1])  # stops at the first <eos>


def _cfg(pair, prompts, out, *extra):
    return load_config(None, on_policy_opts(pair, prompts, out, "loss.name=jsd", *extra), run=True)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["gkd", "rkl_sampled"])
def test_fully_on_policy_run_logs_rollout_health(pair, prompts, tmp_path, objective):
    run = run_distill(_cfg(pair, prompts, tmp_path / objective, "train.max_steps=3", "on_policy.lmbda=1.0",
                           f"on_policy.objective={objective}"))  # fmt: skip
    logs = _log(run)
    assert [e["step"] for e in logs] == [1, 2, 3]
    for entry in logs:
        assert entry["on_policy_fraction"] == 1.0 and 1 <= entry["rollout_len"] <= 6
        assert 0 <= entry["rollout_eos_rate"] <= 1 and 0 < entry["rollout_distinct2"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "on_policy" and summary["objective"] == objective and summary["global_step"] == 3


def test_lambda_zero_never_samples(pair, prompts, tmp_path, monkeypatch):
    def no_generate(*args, **kwargs):
        raise AssertionError("the student sampled with lmbda=0")

    monkeypatch.setattr("potstill.train.on_policy.rollout", no_generate)
    logs = _log(run_distill(_cfg(pair, prompts, tmp_path / "off", "train.max_steps=2", "on_policy.lmbda=0.0")))
    assert all(entry["on_policy_fraction"] == 0.0 and "rollout_len" not in entry for entry in logs)


def test_resumed_run_samples_and_ends_as_the_uninterrupted_one(pair, prompts, tmp_path, monkeypatch):
    opts = ("train.max_steps=4", "train.save_steps=2", "on_policy.lmbda=0.5")
    full = run_distill(_cfg(pair, prompts, tmp_path / "full", *opts))
    interrupted_run(monkeypatch, _cfg(pair, prompts, tmp_path / "resumed", *opts), step=2)  # after checkpoint-2
    resumed = run_distill(_cfg(pair, prompts, tmp_path / "resumed", *opts))
    assert _log(resumed) == _log(full)
    assert {e["on_policy_fraction"] for e in _log(full)} == {0.0, 1.0}  # both kinds of micro-batch happened
    a = AutoModelForCausalLM.from_pretrained(full / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("on_policy.lmbda=1.5",), "on_policy.lmbda"),
        (("on_policy.max_new_tokens=0",), "on_policy.max_new_tokens"),
        (("teacher.source=cache", "teacher.cache=somewhere"), "cannot score the student's new samples"),
        (("loss.alpha=0.0",), "needs a teacher"),
    ],
)
def test_bad_settings_are_one_line_errors(pair, prompts, tmp_path, extra, needle):
    with pytest.raises(UserError, match=needle):
        _cfg(pair, prompts, tmp_path / "bad", *extra)


def test_a_context_shorter_than_seq_len_is_refused(make_model_dir, prompts, tmp_path):
    short = make_model_dir("short", seed=1, max_positions=32)
    pair = (make_model_dir("student", seed=0), short)
    with pytest.raises(UserError, match=r"data.seq_len: 40 is longer than the teacher's context of 32 tokens"):
        run_distill(_cfg(pair, prompts, tmp_path / "run", "train.max_steps=1"))


def test_bad_rows_are_named_by_file_and_line(pair, tmp_path, tiny_tokenizer):
    text = tmp_path / "text.jsonl"
    text.write_text('{"prompt": "a:", "completion": " b"}\n{"text": "plain text"}\n')
    with pytest.raises(UserError, match=r"text.jsonl:2: train.recipe=on_policy needs prompt/completion rows"):
        PromptDataset([str(text)], tiny_tokenizer, seq_len=40, max_new_tokens=6)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": " ".join(["word"] * 54), "completion": " x"}) + "\n")
    with pytest.raises(UserError, match=r"long.jsonl:1: prompt of \d+ tokens \+ on_policy.max_new_tokens 6 exceeds"):
        PromptDataset([str(long)], tiny_tokenizer, seq_len=40, max_new_tokens=6)


def test_seq_kd_completes_the_other_batches_with_the_teachers_samples(pair, prompts, tmp_path, monkeypatch):
    import potstill.train.on_policy as on_policy

    real, models = on_policy.rollout, []
    monkeypatch.setattr(on_policy, "rollout", lambda model, *a: models.append(model) or real(model, *a))
    cfg = _cfg(pair, prompts, tmp_path / "seq", "train.max_steps=2", "on_policy.lmbda=0.0", "on_policy.seq_kd=true")
    logs = _log(run_distill(cfg))
    teacher = AutoModelForCausalLM.from_pretrained(pair[1])
    weights = teacher.get_input_embeddings().weight
    assert len(models) == 2 and all(torch.equal(m.get_input_embeddings().weight, weights) for m in models)
    assert all(m.training is False for m in models)  # the frozen teacher, not the (training) student
    assert all(entry["on_policy_fraction"] == 0.0 for entry in logs)


def test_collapse_stops_the_run_with_its_reason(pair, prompts, tmp_path):
    """A random tiny student never samples <eos> in 6 tokens: min_eos_rate=1 stops it at the first log."""
    cfg = _cfg(
        pair, prompts, tmp_path / "stop", "train.max_steps=5", "on_policy.lmbda=1.0", "on_policy.min_eos_rate=1.0"
    )
    run = run_distill(cfg)
    logs = _log(run)
    assert [e["step"] for e in logs] == [1] and logs[0]["rollout_eos_rate"] < 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 1 and "length explosion" in summary["stop_reason"]
    assert (run / "student" / "config.json").is_file()
