"""EndpointScorer against a fake scoring server backed by a tiny real model: the local teacher's exact log-probs,
the self-test (tokenizer, determinism), servers without echo/logprobs, retries."""

from __future__ import annotations

import pytest
import torch

from fake_openai import FakeServer, ModelScorer
from potstill.errors import UserError
from potstill.losses import scored_mask
from potstill.teacher.endpoint import EndpointClient, EndpointError
from potstill.teacher.online import OnlineTeacher
from potstill.teacher.scoring import EndpointScorer, sampled_teacher_logprobs


def scorer_for(server: FakeServer, tokenizer, top_k: int = 5, batch_size: int = 2, **kw) -> EndpointScorer:
    client = EndpointClient(server.base_url, "fake", timeout=5.0, max_retries=2, backoff=0.01, sleep=lambda s: None)
    return EndpointScorer(client, tokenizer, top_k=top_k, batch_size=batch_size, **kw)


@pytest.fixture
def teacher(make_model):
    return make_model(seed=1, hidden=48)


def _batch(vocab: int, lengths=(10, 7, 4), width=10):
    torch.manual_seed(0)
    ids = torch.randint(4, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids[mask == 0] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("token_ids", [True, False], ids=["token_id-form", "vocab-strings"])
def test_remote_scores_are_the_local_teachers_log_probs(teacher, tiny_tokenizer, token_ids):
    ids, mask = _batch(len(tiny_tokenizer))
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer, token_ids=token_ids)) as server:
        scores = scorer_for(server, tiny_tokenizer, top_k=5, batch_size=2).score(ids, mask)
    assert len(server.bodies) == 2  # 3 sequences, 2 per request
    for body in server.bodies:
        assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 5 and body["temperature"] == 0
    sent = sorted(b["prompt"] for b in server.bodies)  # the two requests may arrive in either order
    assert sent == sorted([[ids[0].tolist(), ids[1, :7].tolist()], [ids[2, :4].tolist()]])  # ids, without padding
    local = torch.log_softmax(OnlineTeacher(teacher).logits(ids, mask), -1)  # [B, L, V]
    for row, n in enumerate(mask.sum(1).tolist()):
        expected = local[row, : n - 1].gather(1, ids[row, 1:n, None])[:, 0]  # position t predicts token t + 1
        torch.testing.assert_close(scores.token_logprobs[row, : n - 1], expected, rtol=0, atol=1e-5)
        assert (scores.token_logprobs[row, n - 1 :] == 0).all()
        values, top = local[row, : n - 1].topk(5, dim=-1)
        assert torch.equal(scores.targets.ids[row, : n - 1], top)
        torch.testing.assert_close(scores.targets.logprobs[row, : n - 1], values, rtol=0, atol=1e-5)
        tail = 1 - values.exp().sum(-1)
        torch.testing.assert_close(scores.targets.tail[row, : n - 1], tail, rtol=0, atol=1e-5)
    assert scores.targets.temperature == 1.0


def test_sampled_log_probs_agree_between_endpoint_and_online_teacher(teacher, tiny_tokenizer):
    ids, mask = _batch(len(tiny_tokenizer))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    scored = scored_mask(labels)
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer)) as server:
        remote = sampled_teacher_logprobs(scorer_for(server, tiny_tokenizer), inputs, scored, 1.0)
    local = sampled_teacher_logprobs(OnlineTeacher(teacher), inputs, scored, 1.0)
    assert remote.shape == (int(scored.sum()),)
    torch.testing.assert_close(remote, local, rtol=0, atol=1e-5)


def test_self_test_passes_for_the_same_tokenizer_and_a_deterministic_server(teacher, tiny_tokenizer):
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer)) as server:
        scorer_for(server, tiny_tokenizer).self_test(tiny_tokenizer)
    assert isinstance(server.bodies[0]["prompt"], str)  # the probe text, tokenized by the server
    assert server.bodies[1]["prompt"] == [tiny_tokenizer(server.bodies[0]["prompt"])["input_ids"]] * 2


def test_self_test_catches_a_server_with_another_tokenizer(make_tokenizer, build_model, tiny_tokenizer):
    other = make_tokenizer(vocab_size=280)
    with FakeServer(scorer=ModelScorer(build_model(other), other)) as server:
        with pytest.raises(UserError, match="tokenizes the probe text differently from the student's") as err:
            scorer_for(server, tiny_tokenizer).self_test(tiny_tokenizer)
    assert "\n" not in str(err.value)


def test_self_test_catches_a_non_deterministic_server(teacher, tiny_tokenizer):
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer, noise=0.05)) as server:
        with pytest.raises(UserError, match=r"not deterministic: the same tokens scored twice differ by [\d.]+ nats"):
            scorer_for(server, tiny_tokenizer, tolerance=1e-3).self_test(tiny_tokenizer)
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer, noise=0.05)) as server:
        scorer_for(server, tiny_tokenizer, tolerance=10.0).self_test(tiny_tokenizer)  # within a loose tolerance


def test_server_without_echo_logprobs_is_a_one_line_error(teacher, tiny_tokenizer):
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer, logprobs=False)) as server:
        with pytest.raises(EndpointError, match="no echoed prompt log-probs; scoring needs /v1/completions with echo"):
            scorer_for(server, tiny_tokenizer).self_test(tiny_tokenizer)
    with FakeServer(script=["400"]) as server:  # a server that refuses echo + max_tokens 0
        with pytest.raises(EndpointError, match="refused the request: fake 400; scoring needs") as err:
            scorer_for(server, tiny_tokenizer).self_test(tiny_tokenizer)
    assert "\n" not in str(err.value)


def test_transient_faults_are_retried(teacher, tiny_tokenizer):
    ids, mask = _batch(len(tiny_tokenizer), lengths=(6,), width=6)
    with FakeServer(scorer=ModelScorer(teacher, tiny_tokenizer), script=["500", "drop"]) as server:
        scorer = scorer_for(server, tiny_tokenizer)
        scores = scorer.score(ids, mask)
    assert scorer.client.stats.retries == 2 and server.hits == 3
    assert torch.isfinite(scores.token_logprobs).all() and (scores.token_logprobs[0, :5] < 0).all()


def test_unknown_token_strings_are_refused(teacher, tiny_tokenizer):
    class Renamed(ModelScorer):
        def render(self, i: int) -> str:
            return f"<piece {i}>"

    ids, mask = _batch(len(tiny_tokenizer), lengths=(5,), width=5)
    with FakeServer(scorer=Renamed(teacher, tiny_tokenizer)) as server:
        with pytest.raises(
            EndpointError, match="not one token of the student's vocabulary.*return-tokens-as-token-ids"
        ):
            scorer_for(server, tiny_tokenizer).score(ids, mask)
