"""Intermediate-layer distillation in training: the layer map, the third term in the step and the logs, fused ==
dense, splits of a step add up, projections (kept in checkpoints, resumed exactly, dropped from the student)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distill_helpers import (
    interrupted_run,
    loss_and_grads,
    make_cfg,
    overrides_for,
    pair_models,
    ragged_batch,
    read_log,
)
from potstill.config import load_config
from potstill.losses import scored_mask
from potstill.losses.hidden import hidden_term
from potstill.teacher.online import OnlineTeacher
from potstill.train.hidden import PROJECTION_ATTR, hidden_plan, layer_map
from potstill.train.recipes import run_distill
from potstill.train.setup import training_args
from potstill.train.trainer import DistillTrainer


def test_auto_map_of_a_pruned_student_is_where_its_layers_came_from(pruned, tmp_path):
    cfg = make_cfg(pruned, tmp_path / "run", "hidden.weight=1")
    assert layer_map(cfg, 2, 4) == {0: 0, 1: 3}
    with pytest.raises(Exception, match="was cut from a 4-layer teacher"):
        layer_map(cfg, 2, 6)


def test_auto_map_of_another_student_spreads_evenly_and_explicit_maps_are_checked(models_dir, tmp_path):
    assert layer_map(make_cfg(models_dir, tmp_path / "r", "hidden.weight=1"), 3, 12) == {0: 3, 1: 7, 2: 11}
    given = make_cfg(models_dir, tmp_path / "r", "hidden.weight=1", "hidden.layers={1: 0}")
    assert layer_map(given, 2, 2) == {1: 0}
    bad = make_cfg(models_dir, tmp_path / "r", "hidden.weight=1", "hidden.layers={0: 5}")
    with pytest.raises(Exception, match=r"hidden.layers: 0: 5 names a layer the models do not have"):
        layer_map(bad, 2, 2)


def _trainer(root, tmp_path, *extra):
    cfg = make_cfg(root, tmp_path / "run", "loss.alpha=0.5", "hidden.weight=0.7", *extra)
    student, teacher = pair_models(root)
    plan = hidden_plan(cfg, student, teacher)
    trainer = DistillTrainer(
        model=student,
        args=training_args(cfg),
        teacher=OnlineTeacher(teacher),
        loss_cfg=cfg.loss,
        hidden=(plan, cfg.hidden.weight),
    )
    return trainer, plan


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_fused_and_dense_give_the_same_loss_and_gradients(pruned, tmp_path, distance):
    batch = [ragged_batch(4, seed=3)]
    fused, _ = _trainer(pruned, tmp_path, f"hidden.distance={distance}")
    dense, _ = _trainer(pruned, tmp_path, f"hidden.distance={distance}", "loss.fused=false")
    (lf, gf), (ld, gd) = loss_and_grads(fused, batch), loss_and_grads(dense, batch)
    assert lf == pytest.approx(ld, rel=1e-5)
    for a, b in zip(gf, gd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_step_adds_weight_times_the_hidden_term(pruned, tmp_path):
    """loss(with hidden) - loss(without) = w * H computed directly from the two models' layer outputs."""
    batch = ragged_batch(4, seed=4)
    with_h, plan = _trainer(pruned, tmp_path)
    without = DistillTrainer(
        model=next(pair_models(pruned)), args=with_h.args, teacher=with_h.teacher, loss_cfg=with_h.loss_cfg
    )
    (l_h, _), (l_0, _) = loss_and_grads(with_h, [batch]), loss_and_grads(without, [batch])
    student, teacher = pair_models(pruned)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        t = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    term = hidden_term([s[1], s[2]], [t[1], t[4]], scored_mask(batch["labels"]), "mse")
    assert plan.teacher_layers == (0, 3)
    assert l_h - l_0 == pytest.approx(0.7 * term.item(), rel=1e-4)


