"""Setting up a training run: what it needs of a teacher, the models, the data, and the Trainer's arguments.

`cfg.teacher_kind` answers once "does this run need a teacher, and which?"; `load_models` opens the student and
(for an online teacher) the teacher, or the endpoint that scores for it, and checks that their vocabularies,
special tokens and chat templates agree; `open_cache` opens a teacher cache
and checks it was built for this run; `load_data` packs the training and held-out files; `training_args` maps
the `train` section onto `transformers.TrainingArguments`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from potstill.config import DistillConfig
from potstill.data.chat import holds_chat
from potstill.errors import UserError
from potstill.launch import world_size
from potstill.models.load import load_model, load_tokenizer
from potstill.models.specials import Specials, apply_specials, check_specials, eos_ids
from potstill.models.vocab import ID_MAP_FILE, load_id_map
from potstill.teacher.cross import CrossTokenizerTeacher, shares_ids
from potstill.teacher.endpoint import EndpointClient
from potstill.teacher.online import OnlineTeacher, check_tokenizers
from potstill.teacher.scoring import EndpointScorer
from potstill.teacher.several import TeacherSet

log = logging.getLogger(__name__)


@dataclass
class Models:
    """The models of a run.

    Attributes:
        student: the student (trainable, in `model.dtype`).
        tokenizer: the student's tokenizer.
        teacher: the frozen online teacher over the student's vocabulary, a teacher with another tokenizer
            (`CrossTokenizerTeacher`, `loss.cross_tokenizer`), several (`TeacherSet`, `model.teachers`), or the
            endpoint that scores for it (None for a cache or CE only).
        specials: the student's `<eos>`, stop token and chat template, checked against the teacher's
            (`potstill.models.specials`; None for CE only or a cache without chat data or `model.stop_token`).
    """

    student: nn.Module
    tokenizer: Any
    teacher: OnlineTeacher | CrossTokenizerTeacher | TeacherSet | EndpointScorer | None
    specials: Specials | None = None


def load_models(cfg: DistillConfig) -> Models:
    """The student (+ tokenizer) and, for an online teacher, the teacher; checks their vocabularies agree.

    The teacher reads the student's id map (a student with a trimmed vocabulary) when it has one. A teacher whose
    tokenizer differs is a `CrossTokenizerTeacher` (per `loss.cross_tokenizer`; only the student's special tokens are
    checked then: the teacher reads the text, not the student's ids). The pair's
    special tokens and chat template are checked (`check_specials`) and written into the student
    (`apply_specials`); an endpoint teacher passes its self-test first.

    Raises:
        UserError: unloadable models, tokenizers that differ, special tokens or chat templates that do not agree,
            vocabulary sizes that do not fit, an endpoint that fails its self-test.
    """
    student, tokenizer = load_model(cfg.model.student, dtype=cfg.model.dtype)
    kind, id_map = cfg.teacher_kind, load_id_map(cfg.model.student)
    teacher_model = teacher_tok = teacher = None
    if kind == "online" and cfg.model.teachers:
        teacher, teacher_model, teacher_tok = load_teacher_set(cfg, student, tokenizer, id_map)
    elif kind == "online":
        teacher, teacher_model, teacher_tok = load_teacher(cfg, cfg.model.teacher, student, tokenizer, id_map)
    elif kind == "endpoint":
        teacher_tok = load_tokenizer(cfg.model.teacher) if cfg.model.teacher else None
        teacher = endpoint_scorer(cfg, tokenizer, id_map)
    specials = None
    # step_by_step reads its own records (input / label / rationale), never chat rows
    chat = cfg.train.recipe != "step_by_step" and holds_chat([*cfg.data.train, *cfg.data.eval])
    if kind == "endpoint" or teacher_model is not None or chat or cfg.model.stop_token is not None:
        specials = check_specials(
            tokenizer,
            teacher_tok,
            chat=chat,
            stop_token=cfg.model.stop_token,
            chat_template=cfg.model.chat_template,
            student_eos_ids=eos_ids(student),
            teacher_eos_ids=eos_ids(teacher_model),
        )
        apply_specials(tokenizer, student, specials)
        for note in specials.notes:
            log.info("student/teacher: %s", note)
    return Models(student, tokenizer, teacher, specials)


def load_teacher(cfg: DistillConfig, path: str, student: nn.Module, tokenizer, id_map):
    """One online teacher: `(teacher, model, tokenizer)`; model and tokenizer are None for a teacher of another
    tokenizer (`CrossTokenizerTeacher`: only the student's special tokens are checked then, the teacher reads the
    text, not the student's ids), else they are the pair `check_specials` compares."""
    teacher_model, teacher_tok = load_model(path, dtype=cfg.model.teacher_load_dtype)
    if cross_tokenizer(cfg, tokenizer, teacher_tok, id_map):
        teacher = CrossTokenizerTeacher(teacher_model, tokenizer, teacher_tok)
        log.info("cross-tokenizer KD (%s): %d shared tokens", path, teacher.tokens.student_shared.numel())
        return teacher, None, None
    check_tokenizers(tokenizer, teacher_tok, id_map=id_map, specials=False)  # specials: check_specials
    check_vocab_sizes(student, teacher_model, id_map, cfg, path)
    return OnlineTeacher(teacher_model, id_map=id_map), teacher_model, teacher_tok


def load_teacher_set(cfg: DistillConfig, student: nn.Module, tokenizer, id_map):
    """`model.teachers`: a `TeacherSet`, and the first same-tokenizer teacher's model and tokenizer (the pair
    `check_specials` compares; the others must have the same `<bos>`, `<eos>`, `<unk>`), or (None, None).

    Raises:
        UserError: a teacher that cannot be loaded or paired, or one whose context is shorter than a student row.
    """
    members, first, contexts = [], (None, None), {}
    for k, entry in enumerate(cfg.model.teachers):
        teacher, model, tok = load_teacher(cfg, entry.path, student, tokenizer, id_map)
        context = getattr(teacher.model.config, "max_position_embeddings", None)
        contexts[entry.path] = context
        if model is not None and context is not None and cfg.data.seq_len > context:
            raise UserError(
                f"config: model.teachers.{k} ({entry.path}): context length {context} < data.seq_len"
                f" {cfg.data.seq_len}; every teacher reads the student's rows, lower data.seq_len"
            )
        if model is not None and first[0] is None:
            first = (model, tok)
        elif model is not None:
            check_tokenizers(tokenizer, tok, id_map=id_map, specials=True)
        members.append(teacher)
    if len(set(contexts.values())) > 1:
        log.warning(
            "model.teachers: context lengths differ (%s); each reads rows of data.seq_len=%d student tokens (a teacher"
            " of another tokenizer: the same text in its own tokens, refused where longer than its context)",
            ", ".join(f"{p}: {c}" for p, c in contexts.items()),
            cfg.data.seq_len,
        )
    names = [t.path for t in cfg.model.teachers]
    weights = [t.weight for t in cfg.model.teachers]
    return TeacherSet(members, names, weights, [t.domains for t in cfg.model.teachers]), *first


def cross_tokenizer(cfg: DistillConfig, tokenizer, teacher_tok, id_map) -> bool:
    """Whether the run distills through the teacher's own tokenizer (`loss.cross_tokenizer`).

    Raises:
        UserError: a feature that needs the teacher on the student's ids (hidden-state term, DDK, other recipes).
    """
    mode = cfg.loss.cross_tokenizer
    if mode == "never" or (mode == "auto" and shares_ids(tokenizer, teacher_tok, id_map)):
        return False
    refuse_id_features(cfg, f"loss.cross_tokenizer={mode}")
    return True


def refuse_id_features(cfg: DistillConfig, why: str) -> None:
    """Refuse what needs the teacher on the student's token ids (a cross-tokenizer run: `why`)."""
    needs_ids = {
        "hidden.weight": cfg.hidden.weight > 0,
        "data.mixing.mode=ddk": cfg.data.mixing is not None and cfg.data.mixing.mode == "ddk",
        f"train.recipe={cfg.train.recipe}": cfg.train.recipe != "distill",
    }
    for key, used in needs_ids.items():
        if used:
            raise UserError(
                f"{key}: not available with a teacher of another tokenizer (cross-tokenizer KD, {why}); it needs the"
                " teacher on the student's token ids"
            )


def endpoint_scorer(cfg: DistillConfig, tokenizer, id_map) -> EndpointScorer:
    """The `teacher.endpoint` scorer of a run, after its self-test against the student's tokenizer."""
    if id_map is not None:
        raise UserError(
            f"{cfg.model.student}: teacher.source=endpoint sends the student's token ids, so the student needs the"
            f" teacher's vocabulary; this one has a trimmed one ({ID_MAP_FILE})"
        )
    e = cfg.teacher.endpoint
    scorer = EndpointScorer(
        EndpointClient.from_settings(e), tokenizer, top_k=e.top_k, batch_size=e.batch_size, tolerance=e.tolerance
    )
    scorer.self_test(tokenizer)
    return scorer


def check_vocab_sizes(
    student: nn.Module, teacher: nn.Module, id_map: torch.Tensor | None, cfg: DistillConfig, path: str | None
):
    """The teacher's (at `path`) logits must cover exactly the student's output rows."""
    s_rows = student.get_output_embeddings().weight.shape[0]
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    if id_map is not None:
        if len(id_map) != s_rows or int(id_map.max()) >= t_rows:
            raise UserError(f"{cfg.model.student}: {ID_MAP_FILE} maps {len(id_map)} ids, the student has {s_rows}")
    elif s_rows != t_rows:
        raise UserError(
            f"{path}: teacher vocabulary has {t_rows} ids, student {cfg.model.student} has {s_rows} "
            f"(they must share a tokenizer, or the student must carry {ID_MAP_FILE})"
        )


def open_cache(cfg: DistillConfig, tokenizer, train_ds):
    """The teacher cache of a `teacher.source: cache` run (None for other runs), checked against the run.

    For a top-k or sampled cache, `model.teacher` is optional (it is never loaded); when given, the cache must have
    been built from it. A cross-tokenizer cache (built for this student's tokenizer, another than the teacher's) is
    read through the cross-tokenizer loss (`CrossCache`; not with `loss.cross_tokenizer: never`). A hidden-state
    cache (`targets: hidden`) needs it: its head (kept; the rest of the teacher is dropped) turns the stored states
    into the teacher's exact distributions (`HeadedCache`).

    Raises:
        UserError: no manifest, or a cache built for another tokenizer, other data, temperature or teacher; a
            hidden-state cache without model.teacher.
    """
    if cfg.teacher_kind != "cache":
        return None
    from potstill.teacher.cache import TeacherCache, dataset_fingerprint
    from potstill.teacher.cache.reader import HeadedCache

    cache = TeacherCache(cfg.teacher.cache)
    cache.check(
        tokenizer=tokenizer,
        dataset_fingerprint=dataset_fingerprint(train_ds),
        temperature=cfg.loss.temperature,
        teacher=cfg.model.teacher,
    )
    if cache.cross:
        from potstill.teacher.cache.cross import CrossCache

        if cfg.loss.cross_tokenizer == "never":
            raise UserError(
                f"loss.cross_tokenizer: {cfg.teacher.cache} is a cross-tokenizer cache (the teacher has another"
                " tokenizer than the student); set loss.cross_tokenizer to auto, or build a cache from a teacher of"
                " the student's tokenizer"
            )
        refuse_id_features(cfg, f"cross-tokenizer cache {cfg.teacher.cache}")
        return CrossCache(cache, tokenizer)
    if cache.manifest["targets"] != "hidden":
        return cache
    if cfg.model.teacher is None:
        raise UserError(
            f"model.teacher: {cfg.teacher.cache} holds the teacher's hidden states; its head (from model.teacher)"
            " turns them into distributions"
        )
    teacher_model, _ = load_model(cfg.model.teacher, dtype=cfg.model.teacher_load_dtype)
    # only the head's tensors stay referenced: the rest of the teacher is freed on return
    return HeadedCache(cache, *OnlineTeacher(teacher_model, id_map=load_id_map(cfg.model.student)).head())


def load_data(cfg: DistillConfig, tokenizer):
    """Packed train dataset (required) and eval dataset (None when `data.eval` is empty)."""
    from potstill.data import load_dataset

    d = cfg.data
    train = load_dataset(d.train, tokenizer, d.seq_len, d.add_bos, False)
    if len(train) == 0:
        raise UserError(f"{d.train[0]}: no training text (after packing to {d.seq_len} tokens)")
    evals = load_dataset(d.eval, tokenizer, d.seq_len, d.add_bos, False) if d.eval else None
    return train, evals


def training_args(cfg: DistillConfig) -> TrainingArguments:
    """Map the `train` section onto TrainingArguments (quiet, CPU-friendly, seeded, gloo on CPU)."""
    t = cfg.train
    return TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend="gloo" if world_size() > 1 and not torch.cuda.is_available() else None,
        use_cpu=not torch.cuda.is_available(),
        bf16=t.mixed_precision == "bf16" or cfg.model.dtype == "bfloat16",
        fp16=t.mixed_precision == "fp16",
        restore_callback_states_from_checkpoint=True,
        ddp_find_unused_parameters=False,
    )
