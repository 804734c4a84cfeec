"""Tests of the loss zoo: divergences vs naive float64 formulas, limits, gradients, TRL parity, kd_terms."""

from __future__ import annotations

import math
import os

import pytest
import torch

from potstill.config import LOSS_NAMES, LossConfig
from potstill.losses import LOSSES, Divergence, KDTerms, combine, kd_terms, per_token_divergence
from potstill.losses import divergences as D

TEMPERATURES = (0.5, 1.0, 2.0)
# Every divergence with its parameters, as (name, kwargs) pairs; jsd/skl/srkl/akl at several values.
CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("tvd", {}),
    *[("jsd", {"beta": b}) for b in (0.0, 0.1, 0.5, 0.9, 1.0)],
    *[("jsd", {"beta": b, "scaled": True}) for b in (0.0, 0.3, 1.0)],
    *[("skl", {"skew": a}) for a in (0.0, 0.1, 0.5)],
    *[("srkl", {"skew": a}) for a in (0.0, 0.1, 0.5)],
    *[("akl", {"mu": m}) for m in (0.0, 0.3, 0.5, 0.9)],
]
# One case per divergence (with non-trivial parameters) for the costlier checks.
FEW = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.6, "scaled": True})]
FEW += [("skl", {"skew": 0.1}), ("srkl", {"skew": 0.1}), ("akl", {"mu": 0.5})]


def _ids(cases: list) -> list[str]:
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in cases]


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# ---- naive float64 references: probabilities first, then the textbook formula -----------------------


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * torch.log(a / b)).sum(-1)


def _naive_akl_weights(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    """w_head per row by walking the teacher's tokens in descending order (the documented head rule)."""
    weights = []
    for p_row, q_row in zip(p.tolist(), q.tolist(), strict=True):
        order = sorted(range(len(p_row)), key=lambda v: -p_row[v])
        head, mass = set(), 0.0
        for v in order:
            if mass >= mu:
                break
            head.add(v)
            mass += p_row[v]
        gaps = [abs(a - b) for a, b in zip(p_row, q_row, strict=True)]
        weights.append(sum(gaps[v] for v in head) / sum(gaps))
    return torch.tensor(weights, dtype=torch.float64)


def naive(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float, **kw: float) -> torch.Tensor:
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        beta = kw["beta"]
        if beta in (0.0, 1.0):
            return _kl(p, q) if beta == 0.0 else _kl(q, p)
        m = beta * p + (1 - beta) * q
        value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        return value / (beta * (1 - beta)) if kw.get("scaled") else value
    if name == "skl":
        return _kl(p, kw["skew"] * p + (1 - kw["skew"]) * q)
    if name == "srkl":
        return _kl(q, (1 - kw["skew"]) * p + kw["skew"] * q)
    w = _naive_akl_weights(p, q, kw["mu"])
    return w * _kl(p, q) + (1 - w) * _kl(q, p)


def ours(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float, **kw: float) -> torch.Tensor:
    return getattr(D, name)(s, t, temperature, **kw)


# ---- each divergence ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kw"), CASES, ids=_ids(CASES))
def test_matches_naive_float64(name: str, kw: dict) -> None:
    s, t = _logits(6, 11, seed=1), _logits(6, 11, seed=2)
    for temperature in TEMPERATURES:
        got = ours(name, s, t, temperature, **kw)
        assert got.dtype == torch.float64 and got.shape == (6,)
        torch.testing.assert_close(got, naive(name, s, t, temperature, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "kw"), FEW, ids=_ids(FEW))
def test_float32_and_bf16_inputs_close_to_float64(name: str, kw: dict) -> None:
    s, t = _logits(16, 200, seed=3), _logits(16, 200, seed=4)
    ref = naive(name, s, t, 1.5, **kw)
    got32 = ours(name, s.float(), t.float(), 1.5, **kw)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-5)
    # bf16 logits are rounded on input (relative 4e-3 per logit); the maths is still float32.
    s16 = s.bfloat16().requires_grad_(True)
    got16 = ours(name, s16, t.float(), 1.5, **kw)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16.double(), naive(name, s16.double(), t, 1.5, **kw), rtol=1e-4, atol=1e-5)
    got16.sum().backward()
    ref = s16.detach().double().requires_grad_(True)
    naive(name, ref, t, 1.5, **kw).sum().backward()
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad.double(), ref.grad, rtol=2e-2, atol=1e-4)


