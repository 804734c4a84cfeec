"""potstill serve through the official `openai` client: completions and chat, streamed or not, stop strings,
max_tokens, sampling with a seed, usage, and a client that leaves a stream early (its generation stops)."""

from __future__ import annotations

import pytest

from potstill.models.load import load_model
from potstill.teacher.generate import hf_generate


@pytest.fixture(scope="module")
def server(chat_model_dir, live_server):
    with live_server(chat_model_dir, name="chat") as (app, url):
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=30)


def streamed(client, kind: str, **kw) -> tuple[dict[int, str], dict[int, str], list]:
    """(text per choice, finish reason per choice, the chunks) of a streamed request."""
    create = client.completions.create if kind == "completion" else client.chat.completions.create
    texts, finish, chunks = {}, {}, list(create(stream=True, **kw))
    for chunk in chunks:
        for c in chunk.choices:
            text = c.text if kind == "completion" else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, chunks


def test_completions_equal_local_generation_streamed_or_not(client, chat_model_dir):
    prompts = ["The quick brown", "def add(a, b):"]
    resp = client.completions.create(model="chat", prompt=prompts, max_tokens=7, temperature=0, n=2)
    model, tok = load_model(chat_model_dir)
    local, n_in, _, _ = hf_generate(model, tok, prompts, {"temperature": 0.0, "max_tokens": 7, "n": 2})
    assert [c.text for c in resp.choices] == [t for per in local for t in per]
    assert [c.index for c in resp.choices] == [0, 1, 2, 3] and resp.usage.prompt_tokens == n_in
    texts, finish, _ = streamed(client, "completion", model="chat", prompt=prompts, max_tokens=7, temperature=0, n=2)
    assert [texts[i] for i in range(4)] == [c.text for c in resp.choices]
    assert finish == {c.index: c.finish_reason for c in resp.choices}


def test_max_tokens_bounds_the_answer(client):
    resp = client.completions.create(model="chat", prompt="for i in", max_tokens=3, temperature=0)
    choice = resp.choices[0]
    assert resp.usage.completion_tokens <= 3
    assert choice.finish_reason == ("length" if resp.usage.completion_tokens == 3 else "stop")


def test_stop_strings_cut_exactly_streamed_or_not(client):
    full = client.completions.create(model="chat", prompt="The quick", max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a piece of what the model writes, so it must stop there
    assert len(stop) == 2 and stop.strip()
    cut = full[: full.index(stop)]
    resp = client.completions.create(model="chat", prompt="The quick", max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    texts, finish, chunks = streamed(client, "completion", model="chat", prompt="The quick", max_tokens=24,
                                     temperature=0, stop=stop)  # fmt: skip
    assert texts == {0: cut} and finish == {0: "stop"}
    assert all(stop not in "".join(c.choices[0].text for c in chunks[:i]) for i in range(len(chunks) + 1))


def test_no_repeat_ngram_size_as_local_generation(client, chat_model_dir):
    """`no_repeat_ngram_size` (an extra field, as vLLM's) gives the answer local generation gives with it."""
    params = {"temperature": 0.0, "max_tokens": 24, "no_repeat_ngram_size": 2}
    model, tok = load_model(chat_model_dir)
    local, _, _, _ = hf_generate(model, tok, ["The quick"], params)
    resp = client.completions.create(model="chat", prompt="The quick", max_tokens=24, temperature=0,
                                     extra_body={"no_repeat_ngram_size": 2})  # fmt: skip
    assert resp.choices[0].text == local[0][0]
    assert resp.choices[0].text != hf_generate(model, tok, ["The quick"], params | {"no_repeat_ngram_size": 0})[0][0][0]


def test_sampling_with_a_seed_repeats_and_differs_across_seeds(client):
    def sample(seed):
        kw = {"model": "chat", "prompt": "Distillation", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9}
        return [c.text for c in client.completions.create(n=3, seed=seed, **kw).choices]

    first = sample(1)
    assert sample(1) == first and sample(2) != first and len(set(first)) > 1


def test_chat_applies_the_template_streamed_or_not(client, chat_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a student model?"}]
    resp = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
    model, tok = load_model(chat_model_dir)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    local, n_in, _, _ = hf_generate(model, tok, [prompt], {"temperature": 0.0, "max_tokens": 8})
    answer = resp.choices[0]
    assert answer.message.role == "assistant" and answer.message.content == local[0][0]
    assert resp.usage.prompt_tokens == n_in and resp.object == "chat.completion"
    texts, finish, chunks = streamed(client, "chat", model="chat", messages=messages, max_tokens=8, temperature=0,
                                     stream_options={"include_usage": True})  # fmt: skip
    assert texts == {0: answer.message.content} and finish == {0: answer.finish_reason}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.total_tokens == resp.usage.total_tokens


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["chat"]


def test_a_client_that_leaves_a_stream_stops_its_generation(server, client):
    app, _ = server
    kw = {"model": "chat", "prompt": "The", "max_tokens": 120, "temperature": 0}
    full = client.completions.create(**kw).usage.completion_tokens
    assert full > 60  # this greedy answer runs long enough to be cut short
    before = app.state.tokens
    stream = client.completions.create(stream=True, **kw)
    next(iter(stream))
    stream.close()  # the client goes away after its first chunk
    resp = client.completions.create(model="chat", prompt="The", max_tokens=2, temperature=0)  # served next
    assert resp.choices[0].text and app.state.tokens - before - resp.usage.completion_tokens < full // 2


def test_a_chat_longer_than_the_context_is_a_400_naming_it(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 512 tokens"):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "the cat " * 400}])