def test_splitting_a_step_into_micro_batches_changes_nothing(pruned, tmp_path):
    batch = ragged_batch(4, seed=5)
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    (l1, g1), (l2, g2) = (
        loss_and_grads(_trainer(pruned, tmp_path)[0], [batch]),
        loss_and_grads(_trainer(pruned, tmp_path)[0], halves),
    )
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_run_logs_the_term_and_its_gradient_ratio(pruned, tmp_path):
    out = run_distill(make_cfg(pruned, tmp_path / "run", "hidden.weight=2", "train.max_steps=4", "loss.alpha=0.5"))
    logs = read_log(out)
    assert all(e["hidden"] > 0 and e["hidden_weighted"] == pytest.approx(2 * e["hidden"]) for e in logs)
    assert all(e["hidden_grad_ratio"] > 0 for e in logs)
    assert logs[-1]["hidden"] < logs[0]["hidden"]  # the term trains
    assert "hidden" not in read_log(run_distill(make_cfg(pruned, tmp_path / "plain", "train.max_steps=1")))[0]


def test_widths_that_differ_need_a_projection(models_dir, distill_error):
    line = distill_error(*overrides_for(models_dir, models_dir / "no-proj", "hidden.weight=1", "train.max_steps=1"))
    assert "hidden.projection" in line and "32" in line and "64" in line


@pytest.mark.parametrize(
    "kind", ["projection", "filters", pytest.param("filters, widths differ", marks=pytest.mark.slow)]
)
def test_projection_or_filters_are_checkpointed_resumed_exactly_and_dropped(
    kind, models_dir, pruned, tmp_path, monkeypatch
):
    """Projections (widths differ) or TED's student filters (equal widths: initialised from the teacher's; differing
    widths: fresh) are trained with the student, kept in checkpoints, resumed exactly and removed at the end."""
    root = pruned if kind == "filters" else models_dir
    extra = "hidden.projection=true" if kind == "projection" else "hidden.filters.steps=3"
    opts = ("hidden.weight=1", extra, "train.max_steps=4", "train.save_steps=2")
    full = run_distill(make_cfg(root, tmp_path / "full", *opts))
    cut = make_cfg(root, tmp_path / "cut", *opts)
    interrupted_run(monkeypatch, cut, step=3)
    saved = load_file(tmp_path / "cut" / "checkpoint-2" / "model.safetensors")
    assert any(k.startswith(PROJECTION_ATTR) for k in saved)
    resumed = run_distill(cut)
    a, b = (load_file(run / "student" / "model.safetensors") for run in (full, resumed))
    assert not any(k.startswith(PROJECTION_ATTR) for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    logs = read_log(full)
    assert all(e["hidden"] > 0 for e in logs)
    assert [e["loss"] for e in logs] == pytest.approx([e["loss"] for e in read_log(resumed)], rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["hidden.weight=-1"], "hidden.weight"),
        (["hidden.weight=1", "teacher.source=cache", "teacher.cache=/nowhere"], "needs an online teacher"),
        (["hidden.weight=1", "train.recipe=step_by_step"], "train.recipe=distill"),
        (["hidden.weight=1", "hidden.distance=l2"], "hidden.distance"),
        (["hidden.weight=1", "hidden.layers={0: 9}", "hidden.projection=true"], "hidden.layers: 0: 9"),
        (["hidden.weight=1", "hidden.filters.steps=-1"], "hidden.filters.steps"),
        (["hidden.weight=1", "hidden.filters.steps=2", "hidden.filters.lr=0"], "hidden.filters.lr"),
    ],
)
def test_bad_settings_are_one_line_errors(models_dir, tmp_path, distill_error, extra, needle):
    assert needle in distill_error(*overrides_for(models_dir, tmp_path / "bad", "train.max_steps=1", *extra))


def test_config_round_trip_keeps_the_map(models_dir, tmp_path):
    cfg = load_config(None, overrides_for(models_dir, tmp_path / "r", "hidden.layers={0: 1, 1: 1}"))
    assert cfg.hidden.layers == {0: 1, 1: 1} and json.loads(cfg.model_dump_json())["hidden"]["weight"] == 0
