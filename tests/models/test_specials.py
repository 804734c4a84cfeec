"""check_specials / apply_specials: a student's <eos>, stop token and chat template against its teacher's."""

from __future__ import annotations

import pytest

from chat_tokenizers import CHATML, instruct, with_turn_tokens
from potstill.data.chat import end_of_turn
from potstill.errors import UserError
from potstill.models.specials import apply_specials, check_specials, eos_ids


@pytest.fixture
def base(tiny_tokenizer):
    return with_turn_tokens(tiny_tokenizer)  # a base student: no template, <eos> "<eos>"


@pytest.fixture
def chat_teacher(tiny_tokenizer):
    return instruct(tiny_tokenizer)  # an instruct teacher: ChatML, <eos> "<|im_end|>"


def test_end_of_turn_is_the_special_token_after_an_answer(chat_teacher, base):
    assert end_of_turn(chat_teacher) == "<|im_end|>"
    assert end_of_turn(base) is None  # no template
    assert end_of_turn(base, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}") is None  # none written


def test_same_tokenizer_passes_with_its_own_eos(chat_teacher):
    specials = check_specials(chat_teacher, instruct(chat_teacher), chat=True)
    assert specials.stop_token == "<|im_end|>" and specials.stop_id == chat_teacher.convert_tokens_to_ids("<|im_end|>")
    assert specials.chat_template == CHATML and specials.notes == ()


def test_base_student_with_an_instruct_teacher_is_refused_then_mapped(base, chat_teacher, build_model):
    with pytest.raises(UserError) as err:
        check_specials(base, chat_teacher)
    line = str(err.value)
    assert "\n" not in line and "length explosion" in line and "model.stop_token='<|im_end|>'" in line
    assert "'<eos>' (id 2)" in line and "'<|im_end|>' (id 301)" in line
    specials = check_specials(base, chat_teacher, stop_token="<|im_end|>")
    assert specials.eos_token == specials.stop_token == "<|im_end|>" and specials.stop_id == 301
    model = build_model(base)
    apply_specials(base, model, specials)
    assert base.eos_token == "<|im_end|>" and base.eos_token_id == 301
    assert model.generation_config.eos_token_id == 301 and eos_ids(model) == (301,)


def test_chat_data_with_a_base_student_needs_the_teachers_template(base, chat_teacher, build_model):
    with pytest.raises(UserError, match="student's tokenizer has no chat template.*model.chat_template=teacher"):
        check_specials(base, chat_teacher, chat=True)
    specials = check_specials(base, chat_teacher, chat=True, chat_template="teacher")
    # the turn ends with <|im_end|>, which the teacher stops at: no <eos> mapping is needed for chat data
    assert specials.chat_template == CHATML and specials.stop_token == "<|im_end|>" and specials.eos_token == "<eos>"
    model = build_model(base)
    apply_specials(base, model, specials)
    assert base.chat_template == CHATML and base.eos_token == "<eos>"
    assert model.generation_config.eos_token_id == [301, 2]  # the saved student stops at the end of its turn


def test_differing_chat_templates_are_refused_unless_chosen(chat_teacher, tiny_tokenizer):
    other = instruct(tiny_tokenizer, template=CHATML.replace("\n{{ m['content'] }}", ": {{ m['content'] }}"))
    with pytest.raises(UserError, match="chat templates differ.*model.chat_template=teacher.*=student"):
        check_specials(other, chat_teacher, chat=True)
    assert check_specials(other, chat_teacher, chat=True, chat_template="student").chat_template == other.chat_template
    assert check_specials(other, chat_teacher, chat=True, chat_template="teacher").chat_template == CHATML
    assert check_specials(other, chat_teacher).chat_template is None  # no chat data: templates are not compared


def test_student_without_eos(base):
    base.eos_token = None
    with pytest.raises(UserError, match=r"the student has no <eos> .* could never stop; set model.stop_token"):
        check_specials(base)
    assert check_specials(base, student_eos_ids=(2,)).eos_token == "<eos>"  # from its generation config
    with pytest.raises(UserError, match="model.stop_token: 'END' is not one token of the student's vocabulary"):
        check_specials(base, stop_token="END")


def test_other_bos_is_refused_and_other_pad_noted(tiny_tokenizer, make_tokenizer):
    student, teacher = with_turn_tokens(tiny_tokenizer), with_turn_tokens(tiny_tokenizer)
    teacher.pad_token = "<unk>"
    assert check_specials(student, teacher).notes == ("pad_token '<pad>' vs '<unk>' (never scored)",)
    teacher.bos_token = "<pad>"
    with pytest.raises(UserError, match=r"student and teacher bos_token differ: '<bos>' \(id 1\) vs '<pad>' \(id 0\)"):
        check_specials(student, teacher)