def test_hand_values_two_token_vocabulary() -> None:
    # q = (1/2, 1/2) from logits (0, 0); p = (3/4, 1/4) from logits (log 3, 0).
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = (0.625, 0.375)  # beta = 1/2
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    jsd += 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    mix = (0.1 * 0.75 + 0.9 * 0.5, 0.1 * 0.25 + 0.9 * 0.5)  # skl mixture, skew 0.1
    skl = 0.75 * math.log(0.75 / mix[0]) + 0.25 * math.log(0.25 / mix[1])
    rmix = (0.9 * 0.75 + 0.1 * 0.5, 0.9 * 0.25 + 0.1 * 0.5)  # srkl mixture, skew 0.1
    srkl = 0.5 * math.log(0.5 / rmix[0]) + 0.5 * math.log(0.5 / rmix[1])
    expected = {
        "fkl": fkl,
        "rkl": rkl,
        "tvd": 0.25,
        "jsd": jsd,
        "skl": skl,
        "srkl": srkl,
        # head = {token 0} at mu = 0.5: gaps 1/4 and 1/4, so equal weights.
        "akl": 0.5 * fkl + 0.5 * rkl,
    }
    for name, value in expected.items():
        got = per_token_divergence(s, t, Divergence(name=name))
        assert got.item() == pytest.approx(value, rel=1e-12), name


@pytest.mark.parametrize(("name", "kw"), CASES, ids=_ids(CASES))
def test_zero_on_equal_and_nonnegative(name: str, kw: dict) -> None:
    t = _logits(8, 40, seed=5, scale=4.0)
    for temperature in TEMPERATURES:
        assert ours(name, t, t, temperature, **kw).abs().max() < 1e-12
        s = _logits(8, 40, seed=10, scale=4.0)
        assert (ours(name, s, t, temperature, **kw) > 0).all()


def test_tvd_bounded_by_one_even_for_disjoint_peaks() -> None:
    s = torch.full((3, 50), -60.0)
    t = torch.full((3, 50), -60.0)
    s[:, 0], t[:, 1] = 60.0, 60.0  # almost disjoint one-hot distributions
    value = D.tvd(s, t)
    assert ((value <= 1.0) & (value > 0.999)).all()
    mixed = D.tvd(_logits(64, 30, seed=6, scale=5.0), _logits(64, 30, seed=7, scale=5.0))
    assert ((mixed >= 0) & (mixed <= 1)).all()


@pytest.mark.parametrize(("name", "kw"), CASES, ids=_ids(CASES))
def test_underflowing_probabilities_stay_finite(name: str, kw: dict) -> None:
    # Probabilities of exp(-1e4) underflow to exactly 0 in float32; log(0) must not appear.
    s = torch.zeros(4, 16)
    t = torch.zeros(4, 16)
    s[:, :8], t[:, 4:12] = -1.0e4, -1.0e4
    s.requires_grad_(True)
    value = ours(name, s, t, 1.0, **kw)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(s.grad).all()


def test_jsd_endpoints_and_scaled_limits() -> None:
    s, t = _logits(5, 30, seed=8), _logits(5, 30, seed=9)
    assert torch.equal(D.jsd(s, t, beta=0.0), D.fkl(s, t))
    assert torch.equal(D.jsd(s, t, beta=1.0), D.rkl(s, t))
    assert torch.equal(D.jsd(s, t, beta=0.0, scaled=True), D.fkl(s, t))
    assert torch.equal(D.jsd(s, t, beta=1.0, scaled=True), D.rkl(s, t))
    # The unscaled form vanishes near the ends (the jump of TRL's convention); the scaled one is continuous.
    assert (D.jsd(s, t, beta=1e-4) < 1e-3 * D.fkl(s, t)).all()
    # The error is O(beta * chi^2(p||q)), large for these far-apart random distributions: check the trend too.
    for eps, rtol in ((1e-4, 5e-2), (1e-6, 5e-4)):
        torch.testing.assert_close(D.jsd(s, t, beta=eps, scaled=True), D.fkl(s, t), rtol=rtol, atol=0)
        torch.testing.assert_close(D.jsd(s, t, beta=1 - eps, scaled=True), D.rkl(s, t), rtol=rtol, atol=0)


