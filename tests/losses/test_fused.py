"""The fused chunked KD loss equals the dense path (kd_terms on full logits): values and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from potstill.config import LOSS_NAMES
from potstill.losses import Divergence, fused, kd_terms
from potstill.losses.fused import TeacherHead, default_chunk_size, fused_kd_terms
from potstill.losses.sparse import topk_targets
from potstill.models.heads import head_of

B, T, H, HT, V = 2, 9, 6, 5, 23


def _cfg(name: str, temperature: float = 2.0) -> Divergence:
    return Divergence(name=name, temperature=temperature, beta=0.3, skew=0.2, akl_mu=0.4)


def _problem(dtype=torch.float64, seed=0, masked=(0, 3, 4, 10)):
    """Student hidden/head (leaf tensors), teacher hidden/head, unshifted labels with some -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g, dtype=dtype) * 2).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    t_hidden = torch.randn(B, T, HT, generator=g, dtype=dtype) * 2
    t_weight = torch.randn(V, HT, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[list(masked)] = -100
    return hidden, weight, t_hidden, t_weight, labels


def _float32_problem(seed: int, n: int, v: int, h: int = 32):
    """float32 student hidden/head (leaves), teacher hidden/head and labels: 2 sequences of n // 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n // 2, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    t_hidden, t_weight = torch.randn(2, n // 2, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (2, n // 2), generator=g)
    return hidden, weight, t_hidden, t_weight, labels


def _cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def _dense(hidden, weight, t_hidden, t_weight, labels, cfg, num_tokens=None, cap=None):
    """The reference: full logits, kd_terms."""
    teacher_logits = None if t_hidden is None else _cap(t_hidden @ t_weight.T, cap)
    return kd_terms(_cap(hidden @ weight.T, cap), teacher_logits, labels, cfg, num_tokens=num_tokens)


def _fused(hidden, weight, teacher, labels, cfg, **kw):
    """The fused call on shifted, flattened rows, as the trainer makes it."""
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return fused_kd_terms(rows, weight, teacher, labels[:, 1:].reshape(-1), cfg, **kw)


def _teacher_head(t_hidden, t_weight, cap=None) -> TeacherHead:
    return TeacherHead(hidden=t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1]), weight=t_weight, softcap=cap)


def _grads(terms, wk: float, wc: float, params):
    loss = terms.ce * wc + (0 if terms.kd is None else terms.kd * wk)
    return torch.autograd.grad(loss, params)


def _assert_same(fused, dense, params, wk=0.7, wc=0.4, **tol):
    torch.testing.assert_close(fused.kd, dense.kd, **tol)
    torch.testing.assert_close(fused.ce, dense.ce, **tol)
    assert fused.n_tokens == dense.n_tokens
    for got, want in zip(_grads(fused, wk, wc, params), _grads(dense, wk, wc, params), strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("plan", [None, (0.7, 0.4), (0.2, 0.9)], ids=["recompute", "planned", "unplanned"])
def test_equals_dense_float64(name, plan):
    """Every loss, T = 2, masks, 14 tokens in chunks of 5; planned weights match the grads or not."""
    hidden, weight, t_hidden, t_weight, labels = _problem()
    cfg = _cfg(name)
    fused = _fused(hidden, weight, _teacher_head(t_hidden, t_weight), labels, cfg, chunk_size=5, loss_weights=plan)
    dense = _dense(hidden, weight, t_hidden, t_weight, labels, cfg)
    _assert_same(fused, dense, (hidden, weight))


def test_planned_weights_scale_with_the_grad():
    """Grads proportional to loss_weights (e.g. divided by grad_accum) reuse the forward's gradient."""
    hidden, weight, t_hidden, t_weight, labels = _problem()
    cfg = _cfg("jsd")
    fused = _fused(hidden, weight, _teacher_head(t_hidden, t_weight), labels, cfg, chunk_size=4, loss_weights=(2, 1))
    dense = _dense(hidden, weight, t_hidden, t_weight, labels, cfg)
    _assert_same(fused, dense, (hidden, weight), wk=2 / 8, wc=1 / 8)


def test_global_token_count_and_softcap():
    """num_tokens normalizes once; Gemma-2 softcapping applies to student and teacher logits."""
    hidden, weight, t_hidden, t_weight, labels = _problem(seed=1)
    cfg = _cfg("fkl", temperature=1.5)
    teacher = _teacher_head(t_hidden, t_weight, cap=3.0)
    fused = _fused(hidden, weight, teacher, labels, cfg, num_tokens=37, softcap=3.0, chunk_size=3)
    dense = _dense(hidden, weight, t_hidden, t_weight, labels, cfg, num_tokens=37, cap=3.0)
    _assert_same(fused, dense, (hidden, weight))


def test_no_teacher_is_ce_only():
    hidden, weight, _, _, labels = _problem(seed=2)
    fused = _fused(hidden, weight, None, labels, _cfg("fkl"), chunk_size=4, loss_weights=(0.5, 0.5))
    dense = _dense(hidden, weight, None, None, labels, _cfg("fkl"))
    assert fused.kd is None
    _assert_same(fused, dense, (hidden, weight), wk=0.0, wc=0.5)


def test_all_masked_is_zero_with_finite_grads():
    hidden, weight, t_hidden, t_weight, labels = _problem(masked=range(B * T))
    fused = _fused(hidden, weight, _teacher_head(t_hidden, t_weight), labels, _cfg("akl"), loss_weights=(1, 1))
    assert fused.kd.item() == 0.0 and fused.ce.item() == 0.0 and fused.n_tokens == 0
    for g in _grads(fused, 1.0, 1.0, (hidden, weight)):
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_sparse_targets_at_full_k_equal_dense(tail):
    """Sparse teacher targets with k = V through the fused path equal the dense teacher-logits path."""
    hidden, weight, t_hidden, t_weight, labels = _problem(seed=3)
    cfg = replace(_cfg("srkl"), sparse_tail=tail)
    targets = topk_targets(t_hidden[:, :-1].reshape(-1, HT) @ t_weight.T, k=V, temperature=cfg.temperature)
    fused = _fused(hidden, weight, targets, labels, cfg, chunk_size=6)
    dense = _dense(hidden, weight, t_hidden, t_weight, labels, cfg)
    _assert_same(fused, dense, (hidden, weight))


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_float32_bigger_shapes(name):
    """float32, 2 x 150 tokens, V = 3000, default chunk: within float32 tolerance of the float64 dense path."""
    hidden, weight, t_hidden, t_weight, labels = _float32_problem(seed=4, n=300, v=3000)
    labels[:, :7] = -100
    cfg = _cfg(name, temperature=1.0)
    fused = _fused(hidden, weight, _teacher_head(t_hidden, t_weight), labels, cfg, chunk_size=64)
    params64 = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    dense = _dense(*params64, t_hidden.double(), t_weight.double(), labels, cfg)
    assert fused.kd.dtype == torch.float32
    for got, want in zip(_grads(fused, 0.5, 0.5, (hidden, weight)), _grads(dense, 0.5, 0.5, params64), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused.kd.double(), dense.kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.ce.double(), dense.ce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("plan", [None, (0.5, 0.5)], ids=["recompute", "planned"])
def test_bf16_autocast_matches_float64_to_bf16_precision(plan):
    """Under CPU autocast the head's matmuls run in bfloat16 (forward and the backward's recompute alike);
    values and float32 grads stay within bf16 precision of the float64 reference, and far from exact."""
    hidden, weight, t_hidden, t_weight, labels = _float32_problem(seed=5, n=200, v=2000)
    cfg = _cfg("fkl", temperature=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _fused(hidden, weight, _teacher_head(t_hidden, t_weight), labels, cfg, chunk_size=48, loss_weights=plan)
    params64 = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    dense = _dense(*params64, t_hidden.double(), t_weight.double(), labels, cfg)
    grads = _grads(fused, 0.5, 0.5, (hidden, weight))
    assert [x.dtype for x in grads] == [torch.float32, torch.float32]
    for got, want in zip(grads, _grads(dense, 0.5, 0.5, params64), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0.05, atol=2e-4)
        assert not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-8)  # bf16 really was used
    torch.testing.assert_close(fused.ce.double(), dense.ce, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(fused.kd.double(), dense.kd, rtol=5e-2, atol=1e-3)


def test_default_chunk_size():
    assert default_chunk_size(262_144) * 262_144 <= 2**24 < (default_chunk_size(262_144) + 1) * 262_144
    assert default_chunk_size(10**9) == 8


def _tiny(build_model, kind: str) -> torch.nn.Module:
    """Vocab 97, hidden 32, 2 layers, 4 heads (2 kv): a tied Llama or a softcapped Gemma 2, no tokenizer (the
    config's special ids), redrawn from N(0, 0.3) after seed 0, float64, train mode."""
    common = dict(vocab_size=97, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, max_positions=None)
    if kind == "gemma2":
        model = build_model(seed=None, arch="gemma2", **common, head_dim=8, final_logit_softcapping=5.0)
    else:
        model = build_model(seed=None, **common, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # big enough weights that the softcap bends the logits
    return model.double().train()


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_hf_model_recipe_equals_model_logits(build_model, kind):
    """The trainer's recipe (base_model hidden states + head_of) gives the dense loss and parameter grads."""
    student, teacher = _tiny(build_model, kind), _tiny(build_model, kind)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    cfg = _cfg("fkl", temperature=1.0)
    params = [p for p in student.parameters() if p.requires_grad]

    dense = kd_terms(student(input_ids=ids).logits, teacher(input_ids=ids).logits, labels, cfg)
    weight, cap = head_of(student)
    t_weight, t_cap = head_of(teacher)
    hidden = student.base_model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        t_hidden = teacher.base_model(input_ids=ids).last_hidden_state
    assert (cap, t_cap) == ((5.0, 5.0) if kind == "gemma2" else (None, None))
    fused = _fused(hidden, weight, _teacher_head(t_hidden, t_weight, t_cap), labels, cfg, softcap=cap, chunk_size=4)
    _assert_same(fused, dense, params)


def test_head_of_refuses_heads_it_cannot_reproduce(build_model):
    model = _tiny(build_model, "llama")
    model.lm_head = torch.nn.Linear(32, 97, bias=True)
    assert head_of(model) is None
    assert head_of(torch.nn.Linear(3, 3)) is None


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_form_chunk_equals_autograd(name, temperature, dtype):
    """The planned gradient of a chunk in closed form (CE and divergence sharing log q at T = 1) equals autograd
    through `_chunk_sums` (the path it replaced, still used with a softcap or sparse targets): values and grad."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(11, V, generator=g, dtype=dtype) * 3
    teacher = TeacherHead(hidden=torch.randn(11, HT, generator=g, dtype=dtype), weight=torch.randn(V, HT, dtype=dtype))
    labels = torch.randint(0, V, (11,), generator=g)
    cfg, weights = _cfg(name, temperature), (0.3, 0.05)
    for t in (teacher, None):
        kd, ce, grad = fused._closed_form(z, t, labels, cfg, weights)
        leaf = z.clone().requires_grad_()
        kd_ref, ce_ref = fused._chunk_sums(leaf, t, labels, cfg)
        total = ce_ref * weights[1] + (0.0 if kd_ref is None else kd_ref * weights[0])
        (grad_ref,) = torch.autograd.grad(total, leaf)
        tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-13}
        torch.testing.assert_close(ce, ce_ref.detach(), **tol)
        torch.testing.assert_close(grad, grad_ref, **tol)
        assert grad.dtype == dtype and (kd is None) == (t is None)
        if t is not None:
            torch.testing.assert_close(kd, kd_ref.detach(), **tol)
