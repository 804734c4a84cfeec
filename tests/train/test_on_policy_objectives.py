"""On-policy objectives beyond GKD: reverse KL over the teacher's top-K, baselines for the sampled reverse KL,
MiniLLM (teacher-mixed rollouts included), and their bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_helpers import on_policy_opts
from potstill.config import OnPolicyConfig, load_config
from potstill.errors import UserError
from potstill.train.on_policy import PromptDataset
from potstill.train.recipes import run_distill
from potstill.train.rollouts import mixed_rollout, rollout


def _opts(pair, prompts, out, *extra):
    return on_policy_opts(pair, prompts, out, "on_policy.lmbda=1.0", *extra)


def _run(pair, prompts, out, *extra):
    run = run_distill(load_config(None, _opts(pair, prompts, out, *extra), run=True))
    return run, [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _weights(run):
    return AutoModelForCausalLM.from_pretrained(run / "student").state_dict()


def test_rkl_topk_with_k_the_vocabulary_is_the_dense_reverse_kl(pair, prompts, tmp_path):
    """K = V: the same samples, the same loss and the same weights as GKD with loss.name=rkl (full distributions);
    a small K with the rest bucket is a lower bound (coarse-graining can only lower a KL)."""
    vocab = AutoModelForCausalLM.from_pretrained(pair[0]).config.vocab_size
    steps = "train.max_steps=2"
    dense, dense_log = _run(pair, prompts, tmp_path / "dense", steps, "loss.name=rkl")
    topk, topk_log = _run(
        pair, prompts, tmp_path / "topk", steps, "on_policy.objective=rkl_topk", f"on_policy.top_k={vocab}"
    )
    for a, b in zip(dense_log, topk_log, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4) and b["rollout_len"] == a["rollout_len"]
    a, b = _weights(dense), _weights(topk)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=5e-5)  # Adam amplifies float noise
    _, small = _run(
        pair, prompts, tmp_path / "k2", "train.max_steps=1", "on_policy.objective=rkl_topk", "on_policy.top_k=2"
    )
    assert 0 <= small[0]["kd"] < dense_log[0]["kd"]  # the first step samples the same completions


@pytest.mark.parametrize("baseline", ["batch", pytest.param("running", marks=pytest.mark.slow)])
def test_a_baseline_changes_the_gradient_not_the_value_and_logs_reward_statistics(pair, prompts, tmp_path, baseline):
    opts = ("train.max_steps=2", "on_policy.objective=rkl_sampled")
    none, plain = _run(pair, prompts, tmp_path / "none", *opts)
    based, logs = _run(pair, prompts, tmp_path / baseline, *opts, f"on_policy.baseline={baseline}")
    assert logs[0]["kd"] == pytest.approx(plain[0]["kd"], rel=1e-5)  # step 1: the same samples, the same value
    for entry in logs:
        assert entry["reward_std"] > 0 and entry["advantage_std"] > 0
    # the reward is log p - log q, the advantage without a baseline is log q - log p: its negation
    assert plain[0]["advantage_mean"] == pytest.approx(-plain[0]["reward_mean"], rel=1e-5)
    if baseline == "batch":
        assert all(abs(e["advantage_mean"]) < 1e-4 * e["advantage_std"] for e in logs)
    else:  # the first micro-batch has no baseline yet, then b is its mean advantage
        b1 = logs[0]["baseline"]
        assert b1 == pytest.approx(-plain[0]["reward_mean"], rel=1e-5)
        assert logs[1]["advantage_mean"] == pytest.approx(-logs[1]["reward_mean"] - b1, rel=1e-4)
        assert logs[1]["baseline"] == pytest.approx(0.9 * b1 - 0.1 * logs[1]["reward_mean"], rel=1e-4)
    a, b = _weights(none), _weights(based)
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_mixed_rollout_draws_from_the_mixture(prompts, tiny_tokenizer, make_model):
    """mix 1: only the teacher matters; mix 0: only the student; near-zero temperature at mix 0: the student's
    greedy completion (so the KV caches and the left-padded positions are right)."""
    ds = PromptDataset([str(prompts)], tiny_tokenizer, seq_len=40, max_new_tokens=6)
    batch = {key: torch.stack([ds[i][key] for i in range(4)]) for key in ("input_ids", "attention_mask", "prompt_len")}
    a, b, c = make_model(seed=3), make_model(seed=4), make_model(seed=5)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    state = torch.random.get_rng_state()

    def sample(student, teacher, mix, temperature=1.0):
        cfg = OnPolicyConfig(max_new_tokens=6, teacher_mix=mix, temperature=temperature)
        return mixed_rollout(student, teacher, batch, cfg, pad, eos, seed=11)["input_ids"]

    assert torch.equal(sample(a, c, 1.0), sample(b, c, 1.0)) and not torch.equal(sample(a, c, 1.0), sample(a, b, 1.0))
    assert torch.equal(sample(a, b, 0.0), sample(a, c, 0.0))
    assert torch.equal(torch.random.get_rng_state(), state)
    greedy = sample(a, b, 0.0, temperature=1e-4)
    width = int(batch["prompt_len"].max())
    left = torch.full((4, width), pad)
    mask = torch.zeros_like(left)
    for row, n in enumerate(batch["prompt_len"].tolist()):
        left[row, width - n :], mask[row, width - n :] = batch["input_ids"][row, :n], 1
    ref = a.generate(
        input_ids=left, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=pad, eos_token_id=eos
    )
    for row, n in enumerate(batch["prompt_len"].tolist()):
        want = ref[row, width:].tolist()
        want = want[: want.index(eos) + 1] if eos in want else want
        assert greedy[row, n : n + len(want)].tolist() == want


@pytest.mark.slow
@pytest.mark.parametrize("mix", [0.0, 0.3])
def test_minillm_run_and_its_loss_falls(pair, prompts, tmp_path, tiny_tokenizer, mix):
    """MiniLLM towards a teacher that is the student with a sharper head (a target the tiny student can reach): the
    per-token reverse KL (the single-step value) falls over the run."""
    teacher = AutoModelForCausalLM.from_pretrained(pair[0])
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)
    teacher.save_pretrained(tmp_path / "sharp")
    tiny_tokenizer.save_pretrained(tmp_path / "sharp")
    _, logs = _run(
        (pair[0], tmp_path / "sharp"), prompts, tmp_path / f"minillm{mix}", "train.max_steps=12", "train.lr=0.003",
        "train.scheduler=constant", "on_policy.objective=minillm", f"on_policy.teacher_mix={mix}",
        "on_policy.baseline=batch",
    )  # fmt: skip
    first, last = sum(e["kd"] for e in logs[:3]) / 3, sum(e["kd"] for e in logs[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    assert all(e["on_policy_fraction"] == 1.0 and "reward_mean" in e for e in logs)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("on_policy.top_k=0",), "on_policy.top_k"),
        (("on_policy.teacher_mix=1.5", "on_policy.objective=minillm"), "on_policy.teacher_mix"),
        (("on_policy.replay_size=-1",), "on_policy.replay_size"),
        (("on_policy.replay_size=8", "on_policy.objective=rkl_sampled"), "biases the policy gradient"),
        (("on_policy.teacher_mix=0.2",), "belongs to objective=minillm"),
        (("on_policy.teacher_mix=0.2", "on_policy.objective=minillm", "on_policy.top_p=0.9"), "set on_policy.top_p=1"),
        (("on_policy.adaptive=true",), "set data.eval"),
        (("on_policy.iw_clip=0",), "on_policy.iw_clip"),
        (("on_policy.stop=['']",), "on_policy.stop: a stop string must not be empty"),
        (
            ("on_policy.objective=minillm", "teacher.source=endpoint", "teacher.endpoint.base_url=http://x/v1",
             "teacher.endpoint.model=m"),
            "single_step=false",
        ),
        (
            ("on_policy.objective=rkl_topk", "on_policy.top_k=64", "teacher.source=endpoint",
             "teacher.endpoint.base_url=http://x/v1", "teacher.endpoint.model=m"),
            "teacher.endpoint.top_k",
        ),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(pair, prompts, tmp_path, extra, needle):
    with pytest.raises(UserError, match=needle) as err:
        load_config(None, _opts(pair, prompts, tmp_path / "bad", *extra), run=True)
    assert "\n" not in str(err.value)


def test_top_k_above_the_vocabulary_is_refused_before_training(pair, prompts, tmp_path):
    with pytest.raises(UserError, match=r"on_policy.top_k: 100000 is more than the student's vocabulary"):
        _run(pair, prompts, tmp_path / "big", "on_policy.objective=rkl_topk", "on_policy.top_k=100000")
    assert not (tmp_path / "big" / "student").exists()


def test_stop_strings_end_rollouts_after_the_token_that_completes_them(prompts, tiny_tokenizer, make_model):
    """The same seed with and without a stop string: each completion is the unstopped one, cut after the first
    token whose text completes the stop string (marked stopped); in the plain and the teacher-mixed sampler."""
    ds = PromptDataset([str(prompts)], tiny_tokenizer, seq_len=40, max_new_tokens=8)
    batch = {key: torch.stack([ds[i][key] for i in range(4)]) for key in ("input_ids", "attention_mask", "prompt_len")}
    model, teacher = make_model(seed=3), make_model(seed=4)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for mix in (0.0, 0.5):

        def sample(stop, mix=mix):
            cfg = OnPolicyConfig(max_new_tokens=8, temperature=1.5, teacher_mix=mix, stop=stop)
            if mix:
                return mixed_rollout(model, teacher, batch, cfg, pad, eos, seed=5, tokenizer=tiny_tokenizer)
            return rollout(model, batch, cfg, pad, eos, seed=5, tokenizer=tiny_tokenizer)

        free = sample([])
        completions = [
            free["input_ids"][row, n : n + k].tolist()
            for row, (n, k) in enumerate(zip(free["prompt_len"].tolist(), free["completion_len"].tolist(), strict=True))
        ]
        stop = tiny_tokenizer.decode(completions[0][2:3])  # the text of row 0's third sampled token
        cut = sample([stop])
        n_stopped = 0
        for row, tokens in enumerate(completions):
            texts = [tiny_tokenizer.decode(tokens[:i]) for i in range(1, len(tokens) + 1)]
            k = next((i + 1 for i, text in enumerate(texts) if stop in text), len(tokens))
            n, got = int(cut["prompt_len"][row]), int(cut["completion_len"][row])
            assert cut["input_ids"][row, n : n + got].tolist() == tokens[:k]
            assert bool(cut["stopped"][row]) == (k < len(tokens) or bool(free["stopped"][row]) or stop in texts[-1])
            n_stopped += k < len(tokens)
        assert int(cut["completion_len"][0]) <= 3 and n_stopped >= 1
