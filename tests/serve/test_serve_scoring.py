"""potstill serve as a scoring teacher: `echo` + `logprobs` + `max_tokens: 0` as vLLM answers them, potstill's own
`EndpointScorer` against it, an on-policy run whose teacher is `potstill serve` (the same losses as the teacher in
memory), and the one-line error of a run whose server does not return log-probs."""

from __future__ import annotations

import json
import random

import pytest
import torch

from potstill.config import load_config
from potstill.models.load import load_model
from potstill.serve.protocol import ServeLimits
from potstill.teacher.endpoint import EndpointClient
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.scoring import EndpointScorer
from potstill.train.recipes import run_distill

WORDS = "the cat sat on a mat with some dog and bird".split()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer, build_model):
    path = tmp_path_factory.mktemp("scoring") / "teacher"
    build_model(tiny_tokenizer, 1, hidden=48, save_to=path)
    return path


@pytest.fixture(scope="module")
def served(teacher_dir, live_server):
    with live_server(teacher_dir, name="teacher") as (app, url):
        yield app, url


def local_logprobs(teacher_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V]: the teacher's log-probs of each next token, in memory."""
    model, _ = load_model(teacher_dir)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)


def test_echo_logprobs_of_token_ids_are_the_models(served, teacher_dir, tiny_tokenizer):
    import openai

    client = openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0)
    seqs = [tiny_tokenizer("The quick brown fox")["input_ids"], tiny_tokenizer("def add(a, b):")["input_ids"][:5]]
    resp = client.completions.create(model="teacher", prompt=seqs, echo=True, logprobs=3, max_tokens=0,
                                     temperature=0, extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    assert len(resp.choices) == 2 and resp.usage.completion_tokens == 0
    for choice, ids in zip(resp.choices, seqs, strict=True):
        lp, local = choice.logprobs, local_logprobs(teacher_dir, ids)
        assert lp.tokens == [f"token_id:{t}" for t in ids] and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = local.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, rtol=0, atol=1e-5)
        for i, top in enumerate(lp.top_logprobs[1:]):
            values, best = local[i].topk(3)
            want = {f"token_id:{int(j)}": float(v) for v, j in zip(values, best, strict=True)}
            assert {k: top[k] for k in want} == pytest.approx(want, abs=1e-5)
            assert set(top) == set(want) | {lp.tokens[i + 1]}  # the top 3 and the actual token, as vLLM answers


def test_text_prompts_echo_their_text_and_generated_tokens_get_logprobs(served, tiny_tokenizer):
    import openai

    client = openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0)
    echoed = client.completions.create(model="teacher", prompt="The quick", echo=True, logprobs=0, max_tokens=0)
    choice = echoed.choices[0]
    ids = tiny_tokenizer("The quick")["input_ids"]  # as the tokenizer encodes it, special tokens included
    assert choice.text == "The quick" and choice.logprobs.tokens == [tiny_tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.top_logprobs[1] == {choice.logprobs.tokens[1]: choice.logprobs.token_logprobs[1]}
    gen = client.completions.create(model="teacher", prompt="The quick", logprobs=2, max_tokens=4, temperature=0)
    lp, n = gen.choices[0].logprobs, gen.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == n and all(x is not None and x <= 0 for x in lp.token_logprobs)


def test_endpoint_scorer_against_potstill_serve(served, teacher_dir, tiny_tokenizer):
    client = EndpointClient(served[1], "teacher", max_retries=0)
    scorer = EndpointScorer(client, tiny_tokenizer, top_k=5, batch_size=2)
    scorer.self_test(tiny_tokenizer)  # same tokenizer, deterministic scores
    torch.manual_seed(0)
    ids, mask = torch.randint(4, len(tiny_tokenizer), (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = mask[2, 4:] = 0
    scores = scorer.score(ids, mask)
    model, _ = load_model(teacher_dir)
    local = torch.log_softmax(OnlineTeacher(model).logits(ids, mask), -1)
    for row, n in enumerate(mask.sum(1).tolist()):
        expected = local[row, : n - 1].gather(1, ids[row, 1:n, None])[:, 0]
        torch.testing.assert_close(scores.token_logprobs[row, : n - 1], expected, rtol=0, atol=1e-5)
        assert torch.equal(scores.targets.ids[row, : n - 1], local[row, : n - 1].topk(5, dim=-1).indices)


def _opts(student, data, out, *extra):
    return [
        f"model.student={student}", f"data.train=[{data}]", "data.seq_len=40", f"train.output_dir={out}",
        "train.recipe=on_policy", "train.batch_size=3", "train.lr=0.003", "train.warmup_steps=0",
        "train.logging_steps=1", "train.max_steps=2", "loss.alpha=1.0", "loss.temperature=1.0",
        "on_policy.lmbda=1.0", "on_policy.max_new_tokens=5", "on_policy.objective=rkl_sampled", *extra,
    ]  # fmt: skip


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(2 + i % 3)) + ":", "completion": " cat"}
            for i in range(9)]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_on_policy_run_with_potstill_serve_as_teacher_equals_the_teacher_in_memory(
    served, teacher_dir, make_model_dir, prompts, tmp_path
):
    app, url = served
    student = make_model_dir("student", seed=0)
    before = app.state.requests
    endpoint = ["teacher.source=endpoint", f"teacher.endpoint.base_url={url}", "teacher.endpoint.model=teacher"]
    remote = _losses(run_distill(load_config(None, _opts(student, prompts, tmp_path / "remote", *endpoint), run=True)))
    assert app.state.requests > before  # the teacher really was the server
    online = _opts(student, prompts, tmp_path / "online", f"model.teacher={teacher_dir}")
    local = _losses(run_distill(load_config(None, online, run=True)))
    assert len(remote) == 2 and remote == pytest.approx(local, rel=1e-3, abs=1e-4)


def test_a_server_without_logprobs_fails_the_self_test_in_one_line(
    teacher_dir, live_server, make_model_dir, prompts, tmp_path, run_main, assert_one_line_error
):
    student = make_model_dir("student", seed=0)
    with live_server(teacher_dir, name="teacher", limits=ServeLimits(max_logprobs=0)) as (_, url):
        endpoint = ["teacher.source=endpoint", f"teacher.endpoint.base_url={url}", "teacher.endpoint.model=teacher"]
        proc = run_main("distill", *_opts(student, prompts, tmp_path / "run", *endpoint))
    assert_one_line_error(proc, url, "logprobs", "scoring needs /v1/completions with echo, logprobs")
    assert not (tmp_path / "run" / "log.jsonl").exists()