def test_skew_zero_is_kl() -> None:
    s, t = _logits(5, 30, seed=10), _logits(5, 30, seed=11)
    assert torch.equal(D.skl(s, t, skew=0.0), D.fkl(s, t))
    assert torch.equal(D.srkl(s, t, skew=0.0), D.rkl(s, t))
    # skew 1: the mixture is the distribution itself.
    assert D.skl(s, t, skew=1.0).abs().max() < 1e-12


def test_akl_head_rule() -> None:
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    head = D.akl_head_mask(p, 0.5)
    assert head.tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert D.akl_head_mask(p, 0.7).tolist() == [[True, True, False], [False, True, True], [True, True, True]]
    assert not D.akl_head_mask(p, 0.0).any() and D.akl_head_mask(p, 1.0).all()
    # mu = 0 is rkl (empty head), mu = 1 is fkl (no tail).
    s, t = _logits(4, 9, seed=12), _logits(4, 9, seed=13)
    torch.testing.assert_close(D.akl(s, t, mu=0.0), D.rkl(s, t))
    torch.testing.assert_close(D.akl(s, t, mu=1.0), D.fkl(s, t))


def test_akl_matches_dskd_rule_at_half() -> None:
    """DSKD's code: tail = ascending cumulative teacher mass < mu; at mu = 0.5 our head is its complement."""
    s, t = _logits(16, 25, seed=14), _logits(16, 25, seed=15)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    sorted_p, idx = p.sort(-1)
    gap = (sorted_p - q.gather(-1, idx)).abs()
    tail = (sorted_p.cumsum(-1) < 0.5).double()
    g_head, g_tail = (gap * (1 - tail)).sum(-1), (gap * tail).sum(-1)
    dskd = g_head / (g_head + g_tail) * _kl(p, q) + g_tail / (g_head + g_tail) * _kl(q, p)
    torch.testing.assert_close(D.akl(s, t, mu=0.5), dskd)


# ---- gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kw"), FEW[:-1], ids=_ids(FEW[:-1]))
def test_gradcheck(name: str, kw: dict) -> None:
    s = _logits(3, 5, seed=16).requires_grad_(True)
    t = _logits(3, 5, seed=17).requires_grad_(True)
    # Student only: the closed-form gradient computed in forward. Both: the autograd formula.
    assert torch.autograd.gradcheck(lambda a: ours(name, a, t.detach(), 1.3, **kw), (s,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: ours(name, a, b, 1.3, **kw), (s, t), fast_mode=True)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=_ids(CASES))
def test_closed_form_gradient_equals_autograd(name: str, kw: dict) -> None:
    s, t = _logits(4, 9, seed=23), _logits(4, 9, seed=24)
    weights = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fast = s.clone().requires_grad_(True)
    (ours(name, fast, t, 0.8, **kw) * weights).sum().backward()
    slow, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    (ours(name, slow, teacher, 0.8, **kw) * weights).sum().backward()
    torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-10, atol=1e-13)
    # The closed-form path works in place on its own buffers, never on the caller's logits.
    assert torch.equal(fast.detach(), s) and torch.equal(teacher.detach(), t)


@pytest.mark.parametrize("mu", [0.3, 0.5])
def test_akl_gradient_is_weighted_kl_gradients(mu: float) -> None:
    """akl's weights are detached, so its gradient is w_head grad(fkl) + w_tail grad(rkl) (not gradcheck's)."""
    s, t = _logits(3, 7, seed=18), _logits(3, 7, seed=19)
    w = _naive_akl_weights(torch.softmax(t / 1.3, -1), torch.softmax(s / 1.3, -1), mu)
    s1 = s.clone().requires_grad_(True)
    D.akl(s1, t, 1.3, mu).sum().backward()
    s2 = s.clone().requires_grad_(True)
    (w * naive("fkl", s2, t, 1.3) + (1 - w) * naive("rkl", s2, t, 1.3)).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


