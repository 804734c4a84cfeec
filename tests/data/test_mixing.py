"""`potstill.data.mixing`: DDK Eq. 1 / Eq. 2 against hand values, DomainSampler proportions, determinism, resume."""

from __future__ import annotations

import math
from collections import Counter
from itertools import islice

import pytest

from potstill.config import load_config
from potstill.data.mixing import DomainSampler, check_weights, ddk_initial, ddk_update, static_weights
from potstill.errors import UserError

DOMAINS = ["a"] * 50 + ["b"] * 30 + ["c"] * 20  # dataset item -> domain


def test_eq1_is_a_softmax_of_the_ratios():
    # softmax(1, 2): 1 / (1 + e) and e / (1 + e)
    r = ddk_initial({"a": 1.0, "b": 2.0})
    assert r["a"] == pytest.approx(0.2689414213699951, abs=1e-12)
    assert r["b"] == pytest.approx(0.7310585786300049, abs=1e-12)
    # equal ratios -> uniform; big ratios do not overflow
    assert ddk_initial({"x": 900.0, "y": 900.0}) == pytest.approx({"x": 0.5, "y": 0.5})


def test_eq2_hand_value_smoothing_and_floor():
    prev, gaps = {"a": 0.25, "b": 0.75}, {"a": 2.0, "b": 1.0}
    # psi = (0.25 e^2, 0.75 e) = (1.847264, 2.038711); psi / sum = (0.475367, 0.524633); 0.5 * that + 0.25
    r = ddk_update(prev, gaps, smoothing=0.5)
    assert r["a"] == pytest.approx(0.5 * 0.4753669 + 0.25, abs=1e-6)
    assert r["b"] == pytest.approx(0.5 * 0.5246331 + 0.25, abs=1e-6)
    assert sum(r.values()) == pytest.approx(1.0)
    assert ddk_update(prev, gaps, smoothing=0.0) == pytest.approx({"a": 0.5, "b": 0.5})  # all floor
    # smoothing 1 from uniform weights is Eq. 1
    assert ddk_update({"a": 0.5, "b": 0.5}, gaps, smoothing=1.0) == pytest.approx(ddk_initial(gaps))
    # the floor: a domain the ratios ignore keeps (1 - smoothing) / N
    assert ddk_update({"a": 1e-30, "b": 1.0}, {"a": 0.0, "b": 5.0}, 0.5)["a"] == pytest.approx(0.25)


def test_static_weights():
    sizes = {"a": 50, "b": 30, "c": 20}
    assert static_weights("uniform", sizes) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert static_weights("proportional", sizes) == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2})
    assert static_weights("fixed", sizes, {"a": 2, "b": 0, "c": 2}) == pytest.approx({"a": 0.5, "b": 0, "c": 0.5})


def draws(sampler: DomainSampler, n: int | None = None) -> list[int]:
    return list(islice(iter(sampler), n))


def test_sampler_proportions_over_many_draws():
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    sampler = DomainSampler(DOMAINS, weights, num_samples=20000, seed=3)
    counts = Counter(DOMAINS[i] for i in draws(sampler))
    assert sum(counts.values()) == 20000
    for d, w in weights.items():  # binomial sd <= 0.0036: 0.015 is > 4 sd
        assert abs(counts[d] / 20000 - w) < 0.015, (d, counts)


def test_sampler_zero_weight_and_cycling_without_replacement():
    sampler = DomainSampler(DOMAINS, {"a": 0, "b": 0, "c": 1}, num_samples=60, seed=0)
    out = draws(sampler)
    assert all(DOMAINS[i] == "c" for i in out)
    c_items = sorted(range(80, 100))
    for k in range(3):  # each pass over domain c is a permutation of its 20 items, reshuffled each pass
        assert sorted(out[20 * k : 20 * (k + 1)]) == c_items
    assert out[:20] != out[20:40]


def test_same_seed_same_draws_other_seed_other_draws():
    weights = {"a": 1, "b": 1, "c": 1}
    one = draws(DomainSampler(DOMAINS, weights, 500, seed=7))
    assert one == draws(DomainSampler(DOMAINS, weights, 500, seed=7))
    assert one != draws(DomainSampler(DOMAINS, weights, 500, seed=8))


def test_state_dict_round_trip_mid_stream_continues_the_same():
    weights = {"a": 1, "b": 1, "c": 1}
    original = DomainSampler(DOMAINS, weights, 3000, seed=1)
    it = iter(original)
    head = list(islice(it, 1100))  # crosses the 1024-draw generation chunk
    original.set_weights({"a": 0.1, "b": 0.1, "c": 0.8})  # from draw 1100 on
    head += list(islice(it, 337))
    state = original.state_dict()
    rest = list(it)

    restored = DomainSampler(DOMAINS, {"a": 1, "b": 1, "c": 1}, 3000, seed=99)
    restored.load_state_dict(state)
    assert draws(restored) == rest
    # and a fresh iteration from draw 0 with the same history repeats the whole stream
    restored.seek(0)
    assert draws(restored) == head + rest
    counts = Counter(DOMAINS[i] for i in rest)
    assert counts["c"] / len(rest) == pytest.approx(0.8, abs=0.04)


def test_weights_cannot_change_draws_already_made():
    sampler = DomainSampler(DOMAINS, {"a": 1, "b": 1, "c": 1}, 100, seed=0)
    draws(sampler, 10)
    with pytest.raises(ValueError, match="draw"):
        sampler.set_weights({"a": 1, "b": 0, "c": 0}, start=5)


def test_load_state_dict_of_other_data_is_refused():
    state = DomainSampler(DOMAINS, {"a": 1, "b": 1, "c": 1}, 10).state_dict()
    other = DomainSampler(DOMAINS[:-1], {"a": 1, "b": 1, "c": 1}, 10)
    with pytest.raises(UserError, match="same data"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ({"a": 1, "b": 1, "c": 1, "zz": 1}, "'zz' is not in the training data"),
        ({"a": 1, "b": 1}, "no weight for training domain 'c'"),
        ({"a": -1, "b": 1, "c": 1}, ">= 0"),
        ({"a": math.nan, "b": 1, "c": 1}, ">= 0"),
        ({"a": 0, "b": 0, "c": 0}, "sum to zero"),
    ],
)
def test_bad_weights_are_one_line_errors(weights, needle):
    with pytest.raises(UserError, match=needle) as err:
        check_weights(weights, ["a", "b", "c"], "config: data.mixing.weights")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.mixing.interval=0", "data.mixing.interval"),
        ("data.mixing.interval=-3", "data.mixing.interval"),
        ("data.mixing.weights={a: -1, b: 2}", "must be a finite number >= 0"),
        ("data.mixing.weights={a: 0, b: 0}", "sum to zero"),
        ("data.mixing.smoothing=1.5", "data.mixing.smoothing"),
        ("data.mixing.gap=loss", "data.mixing.gap"),
        ("data.mixing.mode=random", "data.mixing.mode"),
    ],
)
def test_bad_mixing_config(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, ["model.student=s", override])


def test_mixing_config_defaults():
    mix = load_config(None, ["model.student=s", "data.mixing.mode=ddk"]).data.mixing
    assert (mix.interval, mix.smoothing, mix.gap) == (100, 0.5, "ppl")
    assert load_config(None, ["model.student=s"]).data.mixing is None
