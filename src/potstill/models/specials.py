"""The special tokens and chat template a student and a teacher must agree on, checked before any training.

A student taught on completions learns to end them where the data (or its own rollouts) end them, and the teacher
grades that ending: if the student ends with a token the teacher never ends with (a base student's
`<|endoftext|>` against an instruct teacher's `<|im_end|>`), the teacher says "do not stop here" at every ending
and the student learns never to stop (the classic length explosion). `check_specials` resolves, once per run:

- the student's `<eos>`: its tokenizer's, or `model.stop_token` (the mapping: the student's `<eos>` becomes that
  token, e.g. the teacher's), else the first id of its generation config;
- the chat template chat records are rendered with (`model.chat_template`): the student's, refused when the
  teacher's differs (`check`), the student's whatever the teacher's (`student`), or the teacher's, copied into the
  student (`teacher`);
- the stop token: the template's end-of-turn token for chat data (the first special token the template writes
  after an assistant message), else the `<eos>`. Completions end with it and rollouts stop at it.

Then it compares with the teacher: the same `<bos>` and `<unk>` strings, and the student's stop token among the
tokens the teacher stops at (its `<eos>`, its generation config's ids, its own template's end-of-turn). Tokens are
compared as strings, so a student with a trimmed vocabulary (other ids) is checked the same way; `<pad>` is never
scored and may differ (noted). `apply_specials` writes the result into the student's tokenizer and generation
config, so the saved student stops where it was taught to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from potstill.data.chat import end_of_turn
from potstill.errors import UserError

TemplateChoice = Literal["check", "student", "teacher"]


@dataclass(frozen=True)
class Specials:
    """What a run's student ends, stops and formats with.

    Attributes:
        eos_token: the student's `<eos>` (after `model.stop_token`).
        stop_token: what completions end with and rollouts stop at: the end-of-turn token with chat data, else eos.
        stop_id: its id in the student's vocabulary.
        chat_template: the template chat records are rendered with (None: no chat data, or no template).
        notes: differences between the pair that were accepted (for the log).
    """

    eos_token: str
    stop_token: str
    stop_id: int
    chat_template: str | None
    notes: tuple[str, ...] = ()


def check_specials(
    student_tok,
    teacher_tok=None,
    *,
    chat: bool = False,
    stop_token: str | None = None,
    chat_template: TemplateChoice = "check",
    student_eos_ids: tuple[int, ...] = (),
    teacher_eos_ids: tuple[int, ...] = (),
) -> Specials:
    """Resolve and check the student's `<eos>`, stop token and chat template against the teacher's (module doc).

    Args:
        student_tok: the student's HF tokenizer.
        teacher_tok: the teacher's, or None (a teacher known only as an endpoint): the student side is checked only.
        chat: the data holds chat records (the template and its end-of-turn token are then used and checked).
        stop_token: `model.stop_token`: the student's `<eos>` becomes this token (None: keep its own).
        chat_template: `model.chat_template`: "check", "student" or "teacher".
        student_eos_ids, teacher_eos_ids: `eos_token_id` of each generation config (may be empty).

    Returns:
        The resolved `Specials`.

    Raises:
        UserError: one line naming what differs and the config key that fixes it.
    """
    eos = _student_eos(student_tok, stop_token, student_eos_ids)
    template = _template(student_tok, teacher_tok, chat_template) if chat else None
    stop = (end_of_turn(student_tok, template) if template else None) or eos
    notes = []
    if teacher_tok is not None:
        for name in ("bos_token", "unk_token"):
            mine, theirs = getattr(student_tok, name), getattr(teacher_tok, name)
            if mine != theirs:
                raise UserError(
                    f"student and teacher {name} differ: {_show(student_tok, mine)} vs {_show(teacher_tok, theirs)}"
                    "; the teacher would read the student's sequences with another token; use a student with the"
                    " teacher's tokenizer"
                )
        if student_tok.pad_token != teacher_tok.pad_token:
            notes.append(f"pad_token {student_tok.pad_token!r} vs {teacher_tok.pad_token!r} (never scored)")
        stops = _teacher_stops(teacher_tok, teacher_eos_ids)
        if stops and stop not in stops:
            fix = "model.chat_template=teacher" if chat and stop != eos else f"model.stop_token={sorted(stops)[0]!r}"
            raise UserError(
                f"the student's completions end with {_show(student_tok, stop)} but the teacher ends them with "
                f"{' or '.join(_show(teacher_tok, s) for s in sorted(stops))}: graded by this teacher the student "
                f"learns never to stop (length explosion); set {fix}, or use a student with the teacher's tokenizer"
            )
    return Specials(
        eos_token=eos,
        stop_token=stop,
        stop_id=student_tok.convert_tokens_to_ids(stop),
        chat_template=template,
        notes=tuple(notes),
    )


def apply_specials(tokenizer, model, specials: Specials) -> None:
    """Write `specials` into the student: its tokenizer's `<eos>` and chat template, its generation config's stops.

    The tokenizer and the generation config are saved with the trained student, which then stops at the token it
    learned to end with.
    """
    if tokenizer.eos_token != specials.eos_token:
        tokenizer.eos_token = specials.eos_token
    if specials.chat_template is not None:
        tokenizer.chat_template = specials.chat_template
    eos_id = tokenizer.convert_tokens_to_ids(specials.eos_token)
    stops = dict.fromkeys([specials.stop_id, eos_id])
    model.config.eos_token_id = eos_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = list(stops) if len(stops) > 1 else specials.stop_id
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id


def eos_ids(model) -> tuple[int, ...]:
    """The `eos_token_id`s of a model's generation config (empty when it has none)."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None)
    return () if ids is None else tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def end_ids(model, tokenizer) -> tuple[int, ...]:
    """The token ids that end a generation: the generation config's `eos_token_id`s (`eos_ids`), or the tokenizer's
    `<eos>` when the config names none (empty when neither has one)."""
    if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is not None:
        return eos_ids(model)
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)