# ---- registry ---------------------------------------------------------------------------------------


def test_registry_matches_config_and_uses_its_parameters() -> None:
    assert tuple(LOSSES) == LOSS_NAMES
    fields = set(LossConfig.model_fields)
    for spec in LOSSES.values():
        assert set(spec.params) <= fields and spec.formula and "\n" not in spec.formula
    s, t = _logits(4, 20, seed=20), _logits(4, 20, seed=21)
    cfg = Divergence(name="jsd", beta=0.9, jsd_scaled=True, temperature=2.0)
    torch.testing.assert_close(per_token_divergence(s, t, cfg), naive("jsd", s, t, 2.0, beta=0.9, scaled=True))
    cfg = Divergence(name="srkl", skew=0.3, temperature=0.7)
    torch.testing.assert_close(per_token_divergence(s, t, cfg), naive("srkl", s, t, 0.7, skew=0.3))
    cfg = Divergence(name="akl", akl_mu=0.8)
    torch.testing.assert_close(per_token_divergence(s, t, cfg), naive("akl", s, t, 1.0, mu=0.8))


# ---- parity with TRL's generalized_jsd_loss ----------------------------------------------------------


@pytest.fixture(scope="module")
def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


def _batch(b: int = 3, t: int = 7, v: int = 40, seed: int = 22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[:, 0] = -100  # the first <bos> is never a target
    return _logits(b, t, v, seed=seed + 1), _logits(b, t, v, seed=seed + 2), labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_parity_with_trl(trl_jsd, beta: float) -> None:
    for temperature in TEMPERATURES:
        _check_trl_parity(trl_jsd, beta, temperature)


def _check_trl_parity(trl_jsd, beta: float, temperature: float) -> None:
    s, t, labels = _batch()
    cfg = Divergence(name="jsd", beta=beta, temperature=temperature)
    # With labels, TRL's "batchmean" is a mean over unmasked tokens of pre-shifted logits/labels:
    # exactly kd_terms' kd (which shifts itself).
    ref = trl_jsd(s[:, :-1], t[:, :-1], labels[:, 1:], beta=beta, temperature=temperature)
    torch.testing.assert_close(kd_terms(s, t, labels, cfg).kd, ref, rtol=1e-12, atol=1e-12)
    # Without labels, "batchmean" divides the sum over all tokens by the batch size (not the token count),
    # and "none" is per vocabulary entry: our per-token values summed over V.
    flat = per_token_divergence(s.reshape(-1, 40), t.reshape(-1, 40), cfg)
    torch.testing.assert_close(flat.sum() / s.shape[0], trl_jsd(s, t, beta=beta, temperature=temperature))
    none = trl_jsd(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
    torch.testing.assert_close(flat, none.reshape(-1))


# ---- kd_terms and combine ---------------------------------------------------------------------------


def _naive_terms(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg: Divergence) -> tuple:
    kd, ce, n = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            target = int(labels[b, i + 1])
            if target == -100:
                continue
            kd = kd + naive(cfg.name, s[b, i : i + 1], t[b, i : i + 1], cfg.temperature)[0]
            ce = ce - torch.log_softmax(s[b, i].double(), -1)[target]
            n += 1
    return kd / n, ce / n, n


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd"])
def test_kd_terms_masks_and_shifts(name: str) -> None:
    s, t, labels = _batch()
    cfg = Divergence(name=name, temperature=1.7)
    terms = kd_terms(s, t, labels, cfg)
    kd, ce, n = _naive_terms(s, t, labels, cfg)
    assert terms.n_tokens == n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(terms.kd, kd)
    torch.testing.assert_close(terms.ce, ce)
    # Logits at unscored positions (prompt, padding, last position) change nothing and get no gradient.
    s2 = s.clone()
    s2[0, :2], s2[1, 4:], s2[:, -1] = 9.0, -9.0, 3.0
    s2.requires_grad_(True)
    terms2 = kd_terms(s2, t, labels, cfg)
    torch.testing.assert_close(terms2.kd, terms.kd)
    (terms2.kd + terms2.ce).backward()
    assert s2.grad[0, :2].abs().max() == 0 and s2.grad[1, 4:].abs().max() == 0 and s2.grad[:, -1].abs().max() == 0


def test_kd_terms_global_normalization_splits_exactly() -> None:
    s, t, labels = _batch(b=4, seed=30)
    cfg = Divergence(name="jsd", beta=0.3, temperature=2.0)
    full_s = s.clone().requires_grad_(True)
    full = kd_terms(full_s, t, labels, cfg)
    combine(full, 0.7, 2.0).backward()
    total = int((labels[:, 1:] != -100).sum())
    half_s = s.clone().requires_grad_(True)
    kd, ce = 0.0, 0.0
    for part in (slice(0, 1), slice(1, 4)):  # unequal halves: a mean of means would differ
        terms = kd_terms(half_s[part], t[part], labels[part], cfg, num_tokens=torch.tensor(total))
        combine(terms, 0.7, 2.0).backward()
        kd, ce = kd + terms.kd, ce + terms.ce
    torch.testing.assert_close(kd, full.kd, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ce, full.ce, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(half_s.grad, full_s.grad, rtol=1e-12, atol=1e-14)


def test_kd_terms_all_masked_is_zero_with_finite_grad() -> None:
    s, t, labels = _batch()
    s.requires_grad_(True)
    terms = kd_terms(s, t, torch.full_like(labels, -100), Divergence(name="akl"))
    assert terms.n_tokens == 0 and terms.kd.item() == 0 and terms.ce.item() == 0
    combine(terms, 0.5, 2.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() == 0


def test_kd_terms_bf16_student_is_upcast() -> None:
    s, t, labels = _batch()
    cfg = Divergence(name="fkl")
    terms = kd_terms(s.bfloat16(), t.float(), labels, cfg)
    assert terms.kd.dtype == torch.float32 and terms.ce.dtype == torch.float32
    ref = kd_terms(s.bfloat16().double(), t, labels, cfg)
    torch.testing.assert_close(terms.kd.double(), ref.kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.ce.double(), ref.ce, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_exactly_ce_without_teacher() -> None:
    s, t, labels = _batch()
    no_teacher = kd_terms(s, None, labels, Divergence())
    assert no_teacher.kd is None
    assert combine(no_teacher, 0.0, 2.0) is no_teacher.ce
    with_teacher = kd_terms(s, t, labels, Divergence())
    assert torch.equal(combine(with_teacher, 0.0, 2.0), no_teacher.ce)
    with pytest.raises(ValueError, match="needs a KD term"):
        combine(no_teacher, 0.5, 1.0)


def test_combine_weights_and_t_squared_scaling() -> None:
    terms = KDTerms(kd=torch.tensor(0.3, dtype=torch.float64), ce=torch.tensor(2.0, dtype=torch.float64), n_tokens=5)
    assert combine(terms, 0.25, 3.0).item() == pytest.approx(0.25 * 9 * 0.3 + 0.75 * 2.0)
    # T^2 keeps the KD gradient scale independent of T at high temperature (Hinton et al. 2015).
    s, t, labels = _batch()
    norms = []
    for temperature in (8.0, 16.0):
        leaf = s.clone().requires_grad_(True)
        combine(kd_terms(leaf, t, labels, Divergence(temperature=temperature)), 1.0, temperature).backward()
        norms.append(leaf.grad.norm().item())
    assert norms[1] == pytest.approx(norms[0], rel=0.1)


def test_cli_lists_every_loss_with_its_formula() -> None:
    from typer.testing import CliRunner

    from potstill.cli import app

    result = CliRunner().invoke(app, ["losses"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == list(LOSSES)
    for line, spec in zip(lines, LOSSES.values(), strict=True):
        assert line.endswith(spec.formula)
