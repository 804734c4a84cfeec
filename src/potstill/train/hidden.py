"""Setting up intermediate-layer distillation (`hidden.weight > 0`): the layer map and the projections.

`HiddenPlan` is what the KD step needs: which student and teacher layers are paired, the distance, and the
projections (None with equal widths). The projections are a submodule of the student while it trains
(`potstill_hidden_projection`), so the Trainer optimizes them, DDP/FSDP wrap them, and checkpoints hold them (a
resumed run continues them exactly); `detach_projections` removes them before the final student is saved, since a
student is used without its teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from potstill.config import DistillConfig
from potstill.errors import UserError
from potstill.models.lineage import kept_layers

PROJECTION_ATTR = "potstill_hidden_projection"


@dataclass(frozen=True)
class HiddenPlan:
    """The hidden-state term of a run.

    Attributes:
        student_layers: student decoder layers whose outputs are matched (0-based).
        teacher_layers: the teacher layer of each.
        distance: "mse" or "cosine".
        projections: one Linear(H_s, H_t) per pair, or None (equal widths, no projection asked for).
    """

    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    distance: str
    projections: nn.ModuleList | None


def layer_map(cfg: DistillConfig, n_student: int, n_teacher: int) -> dict[int, int]:
    """Student layer -> teacher layer: `hidden.layers`, or 'auto' (the pruned student's origin, else spread evenly).

    Raises:
        UserError: a layer the models do not have, or a student record made from a teacher of another depth.
    """
    given = cfg.hidden.layers
    if given != "auto":
        for s, t in given.items():
            if not (0 <= s < n_student and 0 <= t < n_teacher):
                raise UserError(
                    f"hidden.layers: {s}: {t} names a layer the models do not have (student layers 0..{n_student - 1},"
                    f" teacher layers 0..{n_teacher - 1})"
                )
        if not given:
            raise UserError("hidden.layers: empty; give student_layer: teacher_layer pairs or 'auto'")
        return dict(sorted(given.items()))
    origin = kept_layers(cfg.model.student)
    if origin is not None:
        kept, teacher_layers = origin
        if teacher_layers != n_teacher or len(kept) != n_student:
            raise UserError(
                f"hidden.layers: auto: {cfg.model.student} was cut from a {teacher_layers}-layer teacher keeping"
                f" {len(kept)} layers, but the run's teacher has {n_teacher} and the student {n_student}; give"
                " hidden.layers explicitly"
            )
        return dict(enumerate(kept))
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


def hidden_plan(cfg: DistillConfig, student: nn.Module, teacher: nn.Module) -> HiddenPlan | None:
    """The run's `HiddenPlan` (None when `hidden.weight` is 0); attaches the projections to `student`.

    Raises:
        UserError: see `layer_map`; widths that differ without `hidden.projection`.
    """
    if cfg.hidden.weight == 0:
        return None
    mapping = layer_map(cfg, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    h_s, h_t = student.config.hidden_size, teacher.config.hidden_size
    projections = None
    if cfg.hidden.projection:
        projections = nn.ModuleList(nn.Linear(h_s, h_t, bias=False) for _ in mapping)
        projections.to(device=student.device, dtype=student.dtype)
        setattr(student, PROJECTION_ATTR, projections)
    elif h_s != h_t:
        raise UserError(
            f"hidden.projection: the student's hidden size is {h_s}, the teacher's {h_t}; set hidden.projection=true"
            " to learn a map between them"
        )
    return HiddenPlan(tuple(mapping), tuple(mapping.values()), cfg.hidden.distance, projections)


def detach_projections(student: nn.Module) -> None:
    """Remove the training-only projections from the student (before the final save)."""
    if hasattr(student, PROJECTION_ATTR):
        delattr(student, PROJECTION_ATTR)
