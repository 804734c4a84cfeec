"""Setting up intermediate-layer distillation (`hidden.weight > 0`): the layer map and the projections.

`HiddenPlan` is what the KD step needs: which student and teacher layers are paired, the distance, and the
projections (None with equal widths). The projections are a submodule of the student while it trains
(`potstill_hidden_projection`), so the Trainer optimizes them, DDP/FSDP wrap them, and checkpoints hold them (a
resumed run continues them exactly); `detach_projections` removes them before the final student is saved, since a
student is used without its teacher.

With TED's filters (`hidden.filters.steps > 0`) the plan also holds the teacher's filters, trained first with the
teacher frozen (`potstill.train.filters`), and the student's filters take the projections' place (same attribute,
so the same checkpointing, resume and removal), each initialised from its teacher filter when the widths agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from potstill.config import DistillConfig
from potstill.errors import UserError
from potstill.losses.hidden import TaskFilter
from potstill.models.lineage import kept_layers
from potstill.teacher.online import OnlineTeacher

PROJECTION_ATTR = "potstill_hidden_projection"


@dataclass(frozen=True)
class HiddenPlan:
    """The hidden-state term of a run.

    Attributes:
        student_layers: student decoder layers whose outputs are matched (0-based).
        teacher_layers: the teacher layer of each.
        distance: "mse" or "cosine".
        projections: one Linear(H_s, H_t) per pair, or the student's `TaskFilter`s with TED's filters, or None
            (equal widths, no projection asked for).
        teacher_filters: the teacher's frozen `TaskFilter` per pair (TED), or None (raw teacher states).
    """

    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    distance: str
    projections: nn.ModuleList | None
    teacher_filters: nn.ModuleList | None = None


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


def hidden_plan(
    cfg: DistillConfig, student: nn.Module, teacher: OnlineTeacher | nn.Module, train_ds=None
) -> HiddenPlan | None:
    """The run's `HiddenPlan` (None when `hidden.weight` is 0); attaches the projections (or filters) to `student`.

    Args:
        cfg: the run's config.
        student: the student model.
        teacher: the online teacher (or its model, without `hidden.filters`).
        train_ds: the packed training data (TED's first stage trains the teacher's filters on it).

    Raises:
        UserError: see `layer_map`; widths that differ without `hidden.projection` or `hidden.filters`.
    """
    if cfg.hidden.weight == 0:
        return None
    model = teacher.model if isinstance(teacher, OnlineTeacher) else teacher
    mapping = layer_map(cfg, student.config.num_hidden_layers, model.config.num_hidden_layers)
    h_s, h_t = student.config.hidden_size, model.config.hidden_size
    if cfg.hidden.filters.steps:
        from potstill.train.filters import train_teacher_filters

        teacher_filters, _ = train_teacher_filters(cfg, teacher, train_ds, tuple(mapping.values()))
        projections = nn.ModuleList(TaskFilter(h_s, h_t) for _ in mapping)
        if h_s == h_t:
            projections.load_state_dict(teacher_filters.state_dict())
        projections.to(device=student.device, dtype=student.dtype)
        setattr(student, PROJECTION_ATTR, projections)
        return HiddenPlan(tuple(mapping), tuple(mapping.values()), cfg.hidden.distance, projections, teacher_filters)
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
