"""benchmarks/chat_assistant.py: the training data (cut answers), the teacher of each stage-2 arm, the paired table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
chat_assistant = pytest.importorskip("chat_assistant")


def args_of(arm: str) -> list[str]:
    return chat_assistant.train_args(arm, 0, Path("S"), Path("C"), Path("d.jsonl"), Path("R"), 30)


def test_kd_arm_reads_the_cache_and_sft_arm_no_teacher():
    assert args_of(chat_assistant.ARMS["kd"])[-2:] == ["teacher.source=cache", "teacher.cache=C"]
    assert not any(a.startswith("teacher.") for a in args_of(chat_assistant.ARMS["sft"]))


def test_on_policy_arm_keeps_its_own_online_teacher():
    arm = "train.recipe=on_policy teacher.source=online model.teacher=T loss.alpha=1"
    args = args_of(arm)
    assert [a for a in args if a.startswith("teacher.")] == ["teacher.source=online"]
    assert args[-len(arm.split()) :] == arm.split() and "train.seed=0" in args


def evals_of(diffs: dict[str, list[float]], n_questions: int = 0) -> dict[str, dict]:
    """Synthetic evaluations: arm "a" = twin "b" + diffs per seed; per-question scores when n_questions > 0."""
    out = {}
    for s, (dr, dk) in enumerate(zip(diffs["rougeL_f1"], diffs["reverse_kl_per_token"], strict=True)):
        for arm, r, k in (("a", 0.2 + dr, 2.0 + dk), ("b", 0.2, 2.0)):
            e = {"rougeL_f1": r, "reverse_kl_per_token": k}
            if n_questions:
                rouge = [r + (0.1 if i % 2 else -0.1) for i in range(n_questions)]
                e["per_question"] = {"rougeL_f1": rouge, "reverse_kl_sum": [k * 10] * n_questions,
                                     "answer_tokens": [10] * n_questions}  # fmt: skip
            out[f"{arm}_s{s}"] = e
    return out


def test_paired_met_only_when_every_metric_is_beyond_the_seed_noise():
    good = chat_assistant.paired(evals_of({"rougeL_f1": [0.02, 0.03, 0.025], "reverse_kl_per_token":
                                           [-0.2, -0.3, -0.25]}), [0, 1, 2], "a", "b")  # fmt: skip
    assert good["met"] and good["rougeL_f1"]["won"] == 3 and good["reverse_kl_per_token"]["won"] == 3
    assert good["rougeL_f1"]["ci95"][0] > 0 > good["reverse_kl_per_token"]["ci95"][1]
    assert abs(good["rougeL_f1"]["mean"] - 0.025) < 1e-12
    # means on the arm's side on both metrics, but one seed goes the other way: not beyond the seed noise
    noisy = chat_assistant.paired(evals_of({"rougeL_f1": [0.05, 0.04, -0.06], "reverse_kl_per_token":
                                            [-0.3, -0.2, 0.2]}), [0, 1, 2], "a", "b")  # fmt: skip
    assert noisy["means_favour_arm"] and not noisy["met"]
    assert noisy["rougeL_f1"]["won"] == 2 and noisy["rougeL_f1"]["question_se"] is None


def test_paired_question_se_is_zero_for_a_constant_shift_and_positive_otherwise():
    evals = evals_of({"rougeL_f1": [0.02, 0.03], "reverse_kl_per_token": [-0.2, -0.3]}, n_questions=20)
    result = chat_assistant.paired(evals, [0, 1], "a", "b")
    assert result["rougeL_f1"]["question_se"] < 1e-9  # a constant per-question shift has no question noise
    evals["a_s0"]["per_question"]["rougeL_f1"][0] += 1.0  # one question moves: the bootstrap sees it
    se = chat_assistant.question_se(evals["a_s0"]["per_question"], evals["b_s0"]["per_question"])
    assert 0.02 < se["rougeL_f1"] < 0.1 and se["reverse_kl_per_token"] < 1e-9


def test_prompt_cached_teacher_scores_like_one_forward_over_prompt_and_answer():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from potstill.teacher.online import OnlineTeacher

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    online = OnlineTeacher(model, torch.randperm(256)[:100])  # a student of 100 ids
    cached = chat_assistant.PromptCachedTeacher(model)
    prompt = torch.randint(0, 100, (20,)).tolist()
    for answer in (torch.randint(0, 100, (7,)).tolist(), torch.randint(0, 100, (3,)).tolist(), [5]):
        full = online.logits(torch.tensor([prompt + answer]))[0, len(prompt) - 1 : len(prompt) + len(answer) - 1]
        got = cached.logits(online, prompt, answer)
        assert got.shape == (len(answer), 100)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert len(cached.caches) == 1  # the prompt was run once for the three answers


def test_chat_records_drop_the_answers_the_token_limit_cut(tmp_path):
    answers = tmp_path / "teacher.jsonl"
    completions = [
        "It signs files.",  # 3 words: ended by the teacher
        "It provides the headers\n",  # ended without a full stop: kept exactly as written (the teacher's end)
        "It is a library. It has many parts and more of them",  # 12 words = the limit: cut mid-sentence
        "x y " * 5,  # ended, but loops
    ]
    answers.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": c}) + "\n"
                               for i, c in enumerate(completions)))  # fmt: skip
    words = lambda text: len(text.split())  # noqa: E731 - the tokenizer of this test

    def assistant(path):
        return [json.loads(line)["messages"][2]["content"] for line in path.read_text().splitlines()]

    all_, train, val, counts = chat_assistant.chat_records(answers, tmp_path, 8, words, 12)
    assert assistant(all_) == completions[:2] == assistant(train) and not val.read_text()
    assert counts == {"loops": 1, "cut": 1, "cut_dropped": 1}
    # mark: the cut answer kept as written, flagged so that no end-of-turn is trained after it
    all_, *_, counts = chat_assistant.chat_records(answers, tmp_path, 8, words, 12, cut="mark")
    assert assistant(all_) == completions[:3]
    assert [json.loads(line).get("cut", False) for line in all_.read_text().splitlines()] == [False, False, True]
    assert counts == {"loops": 1, "cut": 1, "cut_dropped": 0}
    # the recipe before: the cut answer kept, cut back to its last whole sentence (and every answer stripped)
    all_, *_, counts = chat_assistant.chat_records(answers, tmp_path, 8, words, 12, cut="sentence")
    assert assistant(all_) == ["It signs files.", "It provides the headers", "It is a library."]
    assert counts == {"loops": 1, "cut": 1, "cut_dropped": 0}


def test_reference_lengths_count_the_end_token_of_ended_answers_only():
    words = lambda text: len(text.split())  # noqa: E731 - the tokenizer of this test
    got = chat_assistant.reference_lengths(["a b c", "a b c d e f g h"], words, 8)  # ended (3 + 1), cut (8)
    assert got == {"answer_tokens_mean": 6.0, "ended_share": 0.5}