def _student_eos(tok, stop_token: str | None, generation_ids: tuple[int, ...]) -> str:
    if stop_token is not None:
        vocab = tok.get_vocab()
        if stop_token not in vocab:
            raise UserError(
                f"model.stop_token: {stop_token!r} is not one token of the student's vocabulary"
                " (give the token's string as the tokenizer writes it, e.g. '<|im_end|>')"
            )
        return stop_token
    if tok.eos_token is not None:
        return tok.eos_token
    if generation_ids:
        return tok.convert_ids_to_tokens(generation_ids[0])
    raise UserError(
        f"{tok.name_or_path}: the student has no <eos> (neither its tokenizer nor a generation config names one):"
        " its samples could never stop; set model.stop_token=TOKEN"
    )


def _template(student_tok, teacher_tok, choice: TemplateChoice) -> str:
    """The chat template chat records are rendered with, per `model.chat_template`."""
    mine = getattr(student_tok, "chat_template", None) or None
    theirs = getattr(teacher_tok, "chat_template", None) or None if teacher_tok is not None else None
    if choice == "teacher":
        if theirs is None:
            known = "has no chat template" if teacher_tok is not None else "is not known here (set model.teacher)"
            raise UserError(f"model.chat_template=teacher: the teacher's tokenizer {known}")
        return theirs
    if mine is None:
        raise UserError(
            f"{student_tok.name_or_path}: the data holds chat records but the student's tokenizer has no chat template"
            " (a base model?); set model.chat_template=teacher to render them with the teacher's (saved with the"
            " student), or give prompt/completion rows"
        )
    if choice == "check" and theirs is not None and theirs != mine:
        raise UserError(
            "student and teacher chat templates differ: the teacher would grade completions in a format it was not"
            " tuned on; set model.chat_template=teacher (render with the teacher's, saved with the student) or"
            " model.chat_template=student (keep the student's)"
        )
    return mine


def _teacher_stops(tok, generation_ids: tuple[int, ...]) -> set[str]:
    """The tokens the teacher ends a completion with: its `<eos>`, its generation config's, its end-of-turn."""
    stops = {tok.eos_token, end_of_turn(tok), *(tok.convert_ids_to_tokens(list(generation_ids)) or [])}
    return {s for s in stops if s is not None}


def _show(tok, token: str | None) -> str:
    return "none" if token is None else f"{token!r} (id {tok.convert_tokens_to_ids(token)})"
